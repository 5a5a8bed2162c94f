"""`posetriton predict` against the session's real Triton (conftest fixtures `served_url`, `photo_paths`)."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_thresholds_reach_the_server(served_url: str, photo_paths: list[Path], tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    code, stderr = _predict(served_url, *map(str, photo_paths), "-o", str(output), "--conf", "0.1", "--max-det", "1")
    assert code == 0, stderr
    entries = json.loads(output.read_text())
    assert all(len(entry["detections"]) <= 1 for entry in entries)
    assert all(detection["score"] >= 0.1 for entry in entries for detection in entry["detections"])
