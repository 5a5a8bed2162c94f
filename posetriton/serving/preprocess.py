"""Preprocess step: encoded images (``IMAGE``) or raw RGB pixels (``PIXELS``) -> letterboxed network input.

Each request is handled on its own, so a bad image fails only the request that sent it.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.images import InvalidImageError, check_pixels, decode_image
from posetriton.processing import letterbox, to_network_input
from posetriton.serving.triton_utils import invalid_argument, model_parameters
from posetriton.spec import LetterboxSpec


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.spec = LetterboxSpec.from_parameters(model_parameters(config))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                images = self._images(request)
            except InvalidImageError as exc:
                responses.append(invalid_argument(str(exc)))
                continue
            canvases, transforms = zip(*(letterbox(image, self.spec) for image in images), strict=True)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("images", to_network_input(np.stack(canvases), self.spec)),
                        pb_utils.Tensor("letterbox", np.stack([t.to_array() for t in transforms])),
                    ]
                )
            )
        return responses

    def _images(self, request: object) -> list[np.ndarray]:
        encoded = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        if encoded is not None:
            items = encoded.as_numpy().reshape(-1)
            return [_decode_item(i, len(items), item, self.spec.max_pixels) for i, item in enumerate(items)]
        pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS")
        if pixels is None:
            raise InvalidImageError("the request carries neither IMAGE (encoded bytes) nor PIXELS (raw RGB)")
        return [check_pixels(image, self.spec.max_pixels) for image in pixels.as_numpy()]


def _decode_item(index: int, count: int, item: object, max_pixels: int) -> np.ndarray:
    data = item if isinstance(item, bytes) else bytes(item)  # type: ignore[arg-type]
    try:
        return decode_image(data, max_pixels)
    except InvalidImageError as exc:
        where = f"image {index} of {count}: " if count > 1 else ""
        raise InvalidImageError(f"{where}{exc}") from None
