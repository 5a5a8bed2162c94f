"""Letterbox real photos into network inputs for the export parity checks.

The parity checks compare ONNX Runtime with PyTorch on the inputs each family really sees, so the
letterbox here follows the family's own reference pipeline: super-gradients for YOLO-NAS Pose (BGR,
longest side to 640, pad bottom-right with 127) and Ultralytics (RGB, same resize, pad centred with
114 using its -0.1 rounding). Sizes use Python's ``round`` as both references do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import cv2
import numpy as np

Family = Literal["yolo_nas_pose", "ultralytics"]

INPUT_SIZE = 640
PAD_VALUES: dict[Family, int] = {"yolo_nas_pose": 127, "ultralytics": 114}


def read_bgr(path: Path) -> np.ndarray:
    """Read a photo as HWC uint8 BGR, failing loudly instead of returning ``None`` as cv2 does."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return image


def letterbox(image: np.ndarray, family: Family, size: int = INPUT_SIZE) -> np.ndarray:
    """Resize an HWC image so its longest side is ``size`` (cv2 bilinear) and pad it to a square canvas."""
    height, width = image.shape[:2]
    scale = min(size / height, size / width)
    new_w, new_h = round(width * scale), round(height * scale)
    if (new_w, new_h) != (width, height):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if family == "ultralytics":
        left, top = round((size - new_w) / 2 - 0.1), round((size - new_h) / 2 - 0.1)
    else:
        left, top = 0, 0
    canvas = np.full((size, size, 3), PAD_VALUES[family], dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = image
    return canvas


def network_input(path: Path, family: Family) -> np.ndarray:
    """One photo -> ``[1, 3, S, S]`` float32 in [0, 1], channels in the order the family was trained on."""
    canvas = letterbox(read_bgr(path), family)
    if family == "ultralytics":
        canvas = canvas[..., ::-1]  # BGR -> RGB
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32) / np.float32(255.0)


def network_batch(paths: list[Path], family: Family) -> np.ndarray:
    """Several photos letterboxed into one ``[B, 3, S, S]`` batch (exercises a dynamic batch dimension)."""
    return np.concatenate([network_input(path, family) for path in paths], axis=0)
