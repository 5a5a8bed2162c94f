"""Pure numpy geometry shared by the server models, the client and the tests.

Every served network outputs one candidate tensor per image, ``[k, 5 + 3 * K]`` (the best ``k``
anchors by person score, see :mod:`posetriton.core.contract`): ``x1, y1, x2, y2, person_score`` then
``K`` keypoints as ``(x, y, confidence)``, all in network-input pixels. The export step rewrites
each family's raw heads into this layout, so the functions below serve every family; the
family's own rules come from the specs.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from posetriton.core.contract import BOX_SCORE_COLUMNS, LETTERBOX_WIDTH, SCORE_COLUMN, Thresholds
from posetriton.core.spec import LetterboxSpec, PostprocessSpec


@dataclass(frozen=True)
class LetterboxTransform:
    """What maps network-input pixels back to the original image: ``orig = (net - pad) / scale``."""

    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int
    width: int
    height: int

    def to_array(self) -> np.ndarray:
        row = np.array([self.scale_x, self.scale_y, self.pad_x, self.pad_y, self.width, self.height], dtype=np.float64)
        assert row.shape == (LETTERBOX_WIDTH,)
        return row

    @classmethod
    def from_array(cls, row: np.ndarray) -> LetterboxTransform:
        scale_x, scale_y, pad_x, pad_y, width, height = (float(v) for v in row)
        return cls(scale_x, scale_y, int(pad_x), int(pad_y), int(width), int(height))

    def for_original(self, width: int, height: int) -> LetterboxTransform:
        """The same placement, mapping back to an original of ``width x height`` of which the letterboxed image
        was a reduced decode (libjpeg DCT scaling): the scales absorb the reduction per axis."""
        return LetterboxTransform(
            self.scale_x * self.width / width,
            self.scale_y * self.height / height,
            self.pad_x,
            self.pad_y,
            width,
            height,
        )


def letterbox_geometry(height: int, width: int, spec: LetterboxSpec) -> tuple[int, int, LetterboxTransform]:
    """``(new_w, new_h, transform)``: the resized size and the placement of an image in the network input.

    Matches super-gradients (``round`` half-to-even sizes, pad bottom-right) and Ultralytics (same
    resize, pad split around the centre with its -0.1/+0.1 rounding). Small images are upscaled,
    as both references do; a side never shrinks below one pixel. Shared by the CPU letterbox below
    and the GPU one (posetriton.server.steps.gpu_preprocess).
    """
    size = spec.input_size
    scale = min(size / height, size / width)
    new_w, new_h = max(round(width * scale), 1), max(round(height * scale), 1)
    if spec.pad_position == "center":
        dw, dh = (size - new_w) / 2, (size - new_h) / 2
        left, top = round(dw - 0.1), round(dh - 0.1)
    else:
        left, top = 0, 0
    if spec.per_axis_scale:
        scale_x, scale_y = new_w / width, new_h / height
    else:
        scale_x = scale_y = scale
    return new_w, new_h, LetterboxTransform(scale_x, scale_y, left, top, width, height)


def letterbox(
    image: np.ndarray, spec: LetterboxSpec, out: np.ndarray | None = None
) -> tuple[np.ndarray, LetterboxTransform]:
    """Resize an HWC uint8 image (cv2 bilinear, as both references) and pad it to the square network input.

    The resized image is written straight into the canvas (``out``, a ``[S, S, 3]`` uint8 slot of a batch, or
    a new array), so no intermediate resized copy is made.
    """
    height, width = image.shape[:2]
    new_w, new_h, transform = letterbox_geometry(height, width, spec)
    size = spec.input_size
    canvas = np.empty((size, size, 3), dtype=np.uint8) if out is None else out
    if canvas.shape != (size, size, 3) or canvas.dtype != np.uint8:
        raise ValueError(f"canvas must be [{size}, {size}, 3] uint8, got {list(canvas.shape)} {canvas.dtype}")
    top, left = transform.pad_y, transform.pad_x
    # Pad only the borders; the image area is overwritten below.
    canvas[:top] = spec.pad_value
    canvas[top + new_h :] = spec.pad_value
    canvas[top : top + new_h, :left] = spec.pad_value
    canvas[top : top + new_h, left + new_w :] = spec.pad_value
    target = canvas[top : top + new_h, left : left + new_w]
    if (new_w, new_h) == (width, height):
        target[...] = image
    else:
        resized = cv2.resize(image, (new_w, new_h), dst=target, interpolation=cv2.INTER_LINEAR)
        if resized is not target and not np.shares_memory(resized, target):  # cv2 could not write in place
            target[...] = resized
    return canvas, transform


def to_network_input(canvases: np.ndarray, spec: LetterboxSpec) -> np.ndarray:
    """Letterboxed RGB canvases ``[B, S, S, 3]`` uint8 -> the family's float input ``[B, 3, S, S]`` in [0, 1].

    The served graphs do this themselves (the export prepends it); this is the reference the export checks
    the prepended ops against, and what the PyTorch references are fed.
    """
    if spec.channel_order == "BGR":
        canvases = canvases[..., ::-1]
    batch = np.ascontiguousarray(canvases.transpose(0, 3, 1, 2), dtype=np.float32)
    batch /= 255.0
    return batch


@dataclass(frozen=True)
class Poses:
    """Detections of one image: ``boxes [N, 4]`` xyxy, ``scores [N]``, ``keypoints [N, K, 3]`` (x, y, conf)."""

    boxes: np.ndarray
    scores: np.ndarray
    keypoints: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy class-agnostic NMS; returns kept indices in descending score order (as torchvision)."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        inter_w = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        inter_h = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = inter_w * inter_h
        union = areas[best] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def select_poses(candidates: np.ndarray, spec: PostprocessSpec, thresholds: Thresholds | None = None) -> Poses:
    """Score threshold -> top-k -> NMS -> first ``max_det`` on one image's ``[k, 5 + 3K]`` candidates.

    ``thresholds`` overrides the spec's defaults value by value (a request's conf / iou / max_det).
    """
    chosen = (thresholds or Thresholds()).or_defaults(spec.thresholds)
    assert chosen.conf is not None and chosen.iou is not None and chosen.max_det is not None
    kept = candidates[candidates[:, SCORE_COLUMN] >= chosen.conf]
    if len(kept) > spec.pre_nms_topk:
        kept = kept[np.argsort(-kept[:, SCORE_COLUMN], kind="stable")[: spec.pre_nms_topk]]
    kept = kept[nms(kept[:, :4], kept[:, SCORE_COLUMN], chosen.iou)[: chosen.max_det]]
    return Poses(
        boxes=kept[:, :4].astype(np.float32),
        scores=kept[:, SCORE_COLUMN].astype(np.float32),
        keypoints=kept[:, BOX_SCORE_COLUMNS:].reshape(len(kept), spec.num_keypoints, 3).astype(np.float32),
    )


def to_original(poses: Poses, transform: LetterboxTransform, clip: bool) -> Poses:
    """Map boxes and keypoints from network-input pixels to original-image pixels."""
    offset = np.array([transform.pad_x, transform.pad_y], dtype=np.float64)
    scale = np.array([transform.scale_x, transform.scale_y], dtype=np.float64)
    boxes = ((poses.boxes.reshape(-1, 2, 2) - offset) / scale).reshape(-1, 4)
    keypoints = poses.keypoints.astype(np.float64)
    keypoints[..., :2] = (keypoints[..., :2] - offset) / scale
    if clip:
        limits = np.array([transform.width, transform.height], dtype=np.float32)
        boxes = np.clip(boxes.reshape(-1, 2, 2), 0, limits).reshape(-1, 4)
        keypoints[..., :2] = np.clip(keypoints[..., :2], 0, limits)
    return Poses(boxes=boxes.astype(np.float32), scores=poses.scores, keypoints=keypoints.astype(np.float32))


def postprocess(
    candidates: np.ndarray, transform: LetterboxTransform, spec: PostprocessSpec, thresholds: Thresholds | None = None
) -> Poses:
    """One image's candidates -> poses in original-image pixels."""
    return to_original(select_poses(candidates, spec, thresholds), transform, spec.clip_to_image)
