"""The CPU network's pipeline: each batch answered on its own as soon as its images are done, the same candidates
as a blocking run, a lone image on every core, and every stream kept busy while work waits."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from posetriton.core.images import decode_image
from posetriton.core.processing import letterbox
from posetriton.server.openvino_runtime import Answer, InferencePipeline, OpenVinoRunner
from tests.conftest import UL_MODEL
from tests.test_repository import CATALOG


@pytest.fixture(scope="module")
def runner(model_repository: Path) -> OpenVinoRunner:
    runner = OpenVinoRunner(model_repository / f"{UL_MODEL}_network" / "1" / "model.xml", precision="f32")
    runner.warm_up()
    return runner


@pytest.fixture(scope="module")
def canvases(photo_paths: list[Path]) -> np.ndarray:
    spec = CATALOG[UL_MODEL].letterbox
    return np.stack([letterbox(decode_image(p.read_bytes(), spec.max_pixels), spec)[0] for p in photo_paths[:3]])


class Answers:
    """What the pipeline answered, per batch, and when every batch has been answered."""

    def __init__(self, expected: int) -> None:
        self.results: dict[int, tuple[np.ndarray | None, BaseException | None]] = {}
        self.expected = expected
        self.all_in = threading.Event()
        self._lock = threading.Lock()

    def for_batch(self, key: int) -> Answer:
        def answer(outputs: np.ndarray | None, error: BaseException | None) -> None:
            with self._lock:
                assert key not in self.results, f"batch {key} answered twice"
                self.results[key] = (outputs, error)
                if len(self.results) == self.expected:
                    self.all_in.set()

        return answer


def test_each_batch_gets_its_own_candidates_like_a_blocking_run(runner: OpenVinoRunner, canvases: np.ndarray) -> None:
    batches = [canvases[:1], canvases[1:3], canvases[2:3], canvases, canvases[:2]]
    expected = [runner.infer(batch) for batch in batches]
    pipeline = InferencePipeline(runner)
    answers = Answers(len(batches))
    for key, batch in enumerate(batches):
        pipeline.submit(batch.copy(), answers.for_batch(key))  # the pipeline copies the images in
    assert answers.all_in.wait(120), f"answered {sorted(answers.results)} of {len(batches)}"
    for key, want in enumerate(expected):
        got, error = answers.results[key]
        assert error is None and got is not None and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert pipeline.wait_idle(10) and pipeline.in_flight == 0


def test_a_lone_image_takes_every_core_and_waiting_work_joins_the_streams(
    runner: OpenVinoRunner, canvases: np.ndarray
) -> None:
    pipeline = InferencePipeline(runner)
    for _ in range(3):  # one at a time: nothing else in flight, so each runs on the LATENCY layout
        done = Answers(1)
        pipeline.submit(canvases[:1], done.for_batch(0))
        assert done.all_in.wait(60)
    assert pipeline.started == {"latency": 3, "throughput": 0}
    burst = Answers(6)
    for key in range(6):  # arriving while others compute: the THROUGHPUT streams
        pipeline.submit(canvases[:1], burst.for_batch(key))
    assert burst.all_in.wait(120)
    assert pipeline.started["latency"] <= 4 and pipeline.started["throughput"] >= 5, pipeline.started
    assert all(error is None for _, error in burst.results.values())


@pytest.mark.parametrize(
    "batch", [np.zeros((1, 32, 32, 3), np.uint8), np.zeros((1, 640, 640), np.uint8), np.zeros((1, 640, 640, 3))]
)
def test_a_batch_the_network_cannot_take_is_refused_before_it_starts(runner: OpenVinoRunner, batch: np.ndarray) -> None:
    # OpenVINO would take these and then fail without ever calling back: the request would never be answered.
    pipeline = InferencePipeline(runner)
    answers = Answers(1)
    with pytest.raises(ValueError, match="the network takes uint8 images of shape"):
        pipeline.submit(batch, answers.for_batch(0))
    assert pipeline.in_flight == 0 and not answers.results, "the caller answers a batch it could not start"
