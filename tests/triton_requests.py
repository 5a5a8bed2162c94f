"""Raw gRPC requests for the server tests: no SDK in between, so these tests see exactly what Triton returns."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from posetriton.client import image_bytes_input as image_input
from posetriton.core.contract import PIPELINE_SUFFIXES
from posetriton.server.admission import DOOR_PENDING_METRIC


@dataclass
class Detections:
    boxes: np.ndarray  # [N, 4]
    scores: np.ndarray  # [N]
    keypoints: np.ndarray  # [N, 17, 3]


def pixels_input(pixels: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("PIXELS", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    return tensor


def split(result: Any) -> list[Detections]:
    counts = result.as_numpy("NUM_DETECTIONS")[:, 0]
    boxes, scores, keypoints = (result.as_numpy(n) for n in ("BOXES", "SCORES", "KEYPOINTS"))
    return [Detections(boxes[i, :n], scores[i, :n], keypoints[i, :n]) for i, n in enumerate(counts)]


def infer(
    url: str, model: str, images: list[bytes], parameters: dict[str, Any] | None = None, timeout: float = 120
) -> list[Detections]:
    with grpcclient.InferenceServerClient(url) as client:
        return split(client.infer(model, [image_input(images)], parameters=parameters, client_timeout=timeout))


def infer_error(
    url: str, model: str, inputs: list[grpcclient.InferInput], **kwargs: Any
) -> grpcclient.InferenceServerException:
    """Send a request that must fail; return the error so the test can check its status and message."""
    with grpcclient.InferenceServerClient(url) as client:
        try:
            client.infer(model, inputs, client_timeout=120, **kwargs)
        except grpcclient.InferenceServerException as exc:
            return exc
    raise AssertionError(f"{model}: the request succeeded but should have failed")


def differences(a: Detections, b: Detections) -> dict[str, float]:
    """Largest |a - b| per quantity (the keys of build_engines.parity.QUANTITIES); same counts and order assumed."""
    return {
        "boxes": float(np.abs(a.boxes - b.boxes).max(initial=0.0)),
        "scores": float(np.abs(a.scores - b.scores).max(initial=0.0)),
        "keypoints_xy": float(np.abs(a.keypoints[..., :2] - b.keypoints[..., :2]).max(initial=0.0)),
        "keypoint_conf": float(np.abs(a.keypoints[..., 2] - b.keypoints[..., 2]).max(initial=0.0)),
    }


def same_within(a: Detections, b: Detections, bounds: Mapping[str, float]) -> bool:
    """The same detections, in the same order, each quantity within its bound (e.g. conftest.photo_bounds)."""
    if len(a.scores) != len(b.scores):
        return False
    return all(value <= bounds[key] for key, value in differences(a, b).items())


def assert_same(a: Detections, b: Detections, bounds: Mapping[str, float]) -> None:
    """Two runs of one photo (batched or alone, bytes or pixels) agree within ``bounds``."""
    assert len(a.scores) == len(b.scores), (len(a.scores), len(b.scores))
    assert same_within(a, b, bounds), {"measured": differences(a, b), "bounds": dict(bounds)}


def match(served: Detections, expected: Detections) -> np.ndarray:
    """For each expected detection, the index of the served one with the nearest box (order may differ on ties)."""
    distance = np.abs(expected.boxes[:, None, :] - served.boxes[None, :, :]).max(axis=2)
    order = distance.argmin(axis=1)
    assert len(set(order.tolist())) == len(order), "two expected detections matched the same served one"
    return order


def pending_requests(metrics_port: int, ensemble: str) -> int:
    """Requests the steps of ``ensemble`` hold waiting right now: Triton's pending-request gauges (its queues), and
    the CPU network step's door gauge (the requests it admitted that wait for their decode; they leave Triton's
    queue at once). The ensemble's own gauge stays 0: its requests wait in its steps."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    steps = "|".join(re.escape(f"{ensemble}{suffix}") for suffix in PIPELINE_SUFFIXES)
    found = re.findall(rf'^nv_inference_pending_request_count{{model="(?:{steps})",version="1"}} (\d+)', text, re.M)
    # The CPU ensembles have no postprocess step (the network finishes the poses); a server may not load it.
    assert found, f"Triton exposes no pending-request count for the steps of {ensemble}"
    door = re.findall(rf'^{DOOR_PENDING_METRIC}{{model="(?:{steps})"}} (\d+)', text, re.M)
    return sum(int(count) for count in [*found, *door])
