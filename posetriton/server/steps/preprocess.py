"""Preprocess step: encoded images (``IMAGE``) or raw RGB pixels (``PIXELS``) -> letterboxed uint8 canvas.

The canvas stays uint8 NHWC in decoded RGB order; the network graph itself reorders the channels,
transposes and scales (the export prepends those ops), so this step never makes a float copy.
Each request is handled on its own, so a bad image fails only the request that sent it; the decode itself, with
its per-request budget, is :class:`~posetriton.server.steps.request_images.RequestImages`, which the CPU network
step runs too.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.core.contract import CANVAS, LETTERBOX, NETWORK_SUFFIX, PREPROCESS_SUFFIX, ContractError
from posetriton.core.images import InvalidImageError
from posetriton.server.admission import CAPACITY_PARAMETER as ADMISSION_CAPACITY_PARAMETER
from posetriton.server.admission import AdmissionLedger, Lease, lease_seconds, ledger_path
from posetriton.server.steps.request_images import RequestImages
from posetriton.server.steps.triton_utils import StepBusy, model_parameters, respond_each


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = model_parameters(config)
        self.images = RequestImages(params)
        self.name = args["model_name"]
        # Admission before decoding (posetriton.server.admission): open while no CPU network step attaches.
        self.network = self.name.removesuffix(PREPROCESS_SUFFIX) + NETWORK_SUFFIX
        capacity = params.get(ADMISSION_CAPACITY_PARAMETER)
        self.admission = AdmissionLedger(ledger_path(self.network), int(capacity)) if capacity else None
        self.images.warm_up()

    def execute(self, requests: list) -> list:
        return respond_each(requests, self._preprocess, step=self.name, refused=(InvalidImageError, ContractError))

    def _preprocess(self, request: object) -> object:
        lease = self._admitted(request)
        try:
            canvases, transforms = self.images.letterboxed(request)
        except BaseException:
            if lease is not None and self.admission is not None:
                self.admission.cancel(lease)  # it never reaches the network: its slot is free again
            raise
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(CANVAS, canvases),
                pb_utils.Tensor(LETTERBOX, np.stack([t.to_array() for t in transforms])),
            ]
        )

    def _admitted(self, request: object) -> Lease | None:
        """A lease for this request before any of it is read, or StepBusy (UNAVAILABLE) when the network holds as
        much as it can start in time."""
        if self.admission is None:
            return None
        timeout_us = int(request.timeout())  # type: ignore[attr-defined]
        lease = self.admission.admit(lease_seconds(timeout_us), wait_s=timeout_us / 1e6)
        if lease is None:
            raise StepBusy(
                f"server busy: {self.network} already holds as many requests as it can start within this "
                f"request's timeout (at most {self.admission.capacity}); refused before decoding, try again later"
            )
        return lease

    def finalize(self) -> None:
        if self.admission is not None:
            self.admission.close()
