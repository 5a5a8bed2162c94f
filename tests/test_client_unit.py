"""The client without a server: result shapes, metadata parsing, inputs, drawing, CLI failure paths."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image
from typer.testing import CliRunner

from posetriton.client import (
    FailedImage,
    ImagePoses,
    InvalidInputError,
    ModelMetadata,
    Pose,
)
from posetriton.client.cli import _draw_targets, app
from posetriton.client.drawing import draw_poses, keypoint_color, load_image_rgb
from posetriton.client.grpc_client import encode_image, parse_grpc_url, request_parameters
from posetriton.client.results import MetadataError, poses_from_batch
from posetriton.core.contract import Thresholds
from posetriton.server.launcher import free_port

K = 17


def _jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    image = Image.new("RGB", (width, height), (90, 120, 150))
    buffer = io.BytesIO()
    if orientation is None:
        image.save(buffer, "JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def _outputs(counts: list[int], rows: int) -> dict[str, NDArray[Any]]:
    """Padded outputs as the server sends them: image i has counts[i] real rows, then zeros."""
    batch = len(counts)
    boxes = np.zeros((batch, rows, 4), np.float32)
    scores = np.zeros((batch, rows), np.float32)
    keypoints = np.zeros((batch, rows, K, 3), np.float32)
    for i, count in enumerate(counts):
        for j in range(count):
            boxes[i, j] = (10 * j, 20, 10 * j + 50, 120)
            scores[i, j] = 0.9 - 0.1 * j
            keypoints[i, j, :, 0] = np.arange(K) + 10 * j
            keypoints[i, j, :, 1] = 50
            keypoints[i, j, :, 2] = 0.75
    return {
        "NUM_DETECTIONS": np.array([[c] for c in counts], np.int32),
        "BOXES": boxes,
        "SCORES": scores,
        "KEYPOINTS": keypoints,
        "IMAGE_SIZE": np.array([[10 * (i + 1), 10 * (i + 1)] for i in range(batch)], np.int32),
    }


def _pose(box: tuple[float, float, float, float], point: tuple[float, float], conf: float = 0.9) -> Pose:
    return Pose(box=box, score=0.87, keypoints=tuple((point[0], point[1], conf) for _ in range(K)))


# --- results ---------------------------------------------------------------------------------


def test_to_dict_has_the_documented_json_shape_with_plain_floats() -> None:
    outputs = _outputs([1], rows=1)
    result = ImagePoses.from_outputs("a.jpg", 640, 480, *(outputs[n][0] for n in list(outputs)[:4]))
    data = result.to_dict()
    assert list(data) == ["image", "width", "height", "detections"]
    assert (data["image"], data["width"], data["height"]) == ("a.jpg", 640, 480)
    (detection,) = data["detections"]
    assert list(detection) == ["box", "score", "keypoints"]
    assert detection["box"] == [0.0, 20.0, 50.0, 120.0]
    assert len(detection["keypoints"]) == K and all(len(point) == 3 for point in detection["keypoints"])
    values = [*detection["box"], detection["score"], *(v for point in detection["keypoints"] for v in point)]
    assert all(type(v) is float for v in values)
    assert json.loads(json.dumps(data)) == data


def test_padding_rows_are_dropped_and_order_kept() -> None:
    results = poses_from_batch(["a", "b", "c"], _outputs([2, 0, 3], rows=3))
    assert [r.image for r in results] == ["a", "b", "c"]
    assert [(r.width, r.height) for r in results] == [(10, 10), (20, 20), (30, 30)], "sizes come from IMAGE_SIZE"
    assert [len(r.poses) for r in results] == [2, 0, 3]
    assert [round(p.score, 2) for p in results[2].poses] == [0.9, 0.8, 0.7]


def test_inconsistent_outputs_are_refused() -> None:
    outputs = _outputs([2], rows=2)
    rows = [outputs[n][0] for n in ("BOXES", "SCORES", "KEYPOINTS")]
    with pytest.raises(ValueError, match="NUM_DETECTIONS is 3"):
        ImagePoses.from_outputs("a", 1, 1, np.array([3]), *rows)
    with pytest.raises(ValueError, match="inconsistent output shapes"):
        ImagePoses.from_outputs("a", 1, 1, 1, rows[0], rows[1][:1], rows[2])
    with pytest.raises(ValueError, match="sent 2 images"):
        poses_from_batch(["a", "b"], outputs)


def test_failed_image_keeps_the_result_shape() -> None:
    assert FailedImage("x.jpg", "not a recognised image").to_dict() == {
        "image": "x.jpg",
        "width": None,
        "height": None,
        "detections": [],
        "error": "not a recognised image",
    }


def _config(**parameters: str) -> dict[str, Any]:
    return {
        "name": "m",
        "max_batch_size": 32,
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
    }


def test_metadata_is_parsed_from_config_parameters() -> None:
    names = ["a", "b", "c"]
    meta = ModelMetadata.from_config(
        _config(
            keypoint_names=json.dumps(names), skeleton="[[0, 1], [1, 2]]", family="f", **{"default.max_det_limit": "7"}
        )
    )
    assert meta.keypoint_names == ("a", "b", "c") and meta.skeleton == ((0, 1), (1, 2))
    assert (meta.max_batch_size, meta.family, meta.max_det_limit) == (32, "f", 7)
    coco = ModelMetadata.from_config(_config())
    assert coco.keypoint_names[:2] == ("nose", "left_eye") and len(coco.keypoint_names) == 17
    assert len(coco.skeleton) == 19, "a model without metadata gets the COCO person layout"


@pytest.mark.parametrize(
    "parameters",
    [
        {"keypoint_names": "__import__('os').getcwd()"},  # parsed as JSON, never evaluated
        {"keypoint_names": '["a", 1]'},
        {"skeleton": "[[0, 1, 2]]"},
        {"skeleton": "[[0, 17]]"},
        {"skeleton": '{"a": 1}'},
    ],
)
def test_malformed_metadata_is_refused(parameters: dict[str, str]) -> None:
    with pytest.raises(MetadataError):
        ModelMetadata.from_config(_config(**parameters))


# --- inputs ----------------------------------------------------------------------------------


def test_results_are_arrays_with_cheap_views() -> None:
    outputs = _outputs([3], rows=4)
    result = ImagePoses.from_outputs("a.jpg", 200, 100, *(outputs[n][0] for n in list(outputs)[:4]))
    assert len(result) == 3 and result.boxes.shape == (3, 4) and result.keypoints.shape == (3, K, 3)
    assert np.shares_memory(result.xy, result.keypoints) and np.shares_memory(result.conf, result.keypoints)
    np.testing.assert_allclose(result.xyn[0, :, 0], (np.arange(K) + 0) / 200)
    np.testing.assert_allclose(result.xyn[..., 1], 0.5)
    assert "poses" not in vars(result), "per-pose objects are made only when asked for"
    assert result.poses[1].box == (10.0, 20.0, 60.0, 120.0) and "poses" in vars(result)
    with pytest.raises(ValueError):
        result.boxes[0, 0] = 5.0  # results are values
    assert result == ImagePoses.from_poses("a.jpg", 200, 100, result.poses)
    assert result.renamed("frame 7").image == "frame 7"


def test_drawing_loads_the_image_upright_like_the_server() -> None:
    data = _jpeg(64, 32, orientation=6)
    assert load_image_rgb(data).shape == (64, 32, 3)


def test_unreadable_inputs_name_the_image(tmp_path: Path) -> None:
    """Encoded bytes travel unread (the server judges them); a file that cannot be read fails here."""
    assert encode_image(b"hello world", index=4).data == b"hello world"
    missing = tmp_path / "missing.jpg"
    with pytest.raises(InvalidInputError, match="cannot read the file") as caught:
        encode_image(missing)
    assert caught.value.image == str(missing)
    path = tmp_path / "ok.jpg"
    path.write_bytes(_jpeg(8, 6))
    assert (encode_image(path).name, encode_image(path).data) == (str(path), path.read_bytes())


def test_request_parameters_are_checked_before_sending() -> None:
    assert request_parameters(None, None, None) == {}
    assert request_parameters(0.3, 0.6, 50) == {"conf": 0.3, "iou": 0.6, "max_det": 50}
    assert request_parameters(iou=0.5, thresholds=Thresholds(conf=0.2, iou=0.9)) == {"conf": 0.2, "iou": 0.5}
    for conf, iou, max_det in ((1.5, None, None), (None, -0.1, None), (None, None, 0), (None, None, 2.5)):
        with pytest.raises(ValueError):
            request_parameters(conf, iou, max_det)


@pytest.mark.parametrize(("url", "target"), [("127.0.0.1:8001", "127.0.0.1:8001"), ("grpc://host:9", "host:9")])
def test_grpc_urls(url: str, target: str) -> None:
    assert parse_grpc_url(url) == target


@pytest.mark.parametrize("url", ["localhost", "http://localhost:8000", "host:99999", "a b:1"])
def test_bad_grpc_urls(url: str) -> None:
    with pytest.raises(ValueError):
        parse_grpc_url(url)


# --- drawing ---------------------------------------------------------------------------------


def test_drawing_marks_the_pose_and_nothing_far_from_it() -> None:
    image = np.full((200, 300, 3), 40, np.uint8)
    pose = _pose((50.0, 60.0, 150.0, 180.0), (100.0, 120.0))
    drawn = draw_poses(image, [pose], [(0, 1), (1, 2)])
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert (image == 40).all(), "the input must not be modified"
    changed = (drawn != image).any(axis=2)
    assert changed[60, 50:150].any() and changed[115:125, 95:105].any()  # box edge, keypoint
    assert not changed[190:, 250:].any()


def test_keypoints_under_the_threshold_are_not_drawn() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    pose = Pose(box=(float("nan"),) * 4, score=0.5, keypoints=((30.0, 30.0, 0.2), (70.0, 70.0, 0.9)))
    drawn = draw_poses(image, [pose], [(0, 1)], kpt_threshold=0.5)
    assert not drawn[25:35, 25:35].any() and drawn[68:72, 68:72].any()
    assert not drawn[48:52, 48:52].any(), "a limb to a hidden keypoint must not be drawn"


def test_keypoint_colour_runs_from_red_to_green() -> None:
    low, high = keypoint_color(0.5, 0.5), keypoint_color(1.0, 0.5)
    assert low[0] > low[1] and high[1] > high[0]


def test_draw_targets_never_collide_or_overwrite_inputs(tmp_path: Path) -> None:
    images = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", tmp_path / "c.tiff"]
    out = tmp_path / "out"
    assert [p.name for p in _draw_targets(images, out)] == ["x.jpg", "x_1.jpg", "c.png"]
    assert out.is_dir()


# --- CLI failure paths -----------------------------------------------------------------------


def test_cli_reports_an_unreachable_server_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(_jpeg(8, 8))
    output = tmp_path / "out.json"
    args = ["predict", str(image), "--url", f"127.0.0.1:{free_port()}", "--output-json", str(output)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach Triton") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output and not output.exists()


def test_cli_refuses_a_url_that_is_not_host_port(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["predict", "a.jpg", "--url", "http://localhost:8000", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
