"""`posetriton predict` on directories, globs and videos; `models`; `health`; `--help` — against the real server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import typer
from typer.testing import CliRunner

from posetriton.client.cli import app
from tests.conftest import SG_MODEL, UL_MODEL, free_port
from tests.test_client_sdk import _photo, _write_video


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_help_lists_every_command() -> None:
    code, stdout, _ = _run("--help")
    assert code == 0
    for command in ("predict", "track", "models", "health", "eval", "serve", "ui"):
        assert command in stdout
    code, stdout, _ = _run("predict", "--help")
    assert code == 0 and "--format" in stdout and "video" in stdout


def test_every_client_command_takes_the_connection_options() -> None:
    """Declared once (posetriton.client.cli_options), with each command's own defaults; serve connects to nothing."""
    group = typer.main.get_command(app)
    expected = {"--url", "--timeout", "--retries", "--ssl", "--root-certificates", "--header"}
    for command, timeout, retries in (
        ("predict", 120.0, 3), ("track", 120.0, 1), ("models", 30.0, 3), ("health", 10.0, 1), ("eval", 120.0, 3),
        ("ui", 30.0, 3),
    ):  # fmt: skip
        options = {opt: param for param in group.commands[command].params for opt in param.opts}  # type: ignore[attr-defined]
        assert expected <= set(options), command
        assert (options["--timeout"].default, options["--retries"].default) == (timeout, retries), command
    serve = {opt for param in group.commands["serve"].params for opt in param.opts}  # type: ignore[attr-defined]
    assert not expected & serve
    code, _, stderr = _run("models", "--url", "localhost", "--timeout", "1")
    assert code == 2 and "not a gRPC address" in _unboxed(stderr)
    code, _, stderr = _run("track", "0", "--header", "no-colon")
    assert code == 2 and "is not 'NAME: VALUE'" in _unboxed(stderr)


def _unboxed(text: str) -> str:
    """Typer's error box as one line of words."""
    return " ".join(text.replace("│", " ").split())


def test_the_cli_loads_without_the_server_launcher() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, posetriton.client.cli; print('posetriton.server.launcher' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert loaded.stdout.strip() == "False"


def test_models_lists_the_pose_models(served_url: str) -> None:
    code, stdout, stderr = _run("models", "--url", served_url)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].split()[:5] == ["MODEL", "INPUT", "FAMILY", "MAX", "BATCH"]
    assert [line.split()[:2] for line in lines[1:]] == [
        [UL_MODEL, "IMAGE"], [f"{UL_MODEL}_pixels", "PIXELS"], [SG_MODEL, "IMAGE"], [f"{SG_MODEL}_pixels", "PIXELS"],
    ]  # fmt: skip
    code, stdout, _ = _run("models", "--url", served_url, "--json")
    models = json.loads(stdout)
    assert code == 0 and models[0]["name"] == UL_MODEL and len(models[0]["keypoint_names"]) == 17
    assert models[0]["skeleton"][0] == [15, 13]


def test_health(served_url: str) -> None:
    code, stdout, stderr = _run("health", "--url", served_url, "--model", UL_MODEL)
    assert code == 0, stderr
    assert stdout == f"server {served_url}: live, ready\nmodel {UL_MODEL}: ready\n"
    code, _, stderr = _run("health", "--url", served_url, "--model", "nope")
    assert code == 1 and stderr.startswith("error: model 'nope' is not ready on") and stderr.count("\n") == 1
    code, _, stderr = _run("health", "--url", f"127.0.0.1:{free_port()}")
    assert code == 1 and stderr.startswith("error: cannot reach Triton") and "Traceback" not in stderr


def test_predict_directories_globs_and_videos_with_drawings_and_coco(
    served_url: str, photo_paths: list[Path], tmp_path: Path
) -> None:
    folder, shots = tmp_path / "folder", tmp_path / "shots"
    folder.mkdir()
    shots.mkdir()
    for photo in photo_paths[:2]:
        shutil.copy(photo, folder / photo.name)
    for photo in photo_paths[2:]:
        shutil.copy(photo, shots / photo.name)
    video = tmp_path / "clip.mp4"
    _write_video(video, [_photo(photo_paths, "zidane.jpg"), _photo(photo_paths, "bus.jpg")], frames=6)
    output, drawn = tmp_path / "out.json", tmp_path / "drawn"
    inputs = [str(folder), str(shots / "*.jpg"), str(video)]

    code, _, stderr = _run(
        "predict", *inputs, "--url", served_url, "-m", UL_MODEL, "-o", str(output), "--draw", str(drawn),
        "--in-flight", "3", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    entries = json.loads(output.read_text())
    expected_names = [
        *(str(p) for p in sorted(folder.iterdir())),
        *(str(p) for p in sorted(shots.glob("*.jpg"))),
        *(f"{video}#{i}" for i in range(6)),
    ]
    assert [entry["image"] for entry in entries] == expected_names
    assert all((e["width"], e["height"]) == (640, 480) for e in entries[-6:])
    assert sum(len(e["detections"]) for e in entries) > 0
    for name in [*(p.name for p in folder.iterdir()), *(p.name for p in shots.glob("*.jpg"))]:
        assert (drawn / name).is_file()
    capture = cv2.VideoCapture(str(drawn / "clip.mp4"))
    frames = 0
    while capture.read()[0]:
        frames += 1
    capture.release()
    assert frames == 6

    coco_out = tmp_path / "coco.json"
    code, _, stderr = _run("predict", *inputs, "--url", served_url, "-o", str(coco_out), "--format", "coco")
    assert code == 0, stderr
    rows = json.loads(coco_out.read_text())
    per_image = [len(e["detections"]) for e in entries]
    assert len(rows) == sum(per_image)
    assert [row["image_id"] for row in rows] == [i + 1 for i, n in enumerate(per_image) for _ in range(n)]
    assert all(row["category_id"] == 1 and len(row["keypoints"]) == 51 and len(row["bbox"]) == 4 for row in rows)


def test_predict_refuses_an_empty_directory_and_a_glob_without_matches(tmp_path: Path) -> None:
    code, _, stderr = _run("predict", str(tmp_path), "-o", str(tmp_path / "o.json"))
    assert code == 2 and "holds no images" in stderr
    code, _, stderr = _run("predict", str(tmp_path / "*.jpg"), "-o", str(tmp_path / "o.json"))
    assert code == 2 and "no file matches" in stderr


def test_predict_without_output_prints_a_summary_per_image(served_url: str, photo_paths: list[Path]) -> None:
    """No -o: a readable block per image whose counts are those of the JSON results; -o - stays JSON."""
    photos = [p for p in photo_paths if p.name in {"bus.jpg", "zidane.jpg"}]
    code, stdout, stderr = _run("predict", *map(str, photos), "--url", served_url, "--model", UL_MODEL, "-o", "-")
    assert code == 0, stderr
    entries = json.loads(stdout)
    code, summary, stderr = _run("predict", *map(str, photos), "--url", served_url, "--model", UL_MODEL)
    assert code == 0, stderr
    for entry in entries:
        people = len(entry["detections"])
        header = (
            f"{entry['image']} ({entry['width']}x{entry['height']}): {people} {'person' if people == 1 else 'people'}"
        )
        assert header in summary.splitlines(), summary
        assert people >= 2
    assert sum(line.lstrip().startswith("#") for line in summary.splitlines()) == sum(
        len(entry["detections"]) for entry in entries
    )
    code, _, stderr = _run("predict", str(photos[0]), "--url", served_url, "--conf", "1.5")
    assert code == 2 and "conf must be in [0, 1], got 1.5" in stderr
