"""`posetriton eval` on a small annotated set built here from real photos and the served model's own poses.

Ground truth: yolo11n_pose's served detections (score >= 0.5) on the four real photos, with
each confident keypoint (conf >= 0.5) moved by a fixed offset of (+1.5, -1.0) px and marked
visible (v=2), the others unlabelled (v=0). The model then matches its "ground truth" closely
(AP high); the same annotations with every keypoint shifted by a quarter of the person's box
width must score low. The printed AP must equal pycocotools run directly on the same results.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from posetriton.client import ImagePoses, PoseClient, to_coco_results
from posetriton.client.cli import app
from posetriton.core.spec import COCO_KEYPOINT_NAMES, COCO_SKELETON
from tests.conftest import UL_MODEL

OFFSET = (1.5, -1.0)
AP_LINE = re.compile(r"Average Precision\s+\(AP\) @\[ IoU=0\.50:0\.95 \| area=\s+all \| maxDets=\s*20 \] = (-?[\d.]+)")


def _annotations(results: list[ImagePoses], files: list[str], shift_fraction: float = 0.0) -> dict[str, Any]:
    images, annotations = [], []
    for image_id, (result, name) in enumerate(zip(results, files, strict=True), start=1):
        images.append({"id": image_id, "file_name": name, "width": result.width, "height": result.height})
        for pose in result.poses:
            if pose.score < 0.5:
                continue
            x, y, w, h = pose.xywh
            dx, dy = OFFSET[0] + shift_fraction * w, OFFSET[1]
            flat: list[float] = []
            for px, py, conf in pose.keypoints:
                flat += [round(px + dx, 2), round(py + dy, 2), 2] if conf >= 0.5 else [0, 0, 0]
            visible = sum(1 for v in flat[2::3] if v)
            if visible:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                    "keypoints": flat, "num_keypoints": visible, "bbox": [x, y, w, h], "area": w * h,
                })  # fmt: skip
    categories = [{
        "id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_KEYPOINT_NAMES),
        "skeleton": [[i + 1, j + 1] for i, j in COCO_SKELETON],
    }]  # fmt: skip
    return {"images": images, "annotations": annotations, "categories": categories}


def _pycocotools_ap(annotations: dict[str, Any], detections: list[dict[str, Any]]) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = json.loads(json.dumps(annotations))
        truth.createIndex()
        evaluator = COCOeval(truth, truth.loadRes(detections), iouType="keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def _eval(served_url: str, annotations: Path, images: Path, *extra: str) -> tuple[int, str, str]:
    args = ["eval", "--annotations", str(annotations), "--images", str(images), "--url", served_url]
    result = CliRunner().invoke(app, [*args, "--model", UL_MODEL, "--no-progress", *extra])
    return result.exit_code, result.stdout, result.stderr


def test_eval_prints_pycocotools_ap_high_for_matching_and_low_for_shifted_truth(
    served_url: str, photo_paths: list[Path], tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    files = []
    for photo in photo_paths:
        shutil.copy(photo, images / photo.name)
        files.append(photo.name)
    with PoseClient(served_url, UL_MODEL) as client:
        truth_source = client.predict_batch(photo_paths)
        evaluated = client.predict_batch(photo_paths, conf=0.001)  # what eval sends, by default
    matching, shifted = _annotations(truth_source, files), _annotations(truth_source, files, shift_fraction=0.25)
    assert len(matching["annotations"]) >= 6, "the photos hold several confident people"
    detections = to_coco_results(evaluated, range(1, len(files) + 1))
    expected_high, expected_low = _pycocotools_ap(matching, detections), _pycocotools_ap(shifted, detections)

    printed = []
    for name, truth in (("matching", matching), ("shifted", shifted)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(truth))
        out = tmp_path / f"{name}_results.json"
        code, stdout, stderr = _eval(served_url, path, images, "--output-json", str(out))
        assert code == 0, stderr
        assert f"{UL_MODEL} on {len(files)} images" in stdout
        assert stdout.count("Average Precision") == 5 and stdout.count("Average Recall") == 5, stdout
        match = AP_LINE.search(stdout)
        assert match is not None, stdout
        printed.append(float(match.group(1)))
        written = json.loads(out.read_text())
        assert len(written) == len(detections)
        assert {(d["image_id"], round(d["score"], 3)) for d in written} == {
            (d["image_id"], round(d["score"], 3)) for d in detections
        }

    assert printed == [pytest.approx(expected_high, abs=1e-3), pytest.approx(expected_low, abs=1e-3)]
    assert expected_high > 0.8, expected_high
    assert expected_low < 0.2, expected_low


def test_eval_names_a_missing_image(served_url: str, tmp_path: Path) -> None:
    annotations = tmp_path / "a.json"
    annotations.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "absent.jpg"}], "annotations": [], "categories": []})
    )
    code, _, stderr = _eval(served_url, annotations, tmp_path)
    assert code == 1 and stderr == f"error: image 'absent.jpg' (id 1) is not in {tmp_path}\n"
