"""`posetriton predict` against the session's real Triton (conftest fixtures `served_url`, `photo_paths`)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageOps
from typer.testing import CliRunner

from posetriton.client.cli import EXIT_PARTIAL, app
from tests.triton_requests import infer

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


def test_thresholds_reach_the_server(served_url: str, photo_paths: list[Path], tmp_path: Path) -> None:
    """--max-det caps each photo at exactly one pose (every photo shows people); --conf 0.1 returns exactly
    the poses the server finds at that conf, including some scoring between 0.1 and the default 0.25."""
    capped, loose = tmp_path / "capped.json", tmp_path / "loose.json"
    code, stderr = _predict(served_url, *map(str, photo_paths), "-o", str(capped), "--conf", "0.1", "--max-det", "1")
    assert code == 0, stderr
    assert [len(entry["detections"]) for entry in json.loads(capped.read_text())] == [1] * len(photo_paths)
    code, stderr = _predict(served_url, *map(str, photo_paths), "-o", str(loose), "--conf", "0.1")
    assert code == 0, stderr
    scores = [[d["score"] for d in entry["detections"]] for entry in json.loads(loose.read_text())]
    served = infer(served_url, MODEL, [p.read_bytes() for p in photo_paths], {"conf": 0.1})
    assert [len(s) for s in scores] == [len(d.scores) for d in served]
    assert all(score >= 0.1 for s in scores for score in s)
    assert any(0.1 <= score < 0.25 for s in scores for score in s), "no pose between the two thresholds"
