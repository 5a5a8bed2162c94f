"""Pose network step on CPU: the OpenVINO IR in this model's version folder, run in the Python backend.

The Triton wheel used here ships no OpenVINO backend, and running the IR in-process keeps the
precision (f32 / bf16) and stream layout in this model's ``parameters``. ``execute`` only starts each
request's images in OpenVINO and returns; every request is answered through its response sender as soon as
its own images are done (:class:`posetriton.server.openvino_runtime.InferencePipeline`), so the next batch is
handed over while this one computes and the cores never wait for Triton. A lone request still gets every core.

On the CPU configurations the step is the whole pipeline of the ``NAME`` and ``NAME_pixels`` ensembles: it takes
their images (``IMAGE`` or ``PIXELS``), decodes and letterboxes them itself on its decode threads
(:class:`~posetriton.server.steps.request_images.RequestImages`, the preprocess step's code) and answers the poses
(:class:`~posetriton.server.steps.pose_outputs.PoseOutputs`, the postprocess step's code) on its finisher thread,
handed each request's candidates by OpenVINO's completion callback (which returns at once, so an NMS over many
candidates never holds an infer request). A lone image crosses one Python process instead of three: no stub
round trips or 1.2 MB canvas copies between steps. Each such request is admitted or refused busy at once, at the
step's door, before its decode (:class:`~posetriton.server.admission.Door`), so a request refused under overload
costs no decode and ``execute`` never waits. A request with ready canvases (``CANVAS``, from
``NAME_preprocess`` in the tracking ensembles, or from a direct caller) skips the decode; with its letterbox rows
it is answered its poses, without them the raw candidates, as from the GPU network.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.core.contract import CANDIDATES, CANVAS, IMAGE, LETTERBOX, PIXELS, ContractError
from posetriton.core.images import InvalidImageError
from posetriton.core.spec import DECODE_THREADS_PARAMETER
from posetriton.core.validation import count_non_finite
from posetriton.server.admission import CAPACITY_PARAMETER as ADMISSION_CAPACITY_PARAMETER
from posetriton.server.admission import (
    DOOR_CAPACITY_PARAMETER,
    DOOR_PENDING_METRIC,
    DOOR_QUEUE_METRIC,
    DOOR_REFUSED_METRIC,
    AdmissionLedger,
    Door,
    ServiceTime,
    ledger_path,
)
from posetriton.server.cpu_limit import container_cpu_limit
from posetriton.server.openvino_runtime import Answer, InferencePipeline, OpenVinoRunner
from posetriton.server.steps.pose_outputs import PoseJob, PoseOutputs
from posetriton.server.steps.request_images import RequestImages
from posetriton.server.steps.triton_utils import (
    cancelled,
    internal_error,
    invalid_argument,
    model_parameters,
    unavailable,
    unforeseen,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
METRICS_PERIOD_S = 1.0  # the door's metrics refresh (Prometheus scrapes every 15 s)
# Triton drops a request whose client gave up while it was queued; one that then waited at the door longer than this
# is asked again before its decode. Asking is an IPC round trip (0.25 ms), not worth it for one taken at once.
ASK_CANCELLED_AFTER_S = 0.005


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = model_parameters(config)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        precision = params.get("precision", "f32")
        if precision not in ("f32", "bf16"):
            raise ValueError(f"parameter precision must be 'f32' or 'bf16', got {precision!r}")
        runner = OpenVinoRunner(
            version_dir / params.get("model_file", "model.xml"),
            precision=precision,  # type: ignore[arg-type]
            performance_hint=params.get("performance_hint", "ADAPTIVE"),  # type: ignore[arg-type]
            num_streams=int(params["num_streams"]) if params.get("num_streams") else None,
            # The model's own setting, else the container's CPU limit (k8s downward API), else OpenVINO's choice.
            num_threads=int(params["num_threads"]) if params.get("num_threads") else container_cpu_limit(),
            cpu_pinning=params["cpu_pinning"] == "true" if params.get("cpu_pinning") else None,
        )
        runner.warm_up()  # on the IR's own image shape, the one Triton's config gives the canvas
        self.pipeline = InferencePipeline(runner)
        self.logger = pb_utils.Logger
        self.name = args["model_name"]
        # The preprocess step admits requests before decoding them; each canvas request taken from the queue here
        # ends the oldest admission (posetriton.server.admission). Images decoded here were never admitted there:
        # they are admitted at this step's own door (below).
        capacity = params.get(ADMISSION_CAPACITY_PARAMETER)
        self.admission = AdmissionLedger(ledger_path(self.name), int(capacity)) if capacity else None
        if self.admission is not None:
            self.admission.attach()
        # Seconds per request under the current load: for the preprocess step's gate (published) and the door.
        self.service = ServiceTime()
        # The pose outputs, where this configuration declares the letterbox input (the generated CPU ones do).
        inputs = {i["name"] for i in config["input"]}
        candidates_output = next(o for o in config["output"] if o["name"] == CANDIDATES)
        takes_rows = LETTERBOX in inputs
        self.poses = PoseOutputs(params, num_candidates=int(candidates_output["dims"][0])) if takes_rows else None
        # Images in, where this configuration declares them (the generated CPU ones do: the NAME ensembles' step).
        self.images = RequestImages(params) if IMAGE in inputs and self.poses is not None else None
        if self.images is not None:
            self.images.warm_up()
        # Decode threads (OpenCV and Pillow release the GIL while they decode). execute never waits for them: it
        # admits or refuses each request at once (the door), and the admitted ones wait for a decode thread here.
        self.decoders = ThreadPoolExecutor(int(params.get(DECODE_THREADS_PARAMETER, "1")), thread_name_prefix="decode")
        self.door = Door(int(params.get(DOOR_CAPACITY_PARAMETER, "1")))
        self.door_metrics = DoorMetrics(self.door, self.name) if self.images is not None else None
        # One thread turns candidates into answers (the NMS holds the GIL); the completion callback only hands over.
        self.finisher = ThreadPoolExecutor(1, thread_name_prefix="pose-answers")

    def execute(self, requests: list) -> None:
        # Each request is answered on its own sender: CANCELLED uncomputed when its client already gave up,
        # INVALID_ARGUMENT before anything starts when its images, letterbox rows or thresholds are wrong, its poses
        # (or candidates) once computed, or an error that fails it alone.
        for request in requests:
            sender = request.get_response_sender()
            try:
                if self.images is None or not self.images.carried(request):
                    if self.admission is not None:
                        self.admission.started()
                    self._start(request, sender)
                    continue
                refusal = self.door.admit(request.timeout() / 1e6, self.service.seconds)
                if refusal:
                    sender.send(unavailable(f"server busy: {self.name} {refusal}; refused before decoding, try again "
                                            "later"), flags=FINAL)  # fmt: skip
                    continue
                try:
                    self.decoders.submit(self._start, request, sender, time.monotonic())
                except BaseException:
                    self.door.started()
                    raise
            except Exception as exc:  # unforeseen: this request alone fails
                sender.send(unforeseen(self.name, exc, self.logger), flags=FINAL)
        return None

    def _start(self, request: object, sender: object, admitted_at: float | None = None) -> None:
        """Check (and, for images admitted at the door at ``admitted_at``, decode) one request and start it in
        OpenVINO, or answer why not. Whether its client gave up is asked here, just before the work."""
        waited = time.monotonic() - admitted_at if admitted_at is not None else None  # None: a canvas, no decode
        if waited is not None:
            self.door.dequeued(waited)
        try:
            if (waited is None or waited > ASK_CANCELLED_AFTER_S) and request.is_cancelled():  # type: ignore[attr-defined]
                sender.send(cancelled(), flags=FINAL)  # type: ignore[attr-defined]
                return
            try:
                canvases, job = self._canvases(request) if waited is None else self._decoded(request)
            except (ContractError, InvalidImageError) as exc:  # checked before anything starts: it costs no inference
                sender.send(invalid_argument(str(exc)), flags=FINAL)  # type: ignore[attr-defined]
                return
            answer = self._answerer(sender, request, job)
            self.service.started(time.monotonic())
            try:
                self.pipeline.submit(canvases, answer)
            except BaseException:
                self.service.dropped()  # never started: no answer will end it
                raise
        except Exception as exc:  # unforeseen: this request alone fails
            sender.send(unforeseen(self.name, exc, self.logger), flags=FINAL)  # type: ignore[attr-defined]
        finally:
            if waited is not None:
                self.door.started()

    def _decoded(self, request: object) -> tuple[np.ndarray, PoseJob]:
        """The request's images decoded and letterboxed, and its pose job (the thresholds checked)."""
        assert self.images is not None and self.poses is not None
        if pb_utils.get_input_tensor_by_name(request, CANVAS) is not None:
            raise ContractError(f"send images ({IMAGE} or {PIXELS}) or canvases ({CANVAS}), not both")
        canvases, transforms = self.images.letterboxed(request)
        return canvases, self.poses.letterboxed_job(request, transforms)

    def _canvases(self, request: object) -> tuple[np.ndarray, PoseJob | None]:
        """The request's canvases, and its pose job when it carries letterbox rows (checked here)."""
        canvas = pb_utils.get_input_tensor_by_name(request, CANVAS)
        if canvas is None:
            carried = f"{IMAGE}, {PIXELS} or {CANVAS}" if self.images is not None else CANVAS
            raise ContractError(f"the request carries no images: send {carried}")
        canvases = canvas.as_numpy()
        rows = pb_utils.get_input_tensor_by_name(request, LETTERBOX)
        job = self.poses.job(request, rows.as_numpy()) if rows is not None and self.poses is not None else None
        if job is not None and len(job.rows) != len(canvases):
            images, rows = len(canvases), len(job.rows)
            raise ContractError(f"canvas holds {images} image(s) but letterbox {rows}; one row per image")
        return canvases, job

    def _answerer(self, sender: object, request: object, job: PoseJob | None) -> Answer:
        """The callback that answers ``request``: its poses when it has a pose job, and its candidates when it asks
        for them or has none."""
        with_candidates = job is None or CANDIDATES in request.requested_output_names()  # type: ignore[attr-defined]

        def send(candidates: np.ndarray | None, error: BaseException | None) -> None:
            try:
                if error is not None:
                    response = internal_error(f"OpenVINO inference failed: {error}")
                else:
                    response = self._response(candidates, job, with_candidates)  # type: ignore[arg-type]
                sender.send(response, flags=FINAL)  # type: ignore[attr-defined]
            except Exception as exc:  # e.g. the response could not be sent: logged, never raised into a thread
                self.logger.log_error(f"{self.name}: answering a request failed: {type(exc).__name__}: {exc}")
            finally:
                seconds = self.service.answered(time.monotonic())
                if self.admission is not None:
                    self.admission.publish_service_time(seconds)

        def answer(candidates: np.ndarray | None, error: BaseException | None) -> None:
            self.finisher.submit(send, candidates, error)  # OpenVINO's callback returns at once

        return answer

    def _response(self, candidates: np.ndarray, job: PoseJob | None, with_candidates: bool) -> object:
        bad = count_non_finite(candidates)
        if bad:  # the network's own fault (the postprocess step would refuse such candidates from a caller)
            return internal_error(f"{self.name}: the network returned {bad} NaN or infinite candidate value(s)")
        try:
            tensors = [pb_utils.Tensor(CANDIDATES, candidates)] if with_candidates else []
            if job is not None and self.poses is not None:
                tensors += self.poses.tensors(candidates, job)
        except Exception as exc:  # unforeseen: this request alone fails, and the callback still answers it
            return unforeseen(self.name, exc, self.logger)
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        if self.admission is not None:
            self.admission.detach()  # nobody ends leases now: the gate opens
            self.admission.close()
        if self.door_metrics is not None:
            self.door_metrics.stop()
        # Answer what is in flight before the stub goes.
        self.decoders.shutdown(wait=True)
        self.pipeline.wait_idle(timeout=30.0)
        self.finisher.shutdown(wait=True)


class DoorMetrics:
    """The door's gauge and counters on Triton's metrics endpoint (posetriton.server.admission), refreshed every
    METRICS_PERIOD_S on a thread of their own: each update is an IPC round trip to Triton, none on a request's path."""

    def __init__(self, door: Door, model: str) -> None:
        self.door = door
        labels = {"model": model}
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self._families = [
            pb_utils.MetricFamily(name=DOOR_PENDING_METRIC, description="Requests waiting at the door", kind=gauge),
            pb_utils.MetricFamily(
                name=DOOR_QUEUE_METRIC, description="Microseconds started requests waited at the door", kind=counter
            ),
            pb_utils.MetricFamily(name=DOOR_REFUSED_METRIC, description="Requests refused busy", kind=counter),
        ]
        self.pending, self.queued, self.refused = (family.Metric(labels=labels) for family in self._families)
        self._published = (0.0, 0)
        self.pending.set(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="door-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(METRICS_PERIOD_S):
            self.publish()

    def publish(self) -> None:
        queued_us, refused = self.door.queued_us, self.door.refused
        self.pending.set(self.door.waiting)
        self.queued.increment(queued_us - self._published[0])
        self.refused.increment(refused - self._published[1])
        self._published = (queued_us, refused)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
