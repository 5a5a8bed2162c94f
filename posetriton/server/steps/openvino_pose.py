"""Pose network step on CPU: the OpenVINO IR in this model's version folder, run in the Python backend.

The Triton wheel used here ships no OpenVINO backend, and running the IR in-process keeps the
precision (f32 / bf16) and stream layout in this model's ``parameters``. ``execute`` only starts each
request's images in OpenVINO and returns; every request is answered through its response sender as soon as
its own images are done (:class:`posetriton.server.openvino_runtime.InferencePipeline`), so the next batch is
handed over while this one computes and the cores never wait for Triton. A lone request still gets every core.

When the letterbox rows come with the canvas (the CPU ensembles send both), the answer is the poses themselves: the
postprocess step's work (:class:`~posetriton.server.steps.pose_outputs.PoseOutputs`) runs on this step's own
finisher thread, handed each request's candidates by the completion callback (which returns at once, so an NMS
over many candidates never holds an OpenVINO infer request), and a request crosses one Python step fewer (a stub
round trip, 1-2 ms). Without the rows (a direct caller) the answer is the raw candidates, as from the GPU network.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.core.contract import CANDIDATES, CANVAS, LETTERBOX, ContractError
from posetriton.core.validation import count_non_finite
from posetriton.server.admission import CAPACITY_PARAMETER as ADMISSION_CAPACITY_PARAMETER
from posetriton.server.admission import AdmissionLedger, ServiceTime, ledger_path
from posetriton.server.cpu_limit import container_cpu_limit
from posetriton.server.openvino_runtime import Answer, InferencePipeline, OpenVinoRunner
from posetriton.server.steps.pose_outputs import PoseJob, PoseOutputs
from posetriton.server.steps.triton_utils import (
    cancelled,
    internal_error,
    invalid_argument,
    model_parameters,
    unforeseen,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


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
        # The preprocess step admits requests before decoding them; each one taken from the queue here ends the
        # oldest admission (posetriton.server.admission).
        capacity = params.get(ADMISSION_CAPACITY_PARAMETER)
        self.admission = AdmissionLedger(ledger_path(self.name), int(capacity)) if capacity else None
        if self.admission is not None:
            self.admission.attach()
        # Seconds per request under the current load, published for the preprocess step's gate.
        self.service = ServiceTime()
        # The pose outputs, where this configuration declares the letterbox input (the generated CPU ones do).
        candidates_output = next(o for o in config["output"] if o["name"] == CANDIDATES)
        takes_rows = any(i["name"] == LETTERBOX for i in config["input"])
        self.poses = PoseOutputs(params, num_candidates=int(candidates_output["dims"][0])) if takes_rows else None
        # One thread turns candidates into answers (the NMS holds the GIL); the completion callback only hands over.
        self.finisher = ThreadPoolExecutor(1, thread_name_prefix="pose-answers")

    def execute(self, requests: list) -> None:
        # Each request is answered on its own sender: CANCELLED uncomputed when its client already gave up,
        # INVALID_ARGUMENT before anything starts when its letterbox rows or thresholds are wrong, its poses (or
        # candidates) once computed, or an error that fails it alone.
        for request in requests:
            if self.admission is not None:
                self.admission.started()
            sender = request.get_response_sender()
            try:
                if request.is_cancelled():
                    sender.send(cancelled(), flags=FINAL)
                    continue
                canvases = pb_utils.get_input_tensor_by_name(request, CANVAS).as_numpy()
                try:
                    answer = self._answerer(sender, request, len(canvases))
                except ContractError as exc:  # checked before anything starts: it costs no inference
                    sender.send(invalid_argument(str(exc)), flags=FINAL)
                    continue
                self.service.started(time.monotonic())
                try:
                    self.pipeline.submit(canvases, answer)
                except BaseException:
                    self.service.dropped()  # never started: no answer will end it
                    raise
            except Exception as exc:  # unforeseen: this request alone fails
                sender.send(unforeseen(self.name, exc, self.logger), flags=FINAL)
        return None

    def _answerer(self, sender: object, request: object, images: int) -> Answer:
        """The callback that answers ``request``: its poses when it carries letterbox rows (checked here, before
        anything starts), and its candidates when it asks for them or carries no rows."""
        rows = pb_utils.get_input_tensor_by_name(request, LETTERBOX)
        job = self.poses.job(request, rows.as_numpy()) if rows is not None and self.poses is not None else None
        if job is not None and len(job.rows) != images:
            raise ContractError(f"canvas holds {images} image(s) but letterbox {len(job.rows)}; one row per image")
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
        # Answer what is in flight before the stub goes.
        self.pipeline.wait_idle(timeout=30.0)
        self.finisher.shutdown(wait=True)
