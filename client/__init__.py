"""Client side of posetriton: a typed gRPC client for the pose ensembles, drawing helpers and the CLI.

Typical use::

    from posetriton.client import PoseClient

    with PoseClient("127.0.0.1:8001", model="yolo11n_pose") as client:
        for result in client.predict(["people.jpg"], conf=0.3):
            print(result.to_dict())

The drawing helpers (``posetriton.client.drawing``) and the CLI (``posetriton.client.cli``) are
not imported here, so the client itself needs neither OpenCV nor Typer at import time.
"""

from .grpc_client import (
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    DeadlineExceededError,
    InvalidInputError,
    ModelNotReadyError,
    PoseClient,
    PoseClientError,
    ServerUnavailableError,
)
from .results import FailedImage, ImagePoses, ImageResult, ModelMetadata, Pose

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_URL",
    "DeadlineExceededError",
    "FailedImage",
    "ImagePoses",
    "ImageResult",
    "InvalidInputError",
    "ModelMetadata",
    "ModelNotReadyError",
    "Pose",
    "PoseClient",
    "PoseClientError",
    "ServerUnavailableError",
]
