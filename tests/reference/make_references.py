"""Reference outputs from the upstream libraries themselves, for the parity tests.

Runs in the export environment (super-gradients, ultralytics, torch) and writes, per photo:
- super-gradients: its own preprocessing of the photo, the PyTorch network's raw outputs on
  it (rearranged to the candidate layout) in float32 and float64, and ``model.predict()``'s detections;
- Ultralytics: its own LetterBox of the photo, the PyTorch network's raw outputs in float32 and float64, and
  ``YOLO(static_onnx).predict()``'s detections on the cv2-decoded photo (the square 640x640 input the
  server uses; the tests send the same cv2-decoded pixels to the ``_pixels`` ensemble, so no JPEG decoder
  difference enters the comparison).

The float64 outputs are the exact result the parity bounds are measured from (``build_engines.parity.float32_noise``).

Usage: make_references.py --out DIR --photos P... [--sg-variant V --sg-checkpoint F]
                          [--ul-weights PT --ul-static-onnx F]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("YOLO_OFFLINE", "1")


def sg_references(variant: str, checkpoint: Path, photos: list[Path]) -> tuple[dict, dict]:
    import torch
    from PIL import Image
    from super_gradients.training import models
    from super_gradients.training.processing.processing import default_yolo_nas_pose_coco_processing_params

    model = models.get(variant, num_classes=17, checkpoint_path=str(checkpoint))
    model.set_dataset_processing_params(**default_yolo_nas_pose_coco_processing_params())
    model.eval()
    model_float64 = copy.deepcopy(model).double()
    processing = default_yolo_nas_pose_coco_processing_params()["image_processor"]
    arrays, detections = {}, {}
    for photo in photos:
        rgb = np.asarray(Image.open(photo).convert("RGB"))  # what predict() does with a path
        tensor, _ = processing.preprocess_image(rgb)
        arrays[f"sg_input/{photo.name}"] = tensor
        for name, network, dtype in (
            ("sg_candidates", model, np.float32),
            ("sg_candidates64", model_float64, np.float64),
        ):
            with torch.no_grad():
                boxes, scores, kpt_xy, kpt_conf = network(torch.from_numpy(tensor[None].astype(dtype)))[0]
            keypoints = torch.cat([kpt_xy, kpt_conf[..., None]], dim=-1).flatten(2)
            arrays[f"{name}/{photo.name}"] = torch.cat([boxes, scores, keypoints], dim=-1)[0].numpy()
        pred = model.predict(str(photo)).prediction  # super-gradients' own default thresholds
        detections[photo.name] = {
            "boxes": np.asarray(pred.bboxes_xyxy).tolist(),
            "scores": np.asarray(pred.scores).tolist(),
            "keypoints": np.asarray(pred.poses).tolist(),
        }
    return arrays, detections


def ultralytics_references(weights: Path, static_onnx: Path, photos: list[Path]) -> tuple[dict, dict]:
    import cv2
    import torch
    from ultralytics import YOLO
    from ultralytics.data.augment import LetterBox

    network = YOLO(str(weights)).model.float().eval()
    network_float64 = copy.deepcopy(network).double()
    onnx_model = YOLO(str(static_onnx), task="pose")
    arrays, detections = {}, {}
    for photo in photos:
        bgr = cv2.imread(str(photo))
        canvas = LetterBox((640, 640), auto=False)(image=bgr)
        tensor = np.ascontiguousarray(canvas[..., ::-1].transpose(2, 0, 1), dtype=np.float32) / 255
        arrays[f"ul_input/{photo.name}"] = tensor
        for name, model, dtype in (
            ("ul_candidates", network, np.float32),
            ("ul_candidates64", network_float64, np.float64),
        ):
            with torch.no_grad():
                raw = model(torch.from_numpy(tensor[None].astype(dtype)))[0][
                    0
                ].T  # [8400, 56] cx, cy, w, h, score, kpts
            xy, wh = raw[:, :2], raw[:, 2:4]
            arrays[f"{name}/{photo.name}"] = torch.cat([xy - wh / 2, xy + wh / 2, raw[:, 4:]], dim=1).numpy()
        result = onnx_model.predict(bgr, imgsz=640, verbose=False)[0]  # Ultralytics' own default thresholds
        detections[photo.name] = {
            "boxes": result.boxes.xyxy.numpy().tolist(),
            "scores": result.boxes.conf.numpy().tolist(),
            "keypoints": result.keypoints.data.numpy().tolist(),
        }
    return arrays, detections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--photos", type=Path, nargs="+", required=True)
    parser.add_argument("--sg-variant")
    parser.add_argument("--sg-checkpoint", type=Path)
    parser.add_argument("--ul-weights", type=Path)
    parser.add_argument("--ul-static-onnx", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    detections: dict[str, dict] = {}
    if args.sg_checkpoint:
        sg_arrays, detections["super_gradients"] = sg_references(args.sg_variant, args.sg_checkpoint, args.photos)
        arrays.update(sg_arrays)
    if args.ul_weights:
        ul_arrays, detections["ultralytics"] = ultralytics_references(args.ul_weights, args.ul_static_onnx, args.photos)
        arrays.update(ul_arrays)
    np.savez_compressed(args.out / "arrays.npz", **arrays)
    (args.out / "detections.json").write_text(json.dumps(detections))


if __name__ == "__main__":
    main()
