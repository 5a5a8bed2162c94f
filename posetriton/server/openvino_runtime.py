"""Run a pose network's OpenVINO IR on the CPU: one request on every core, a batch across every stream.

Shared by the served pose model and the benchmarks' in-process baseline, so both run the network
the same way. The served step feeds it through :class:`InferencePipeline`, which keeps every stream busy
across Triton's batches.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import openvino as ov

Precision = Literal["f32", "bf16"]
# LATENCY: one stream using every core. THROUGHPUT: several streams, a batch split across them.
# ADAPTIVE: both compiled; a lone image takes the LATENCY model, a batch of two or more the THROUGHPUT one.
PerformanceHint = Literal["LATENCY", "THROUGHPUT", "ADAPTIVE"]
PERFORMANCE_HINTS: tuple[str, ...] = ("LATENCY", "THROUGHPUT", "ADAPTIVE")


def cpu_threads() -> int:
    """Cores this process may run on (its affinity mask, which follows a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _StreamQueue:
    """A compiled model plus an AsyncInferQueue with one infer request per stream."""

    def __init__(self, core: ov.Core, model: ov.Model, config: dict[str, str]) -> None:
        self.compiled = core.compile_model(model, "CPU", config)
        self.num_requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.queue = ov.AsyncInferQueue(self.compiled, self.num_requests)
        self._results: dict[int, np.ndarray] = {}
        self.queue.set_callback(self._collect)

    def _collect(self, request: ov.InferRequest, index: int) -> None:
        self._results[index] = request.get_output_tensor(0).data.copy()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        chunks = np.array_split(batch, min(self.num_requests, len(batch)))
        self._results.clear()
        for index, chunk in enumerate(chunks):
            # share_inputs=False: OpenVINO copies the images in (0.1 ms each). Sharing the caller's memory leaves the
            # stream's input bound to it after the call, and another request on that stream then reads freed memory.
            self.queue.start_async({0: np.ascontiguousarray(chunk)}, userdata=index, share_inputs=False)
        self.queue.wait_all()
        return np.concatenate([self._results[i] for i in range(len(chunks))])


class OpenVinoRunner:
    """A compiled IR (or several, see :data:`PerformanceHint`) that runs a batch and returns its first output.

    ``precision`` is explicit because on CPUs with bf16 support OpenVINO otherwise switches to
    bf16 silently (about 2x faster, keypoints off by up to a few pixels). ``num_threads`` defaults to
    the cores this process may use, so a container's CPU limit (its cpuset) is what counts.
    ``cpu_pinning`` None keeps OpenVINO's default (pinned stream threads).
    """

    def __init__(
        self,
        model_path: Path,
        precision: Precision = "f32",
        performance_hint: PerformanceHint = "ADAPTIVE",
        num_streams: int | None = None,
        num_threads: int | None = None,
        cpu_pinning: bool | None = None,
    ) -> None:
        if performance_hint not in PERFORMANCE_HINTS:
            raise ValueError(f"performance_hint must be one of {PERFORMANCE_HINTS}, got {performance_hint!r}")
        core = ov.Core()
        model = core.read_model(str(model_path))
        threads = num_threads or cpu_threads()
        base = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": str(threads)}
        if cpu_pinning is not None:
            # Pinned stream threads cannot move off a core that another process (a preprocess stub) is using.
            base["ENABLE_CPU_PINNING"] = "YES" if cpu_pinning else "NO"
        self.latency = None
        self.throughput = None
        if performance_hint in ("LATENCY", "ADAPTIVE"):
            self.latency = _StreamQueue(core, model, {**base, "PERFORMANCE_HINT": "LATENCY"})
        if performance_hint in ("THROUGHPUT", "ADAPTIVE"):
            config = {**base, "PERFORMANCE_HINT": "THROUGHPUT"}
            if num_streams:
                config["NUM_STREAMS"] = str(num_streams)
            self.throughput = _StreamQueue(core, model, config)
        self.input_dtype = model.input(0).get_element_type().to_dtype()
        # One image's shape (the batch dimension is dynamic), e.g. (640, 640, 3).
        self.image_shape = tuple(int(d.get_length()) for d in model.input(0).get_partial_shape()[1:])

    @property
    def num_requests(self) -> int:
        """Requests that keep every stream busy (the THROUGHPUT layout's, else 1)."""
        return self.throughput.num_requests if self.throughput else 1

    def warm_up(self) -> None:
        """Run every compiled layout once (OpenVINO finishes its set-up on the first call), so no request pays it."""
        for queue in (self.latency, self.throughput):
            if queue is not None:
                queue.infer(np.zeros((queue.num_requests, *self.image_shape), self.input_dtype))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch through the network and wait for it; returns the first output for all of it."""
        if self.throughput is None or (self.latency is not None and len(batch) == 1):
            assert self.latency is not None
            return self.latency.infer(batch)
        return self.throughput.infer(batch)


# Called once per submitted batch: its outputs (first output, one row per image) or the error that stopped it.
Answer = Callable[[np.ndarray | None, BaseException | None], None]


class _Batch:
    """One submitted batch in flight: its output rows fill as each image's inference completes."""

    def __init__(self, count: int, answer: Answer) -> None:
        self.rows: list[np.ndarray | None] = [None] * count
        self.left = count
        self.answer = answer
        self.error: BaseException | None = None


class InferencePipeline:
    """Keeps the network busy across batches: images are started as they arrive and each batch is answered the
    moment its own images are done, never waiting for batch-mates or for the next batch to be handed over.

    Triton's Python backend runs one ``execute`` at a time per instance; with a blocking ``infer`` the streams
    idle while a finished batch is answered and the next one is formed (issue 19's idle fifth of the CPU).
    Here ``submit`` returns once the images are queued in OpenVINO and ``answer`` runs on OpenVINO's callback
    thread. An image that finds nothing in flight runs on the LATENCY layout (every core on one image, so a
    lone request is as fast as before); any other joins the THROUGHPUT streams. ``submit`` blocks while every
    infer request is busy, so waiting work stays in Triton's bounded queue (its REJECT policy and deadlines
    still apply) rather than piling up here.
    """

    def __init__(self, runner: OpenVinoRunner, depth: int | None = None) -> None:
        if runner.throughput is None and runner.latency is None:
            raise ValueError("the runner has no compiled layout")
        self._lock = threading.Lock()
        # One submitter at a time (the served step submits from its decode threads): an AsyncInferQueue names its
        # next idle request before starting it, and two submitters would be handed the same one.
        self._submitting = threading.Lock()
        self._in_flight = 0
        # Images started on each layout (the benchmarks report how often a lone image took every core).
        self.started = {"latency": 0, "throughput": 0}
        self._idle = threading.Condition(self._lock)
        self._latency = self._queue(runner.latency, 1) if runner.latency is not None else None
        streams = runner.throughput or runner.latency
        assert streams is not None
        # One more request than streams: a stream that finishes finds its next image already started.
        self._throughput = self._queue(streams, depth or streams.num_requests + 1)
        # (queue, infer request) -> the image it computes, until its callback takes it (see _reap).
        self._started: dict[tuple[int, int] | None, tuple[_Batch, int]] = {}
        self._input_dtype = runner.input_dtype
        self._image_shape = runner.image_shape

    def _queue(self, layout: _StreamQueue, requests: int) -> ov.AsyncInferQueue:
        queue = ov.AsyncInferQueue(layout.compiled, requests)
        queue.set_callback(self._completed)
        return queue

    def submit(self, batch: np.ndarray, answer: Answer) -> None:
        """Start every image of ``batch``; ``answer(outputs, None)`` follows once all are done (or
        ``answer(None, error)`` on the first failure). The images are copied in, so ``batch`` may be reused.
        A batch the network cannot take raises ValueError before anything starts."""
        if batch.dtype != self._input_dtype or tuple(batch.shape[1:]) != self._image_shape:
            raise ValueError(
                f"the network takes {self._input_dtype} images of shape {list(self._image_shape)}, "
                f"got {batch.dtype} {list(batch.shape)}"
            )
        job = _Batch(len(batch), answer)
        with self._submitting:
            self._start(batch, job)

    def _start(self, batch: np.ndarray, job: _Batch) -> None:
        for index in range(len(batch)):
            with self._lock:
                alone = self._in_flight == 0 and self._latency is not None
                self._in_flight += 1
                self.started["latency" if alone else "throughput"] += 1
            queue = self._latency if alone else self._throughput
            assert queue is not None
            key = None
            try:
                key = (id(queue), queue.get_idle_request_id())  # waits while every request of the layout is busy
                self._reap(queue, key)
                with self._lock:
                    self._started[key] = (job, index)
                # share_inputs=False: OpenVINO copies the image, so Triton may release the request's memory.
                queue.start_async({0: batch[index : index + 1]}, userdata=(job, index, key), share_inputs=False)
            except BaseException:
                # The caller answers a batch that could not be started whole: its unstarted images keep
                # job.left above 0, so its started ones never answer it a second time.
                with self._lock:
                    self._started.pop(key, None)
                    self._in_flight -= 1
                    if self._in_flight == 0:
                        self._idle.notify_all()
                raise

    def _reap(self, queue: ov.AsyncInferQueue, key: tuple[int, int]) -> None:
        """OpenVINO calls no callback for an inference that failed: its request just turns idle again. Such a
        request still holds its image here when it is reused; its failure is read and answered then."""
        with self._lock:
            stale = self._started.pop(key, None)
        if stale is None:
            return
        try:
            queue[key[1]].wait()
        except Exception as exc:
            self._finish(stale[0], stale[1], None, exc)
        # else it succeeded and its callback, on its way, answers it

    def _completed(self, request: ov.InferRequest, userdata: tuple[_Batch, int, tuple[int, int]]) -> None:
        job, index, key = userdata
        with self._lock:
            if self._started.get(key) == (job, index):
                del self._started[key]
        try:
            row = request.get_output_tensor(0).data[0].copy()
        except BaseException as exc:  # an answer must follow whatever happens here
            self._finish(job, index, None, exc)
        else:
            self._finish(job, index, row, None)

    def _finish(self, job: _Batch, index: int, row: np.ndarray | None, error: BaseException | None) -> None:
        with self._lock:
            self._in_flight -= 1
            job.rows[index] = row
            job.error = job.error or error
            job.left -= 1
            last = job.left == 0
            if self._in_flight == 0:
                self._idle.notify_all()
        if last:
            if job.error is not None:
                job.answer(None, job.error)
            else:
                job.answer(np.stack(job.rows), None)  # type: ignore[arg-type]

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is in flight (every answer given); whether it got there in time."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight
