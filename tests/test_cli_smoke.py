"""`posetriton predict` against the session's real Triton (conftest fixtures `served_url`, `photo_paths`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from posetriton.client.cli import EXIT_PARTIAL, app

MODEL = "yolo11n_pose"


def _predict(served_url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["predict", "--url", served_url, "--model", MODEL, *args])
    return result.exit_code, result.stderr


def test_predict_writes_json_and_drawings_and_names_the_bad_image(
    served_url: str, photo_paths: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"this is text, not a JPEG")
    images = [*photo_paths[:2], bad, *photo_paths[2:]]
    output, drawings = tmp_path / "results.json", tmp_path / "drawn"

    code, stderr = _predict(
        served_url, *map(str, images), "--output-json", str(output), "--draw", str(drawings), "--batch-size", "2"
    )

    assert code == EXIT_PARTIAL, stderr
    assert f"error: {bad}:" in stderr and "Traceback" not in stderr
    entries = json.loads(output.read_text())
    assert [entry["image"] for entry in entries] == [str(path) for path in images]
    refused = entries[images.index(bad)]
    assert "not a recognised image" in refused["error"] and refused["detections"] == []
    good = [(entry, path) for entry, path in zip(entries, images, strict=True) if path != bad]
    for entry, path in good:
        assert "error" not in entry
        with Image.open(path) as original:
            assert (entry["width"], entry["height"]) == ImageOps.exif_transpose(original).size
        for detection in entry["detections"]:
            assert len(detection["box"]) == 4 and 0.0 <= detection["score"] <= 1.0
            assert len(detection["keypoints"]) == 17 and all(len(point) == 3 for point in detection["keypoints"])
        with Image.open(drawings / path.name) as drawn:
            assert drawn.size == (entry["width"], entry["height"])
    assert sum(len(entry["detections"]) for entry, _ in good) > 0, "these photos show people"
    assert not (drawings / bad.name).exists()


def test_thresholds_reach_the_server(
    served_url: str, photo_paths: list[Path], references: dict, tmp_path: Path
) -> None:
    """--max-det caps each photo at exactly one pose (every photo shows people). On bus.jpg, Ultralytics'
    own predict() finds three people above 0.8 and one at about 0.45: the default conf (0.25) returns all
    four, --conf 0.6 exactly the three, so the pose scoring between the two thresholds is the one dropped."""
    capped = tmp_path / "capped.json"
    code, stderr = _predict(served_url, *map(str, photo_paths), "-o", str(capped), "--conf", "0.1", "--max-det", "1")
    assert code == 0, stderr
    assert [len(entry["detections"]) for entry in json.loads(capped.read_text())] == [1] * len(photo_paths)
    bus = next(p for p in photo_paths if p.name == "bus.jpg")
    upstream = references["detections"]["ultralytics"]["bus.jpg"]["scores"]
    between = [score for score in upstream if 0.25 <= score < 0.6]
    assert len(between) == 1 and all(abs(score - 0.6) > 0.01 for score in upstream), "the reference changed"
    scores = {}
    for conf in ("0.25", "0.6"):
        output = tmp_path / f"conf{conf}.json"
        code, stderr = _predict(served_url, str(bus), "-o", str(output), "--conf", conf)
        assert code == 0, stderr
        (entry,) = json.loads(output.read_text())
        scores[conf] = sorted(d["score"] for d in entry["detections"])
    assert len(scores["0.25"]) == len(upstream) and len(scores["0.6"]) == len(upstream) - 1
    dropped = [score for score in scores["0.25"] if score < 0.6]
    assert len(dropped) == 1 and 0.25 <= dropped[0] < 0.6 and abs(dropped[0] - between[0]) < 1e-2
    assert scores["0.6"] == pytest.approx(scores["0.25"][1:], abs=1e-6)
