"""A request's images (``IMAGE`` encoded bytes or ``PIXELS`` raw RGB) -> one uint8 batch of letterboxed canvases.

The preprocess step's work, kept here once because two steps run it: ``NAME_preprocess`` (the GPU ensembles, the
CPU tracking ensembles and any direct caller) and the CPU network step, which decodes the requests of the CPU
``NAME`` / ``NAME_pixels`` ensembles in its own process (one Python step and one 1.2 MB canvas hand-over fewer per
image). Before any decode, every image's header is read and the request's pixels summed: a request over its
decode budget (``max_request_pixels``) is refused whole, so one request's cost stays bounded. Errors are
:class:`~posetriton.core.images.InvalidImageError` naming the image, answered INVALID_ARGUMENT by either step.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.core.contract import IMAGE, PIXELS, image_error
from posetriton.core.images import InvalidImageError, check_pixels, declared_size, decode_image, warm_up_samples
from posetriton.core.processing import LetterboxTransform, letterbox
from posetriton.core.spec import LetterboxSpec
from posetriton.core.validation import check_request_pixels


class RequestImages:
    """Built once per step instance from its model parameters (the LetterboxSpec)."""

    def __init__(self, parameters: dict[str, str]) -> None:
        self.spec = LetterboxSpec.from_parameters(parameters)

    @staticmethod
    def carried(request: object) -> bool:
        """Whether the request carries images to decode (either input), rather than ready canvases."""
        return any(pb_utils.get_input_tensor_by_name(request, name) is not None for name in (IMAGE, PIXELS))

    def warm_up(self) -> None:
        """Decode and letterbox a tiny image of each format once, so no client request pays the first use of a
        decoder (a fresh instance answered its first request 90 ms slower, measured)."""
        canvas = np.empty((self.spec.input_size, self.spec.input_size, 3), dtype=np.uint8)
        for sample in warm_up_samples():
            declared_size(sample, self.spec.max_pixels)
            letterbox(self._decoded(sample)[0], self.spec, out=canvas)

    def letterboxed(self, request: object) -> tuple[np.ndarray, list[LetterboxTransform]]:
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
