"""The shared numpy geometry: letterbox, NMS, selection and mapping back, against independent oracles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posetriton.core.contract import ContractError, Thresholds
from posetriton.core.processing import (
    LetterboxTransform,
    Poses,
    letterbox,
    nms,
    select_poses,
    to_network_input,
    to_original,
)
from posetriton.core.spec import LetterboxSpec, PostprocessSpec

SG = LetterboxSpec(channel_order="BGR", pad_position="bottom_right", pad_value=127)
UL = LetterboxSpec(channel_order="RGB", pad_position="center", pad_value=114, per_axis_scale=True)


def naive_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Textbook O(n^2) NMS: visit boxes best first, keep one unless it overlaps a kept box too much."""
    kept: list[int] = []
    for i in sorted(range(len(scores)), key=lambda k: (-scores[k], k)):
        ok = True
        for j in kept:
            ix = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            iy = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            inter = ix * iy
            area_i = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            area_j = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
            if inter / (area_i + area_j - inter) > threshold:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 500, (n, 2))
    wh = rng.uniform(5, 150, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_textbook_nms(seed: int, threshold: float) -> None:
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 60)
    scores = rng.uniform(0, 1, 60).astype(np.float32)
    assert nms(boxes, scores, threshold).tolist() == naive_nms(boxes, scores, threshold)


def test_nms_suppresses_duplicates_and_keeps_separate_boxes() -> None:
    boxes = np.array([[0, 0, 100, 100], [2, 2, 101, 101], [300, 300, 400, 400]], np.float32)
    scores = np.array([0.8, 0.9, 0.7], np.float32)
    assert nms(boxes, scores, 0.7).tolist() == [1, 2]
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.7).tolist() == []


@settings(max_examples=200, deadline=None)
@given(
    width=st.integers(1, 3000),
    height=st.integers(1, 3000),
    spec=st.sampled_from([SG, UL]),
)
def test_letterbox_places_the_image_and_maps_back(width: int, height: int, spec: LetterboxSpec) -> None:
    image = np.full((height, width, 3), 200, np.uint8)
    canvas, t = letterbox(image, spec)
    assert canvas.shape == (640, 640, 3)
    content = np.argwhere(canvas[..., 0] == 200)
    (top, left), (bottom, right) = content.min(0), content.max(0) + 1
    assert (left, top) == (t.pad_x, t.pad_y)
    assert max(bottom - top, right - left) == 640  # the longest side fills the input
    assert (canvas == 200).sum() + (canvas == spec.pad_value).sum() == canvas.size
    if spec.pad_position == "bottom_right":
        assert (t.pad_x, t.pad_y) == (0, 0)
    else:  # centred: the two pads differ by at most one pixel
        assert abs(t.pad_x - (640 - right)) <= 1 and abs(t.pad_y - (640 - bottom)) <= 1
    # The content's far corner maps back to the original image's corner: exactly with per-axis
    # scales, within the resize's rounding (half a resized pixel) with one scale.
    corner = Poses(
        np.array([[left, top, right, bottom]], np.float32), np.ones(1, np.float32), np.zeros((1, 17, 3), np.float32)
    )
    mapped = to_original(corner, t, clip=False).boxes[0]
    if spec.per_axis_scale:
        np.testing.assert_allclose(mapped, [0, 0, width, height], atol=1e-3)
    else:
        rounding = [max(0.5, abs(n - size * t.scale_x)) / t.scale_x for n, size in ((right, width), (bottom, height))]
        np.testing.assert_allclose(mapped[:2], [0, 0], atol=1e-3)
        assert abs(mapped[2] - width) <= rounding[0] + 1e-3 and abs(mapped[3] - height) <= rounding[1] + 1e-3


def test_to_network_input_orders_channels_and_scales() -> None:
    canvas = np.zeros((1, 640, 640, 3), np.uint8)
    canvas[..., 0], canvas[..., 2] = 255, 51  # R, B
    bgr = to_network_input(canvas, SG)
    rgb = to_network_input(canvas, UL)
    assert bgr.shape == rgb.shape == (1, 3, 640, 640) and bgr.dtype == np.float32
    assert bgr[0, 0, 0, 0] == pytest.approx(0.2) and bgr[0, 2, 0, 0] == 1.0
    assert rgb[0, 0, 0, 0] == 1.0 and rgb[0, 2, 0, 0] == pytest.approx(0.2)


def candidates_from(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    keypoints = np.repeat(boxes[:, None, :2], 17, axis=1)
    kpts = np.concatenate([keypoints, np.full((len(boxes), 17, 1), 0.9, np.float32)], axis=2).reshape(len(boxes), -1)
    return np.concatenate([boxes, scores[:, None], kpts], axis=1).astype(np.float32)


def test_select_poses_threshold_topk_nms_and_max_det() -> None:
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, 500)
    scores = rng.uniform(0, 1, 500).astype(np.float32)
    spec = PostprocessSpec(conf=0.5, iou=0.7, max_det=100, pre_nms_topk=50)
    poses = select_poses(candidates_from(boxes, scores), spec)
    top = np.argsort(-scores)[:50]
    expected = top[naive_nms(boxes[top], scores[top], 0.7)]
    np.testing.assert_array_equal(poses.scores, scores[expected])
    np.testing.assert_array_equal(poses.keypoints[:, :, :2], np.repeat(boxes[expected, None, :2], 17, axis=1))
    assert len(select_poses(candidates_from(boxes, scores), spec, Thresholds(max_det=3))) == 3
    assert len(select_poses(candidates_from(boxes, scores), spec, Thresholds(conf=1.0))) == 0
    assert np.all(select_poses(candidates_from(boxes, scores), spec, Thresholds(conf=0.9)).scores >= 0.9)


def test_to_original_clips_only_when_asked() -> None:
    t = LetterboxTransform(scale_x=0.5, scale_y=0.5, pad_x=0, pad_y=80, width=1280, height=960)
    poses = Poses(
        np.array([[-10, 70, 700, 600]], np.float32), np.ones(1, np.float32), np.full((1, 17, 3), 650, np.float32)
    )
    raw = to_original(poses, t, clip=False)
    np.testing.assert_allclose(raw.boxes[0], [-20, -20, 1400, 1040])
    clipped = to_original(poses, t, clip=True)
    np.testing.assert_allclose(clipped.boxes[0], [0, 0, 1280, 960])
    np.testing.assert_allclose(clipped.keypoints[0, 0], [1280, 960, 650])  # confidence untouched


def test_letterbox_writes_into_a_batch_slot_without_touching_the_others() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    batch = np.full((2, 640, 640, 3), 7, np.uint8)
    canvas, transform = letterbox(image, UL, out=batch[1])
    assert np.shares_memory(canvas, batch)
    expected, expected_transform = letterbox(image, UL)
    np.testing.assert_array_equal(batch[1], expected)
    assert transform == expected_transform
    assert (batch[0] == 7).all()


def test_transform_for_a_reduced_decode_maps_back_to_the_original() -> None:
    _, transform = letterbox(np.zeros((540, 960, 3), np.uint8), SG)  # a 1/2-scale decode of 1920x1080
    original = transform.for_original(1920, 1080)
    point = np.array([[320.0, 180.0]])
    poses = Poses(np.array([[0, 0, 320, 180]], np.float32), np.ones(1, np.float32), np.zeros((1, 17, 3), np.float32))
    mapped = to_original(poses, original, clip=False)
    np.testing.assert_allclose(mapped.boxes[0, 2:], point[0] * 3, rtol=1e-6)  # 640/1920 is the overall scale
    assert (original.width, original.height) == (1920, 1080)


def test_thresholds_round_trip_and_one_validation() -> None:
    chosen = Thresholds(conf=0.3, max_det=5)
    assert chosen.to_parameters() == {"conf": 0.3, "max_det": 5}
    assert Thresholds.from_parameters(chosen.to_parameters()) == chosen
    assert chosen.or_defaults(Thresholds(0.5, 0.7, 100)) == Thresholds(0.3, 0.7, 5)
    for bad, message in [
        ({"conf": 1.5}, "conf must be in [0, 1]"),
        ({"max_det": 2.5}, "max_det must be an integer"),
        ({"iou": "x"}, "iou must be a number"),
        ({"confidence": 0.1}, "unknown request parameter(s) ['confidence']"),
    ]:
        with pytest.raises(ContractError) as info:
            Thresholds.from_parameters(bad).check(1000)
        assert message in str(info.value)
    with pytest.raises(ContractError, match=r"max_det must be in \[1, 10\]"):
        Thresholds(max_det=11).check(10)
