"""Batching of ``predict_batch``: which requests one call makes, their input tensors, and results back in order.

Encoded images go in one request to ``NAME``; arrays in one request to ``NAME_pixels`` per distinct shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray

from posetriton.core.contract import IMAGE, PIXELS, PIXELS_SUFFIX

from .errors import PoseClientError
from .inputs import PreparedImage
from .results import OUTPUT_NAMES, ImagePoses, ModelMetadata, poses_from_batch
from .shm import Region, bytes_tensor_size


@dataclass(frozen=True)
class Request:
    """One inference request of a call: the images it carries and their positions in the call."""

    model: str
    indices: tuple[int, ...]
    images: tuple[PreparedImage, ...]

    @property
    def raw(self) -> bool:
        return self.images[0].raw

    @property
    def input_name(self) -> str:
        return PIXELS if self.raw else IMAGE

    @property
    def names(self) -> list[str]:
        return [image.name for image in self.images]

    def nbytes(self) -> int:
        if self.raw:
            return sum(image.nbytes for image in self.images)
        return bytes_tensor_size([image.data or b"" for image in self.images])

    def tensor(self, region: Region | None = None) -> grpcclient.InferInput:
        """The input tensor, holding the data or (with ``region``) pointing at it in shared memory."""
        if self.raw:
            first = self.images[0].pixels
            assert first is not None
            shape = [len(self.images), *first.shape]
            tensor = grpcclient.InferInput(PIXELS, shape, "UINT8")
            pixels = [image.pixels for image in self.images if image.pixels is not None]
            if region is None:
                tensor.set_data_from_numpy(np.stack(pixels))
            else:
                size = region.write_array(np.stack(pixels))
                tensor.set_shared_memory(region.name, size)
            return tensor
        data = [image.data or b"" for image in self.images]
        if region is None:
            return image_bytes_input(data)
        tensor = grpcclient.InferInput(IMAGE, [len(data), 1], "BYTES")
        tensor.set_shared_memory(region.name, region.write_bytes_tensor(data))
        return tensor


def image_bytes_input(data: Sequence[bytes]) -> grpcclient.InferInput:
    """The ``IMAGE`` input of a pose ensemble: encoded images as a BYTES tensor ``[B, 1]``."""
    tensor = grpcclient.InferInput(IMAGE, [len(data), 1], "BYTES")
    batch = np.empty((len(data), 1), dtype=object)
    batch[:, 0] = list(data)
    tensor.set_data_from_numpy(batch)
    return tensor


def pixels_model(model: str) -> str:
    """The ensemble that takes raw pixels: ``NAME_pixels``."""
    return model if model.endswith(PIXELS_SUFFIX) else model + PIXELS_SUFFIX


def plan_requests(model: str, prepared: Sequence[PreparedImage]) -> list[Request]:
    """Encoded images in one request to ``model``; arrays in one request to its ``NAME_pixels`` per distinct shape."""
    groups: dict[tuple[int, ...] | None, list[int]] = {}
    for index, image in enumerate(prepared):
        key = tuple(image.pixels.shape) if image.pixels is not None else None
        groups.setdefault(key, []).append(index)
    return [
        Request(
            model if key is None else pixels_model(model),
            tuple(indices),
            tuple(prepared[i] for i in indices),
        )
        for key, indices in groups.items()
    ]


def response_outputs(result: Any, model: str) -> dict[str, NDArray[Any]]:
    """The pose outputs of an ``InferResult``; PoseClientError when the model is not a pose ensemble."""
    outputs: dict[str, NDArray[Any]] = {}
    for name in OUTPUT_NAMES:
        array = result.as_numpy(name)
        if array is None:
            raise PoseClientError(f"model {model!r} returned no {name} output; is it a pose ensemble?")
        outputs[name] = array
    return outputs


def assemble(
    model: str, size: int, answered: Sequence[tuple[Request, dict[str, NDArray[Any]]]],
    metadata: Mapping[str, ModelMetadata],
) -> list[ImagePoses]:  # fmt: skip
    """Each image's poses, in the call's order (keypoints named from the metadata read so far, if any)."""
    results: list[ImagePoses | None] = [None] * size
    for request, outputs in answered:
        meta = metadata.get(request.model) or metadata.get(model)
        names = meta.keypoint_names if meta is not None else ()
        found = poses_from_batch(request.names, outputs, names)
        for index, poses in zip(request.indices, found, strict=True):
            results[index] = poses
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]
