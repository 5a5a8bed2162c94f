"""What each step checks on the tensors it receives, before any work: every model of the repository is a
public endpoint (Triton answers any client on its port, the internal steps included).

Pure numpy, no Triton: the steps (``posetriton.server.steps``), the tests and a client that wants to check what it
sends share these functions. Each raises :class:`~posetriton.core.contract.ContractError` naming the first problem;
the step turns it into INVALID_ARGUMENT for that request alone. The bounds keep the cost of one request
bounded: counts never exceed what the step's own model could have produced, and every value that reaches a
geometric computation (NMS, the Kalman filter, Norfair's distances) is finite.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from posetriton.core.contract import LETTERBOX_WIDTH, ContractError

# Step-config parameters (written by posetriton.server.repository) that carry the bounds the checks need.
INPUT_SIZE_PARAMETER = "input_size"  # steps finishing the poses: the canvas their letterbox rows refer to

# IMAGE_SIZE travels as INT32: an original side must fit it.
MAX_IMAGE_SIDE = 2**31 - 1
# Frame indices stay exact in float64 (Norfair's and the Kalman filter's arithmetic) below 2**53.
MAX_FRAME_INDEX = 2**53 - 1
# The largest forward jump of the frame index between two frames of one stream. A stream silent for longer
# than the tracker's idle limit (10 s) is freed anyway, and 100,000 frames in 10 s is 10,000 fps: no real
# source skips that many. A larger jump is a client bug or a probe, refused rather than fed to the tracker.
MAX_FRAME_GAP = 100_000


def _shape(array: NDArray[Any]) -> list[int]:
    return [int(d) for d in array.shape]


def count_non_finite(array: NDArray[Any]) -> int:
    """How many entries are NaN or infinite (0 for integer arrays)."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_finite(name: str, array: NDArray[Any]) -> None:
    bad = count_non_finite(array)
    if bad:
        raise ContractError(f"{name} holds {bad} NaN or infinite value(s); every value must be finite")


def check_letterbox_rows(rows: NDArray[Any], input_size: int) -> None:
    """``letterbox`` FP64 ``[B, 6]``: ``scale_x, scale_y, pad_x, pad_y, width, height`` per image, as the
    preprocess step writes them: finite positive scales, whole pads inside the canvas, whole positive sides
    that fit INT32, and a resized image (side x scale) no larger than the canvas."""
    if rows.ndim != 2 or rows.shape[1] != LETTERBOX_WIDTH:
        raise ContractError(f"letterbox must be [B, {LETTERBOX_WIDTH}], got {_shape(rows)}")
    check_finite("letterbox", rows)
    for i, (scale_x, scale_y, pad_x, pad_y, width, height) in enumerate(rows.astype(np.float64)):
        where = f"letterbox row {i}"
        if not (scale_x > 0 and scale_y > 0):
            raise ContractError(f"{where}: scales must be positive, got {scale_x:g}, {scale_y:g}")
        for label, pad in (("pad_x", pad_x), ("pad_y", pad_y)):
            if pad != int(pad) or not 0 <= pad < input_size:
                raise ContractError(f"{where}: {label} must be a whole number in [0, {input_size}), got {pad:g}")
        for label, side in (("width", width), ("height", height)):
            if side != int(side) or not 1 <= side <= MAX_IMAGE_SIDE:
                raise ContractError(f"{where}: {label} must be a whole number in [1, {MAX_IMAGE_SIDE}], got {side:g}")
        # The resized image fits the canvas (one pixel of rounding allowed on each side).
        if width * scale_x > input_size + 1 or height * scale_y > input_size + 1:
            raise ContractError(
                f"{where}: a {width:g}x{height:g} image scaled by {scale_x:g}, {scale_y:g} does not fit the "
                f"{input_size}x{input_size} network input"
            )


def check_candidates(candidates: NDArray[Any], letterbox_rows: NDArray[Any], rows: int, width: int) -> None:
    """``candidates`` FP32 ``[B, rows, width]`` and one letterbox row per image; every value finite."""
    if candidates.ndim != 3 or candidates.shape[1:] != (rows, width):
        raise ContractError(f"candidates must be [B, {rows}, {width}], got {_shape(candidates)}")
    if len(candidates) != len(letterbox_rows):
        raise ContractError(
            f"candidates holds {len(candidates)} image(s) but letterbox {len(letterbox_rows)}; one row per image"
        )
    check_finite("candidates", candidates)


def check_detections(
    num_detections: NDArray[Any],
    boxes: NDArray[Any],
    scores: NDArray[Any],
    keypoints: NDArray[Any],
    *,
    max_detections: int,
    num_keypoints: int,
) -> int:
    """One frame's poses as the postprocess step outputs them (batch of one): ``NUM_DETECTIONS [1, 1]``,
    ``BOXES [1, N, 4]``, ``SCORES [1, N]``, ``KEYPOINTS [1, N, K, 3]``, with ``N <= max_detections`` (what
    the postprocess step can produce) and ``NUM_DETECTIONS`` in ``[0, N]``. The rows counted are finite.
    Returns ``NUM_DETECTIONS``."""
    if num_detections.size != 1:
        raise ContractError(f"a tracked request carries one frame, got NUM_DETECTIONS {_shape(num_detections)}")
    if (
        boxes.ndim != 3
        or scores.ndim != 2
        or keypoints.ndim != 4
        or not len(boxes) == len(scores) == len(keypoints) == 1
    ):
        raise ContractError(
            f"a tracked request carries one frame: BOXES [1, N, 4], SCORES [1, N], KEYPOINTS [1, N, {num_keypoints}, "
            f"3]; got {_shape(boxes)}, {_shape(scores)}, {_shape(keypoints)}"
        )
    rows = boxes.shape[1]
    if boxes.shape[2] != 4 or scores.shape[1] != rows or keypoints.shape[1:] != (rows, num_keypoints, 3):
        raise ContractError(
            f"inconsistent detections: BOXES {_shape(boxes)}, SCORES {_shape(scores)}, KEYPOINTS {_shape(keypoints)} "
            f"(expected [1, N, 4], [1, N], [1, N, {num_keypoints}, 3])"
        )
    if rows > max_detections:
        raise ContractError(f"{rows} detection rows in one frame; the tracker takes at most {max_detections}")
    count = int(num_detections.reshape(-1)[0])
    if not 0 <= count <= rows:
        raise ContractError(f"NUM_DETECTIONS is {count} but the frame carries {rows} detection rows")
    for name, array in (("BOXES", boxes), ("SCORES", scores), ("KEYPOINTS", keypoints)):
        check_finite(name, array[0, :count])
    return count


def check_frame_index(frame_index: int, last_frame: int | None, max_gap: int = MAX_FRAME_GAP) -> None:
    """A frame index in ``[0, MAX_FRAME_INDEX]`` that moves forward by at most ``max_gap`` frames from the
    stream's last one (older frames are fine: they overtook another inside the server)."""
    if not 0 <= frame_index <= MAX_FRAME_INDEX:
        raise ContractError(f"FRAME_INDEX must be in [0, 2**53), got {frame_index}")
    if last_frame is not None and frame_index - last_frame > max_gap:
        raise ContractError(
            f"FRAME_INDEX jumps from {last_frame} to {frame_index}, more than {max_gap} frames ahead; a source that "
            "skipped that many frames starts a new sequence"
        )


def check_request_pixels(sizes: list[tuple[int, int]], budget: int) -> None:
    """The decode budget of one request: the pixels of all its images together (``(width, height)`` each, as
    their headers declare) may not exceed ``budget``; each image is also held to the per-image limit."""
    total = sum(w * h for w, h in sizes)
    if total > budget:
        raise ContractError(
            f"the request's {len(sizes)} image(s) decode to {total:,} pixels together, over the per-request budget "
            f"of {budget:,}; send fewer or smaller images per request"
        )
