"""Preprocess step: encoded images (``IMAGE``) or raw RGB pixels (``PIXELS``) -> letterboxed uint8 canvas.

The canvas stays uint8 NHWC in decoded RGB order; the network graph itself reorders the channels,
transposes and scales (the export prepends those ops), so this step never makes a float copy.
Each request is handled on its own, so a bad image fails only the request that sent it. Before any
decode, every image's header is read and the request's pixels summed: a request over its decode budget
(``max_request_pixels``) is refused whole, so one request's cost stays bounded.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.core.contract import (
    CANVAS,
    IMAGE,
    LETTERBOX,
    NETWORK_SUFFIX,
    PIXELS,
    PREPROCESS_SUFFIX,
    ContractError,
    image_error,
)
from posetriton.core.images import InvalidImageError, check_pixels, declared_size, decode_image, warm_up_samples
from posetriton.core.processing import LetterboxTransform, letterbox
from posetriton.core.spec import LetterboxSpec
from posetriton.core.validation import check_request_pixels
from posetriton.server.admission import CAPACITY_PARAMETER as ADMISSION_CAPACITY_PARAMETER
from posetriton.server.admission import AdmissionLedger, Lease, lease_seconds, ledger_path
from posetriton.server.steps.triton_utils import StepBusy, model_parameters, respond_each


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = model_parameters(config)
        self.spec = LetterboxSpec.from_parameters(params)
        self.name = args["model_name"]
        # Admission before decoding (posetriton.server.admission): open while no CPU network step attaches.
        self.network = self.name.removesuffix(PREPROCESS_SUFFIX) + NETWORK_SUFFIX
        capacity = params.get(ADMISSION_CAPACITY_PARAMETER)
        self.admission = AdmissionLedger(ledger_path(self.network), int(capacity)) if capacity else None
        self._warm_up()

    def _warm_up(self) -> None:
        """Decode and letterbox a tiny image of each format once, so no client request pays the first use of a
        decoder (a fresh instance answered its first request 90 ms slower, measured)."""
        canvas = np.empty((self.spec.input_size, self.spec.input_size, 3), dtype=np.uint8)
        for sample in warm_up_samples():
            declared_size(sample, self.spec.max_pixels)
            letterbox(self._decoded(sample)[0], self.spec, out=canvas)

    def execute(self, requests: list) -> list:
        return respond_each(requests, self._preprocess, step=self.name, refused=(InvalidImageError, ContractError))

    def _preprocess(self, request: object) -> object:
        lease = self._admitted(request)
        try:
            canvases, transforms = self._letterboxed(request)
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

    def _letterboxed(self, request: object) -> tuple[np.ndarray, list[LetterboxTransform]]:
        """Decode (or check) every image of the request and letterbox each into its slot of one batch array."""
        encoded = pb_utils.get_input_tensor_by_name(request, IMAGE)
        if encoded is not None:
            items = list(encoded.as_numpy().reshape(-1))
        else:
            pixels = pb_utils.get_input_tensor_by_name(request, PIXELS)
            if pixels is None:
                raise InvalidImageError(f"the request carries neither {IMAGE} (encoded bytes) nor {PIXELS} (raw RGB)")
            items = list(pixels.as_numpy())
        check_request_pixels([self._declared_size(i, len(items), item) for i, item in enumerate(items)],
                             self.spec.max_request_pixels)  # fmt: skip
        size = self.spec.input_size
        canvases = np.empty((len(items), size, size, 3), dtype=np.uint8)
        transforms = []
        for index, item in enumerate(items):
            try:
                image, original = self._decoded(item)
            except InvalidImageError as exc:
                raise InvalidImageError(image_error(index, len(items), str(exc))) from None
            _, transform = letterbox(image, self.spec, out=canvases[index])
            if original is not None:
                transform = transform.for_original(*original)
            transforms.append(transform)
        return canvases, transforms

    def _declared_size(self, index: int, count: int, item: object) -> tuple[int, int]:
        """(width, height) of one image before decoding it; a header over the per-image limit refuses it here."""
        try:
            if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 3:
                return int(check_pixels(item, self.spec.max_pixels).shape[1]), int(item.shape[0])
            return declared_size(item if isinstance(item, bytes) else bytes(item), self.spec.max_pixels)  # type: ignore[call-overload]
        except InvalidImageError as exc:
            raise InvalidImageError(image_error(index, count, str(exc))) from None

    def _decoded(self, item: object) -> tuple[np.ndarray, tuple[int, int] | None]:
        """HWC uint8 RGB pixels, and the original (width, height) when they are a reduced decode of it."""
        if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 3:
            return check_pixels(item, self.spec.max_pixels), None
        data = item if isinstance(item, bytes) else bytes(item)  # type: ignore[call-overload]
        if not self.spec.reduced_jpeg_decode:
            return decode_image(data, self.spec.max_pixels), None
        from posetriton.core.images import decode_image_reduced

        image, original = decode_image_reduced(data, self.spec.max_pixels, self.spec.input_size)
        return image, (original if original != (image.shape[1], image.shape[0]) else None)
