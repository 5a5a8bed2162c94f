"""Client side of posetriton: typed sync and asyncio gRPC clients for the pose ensembles, drawing, eval and the CLI.

Quick start::

    from posetriton.client import PoseClient

    with PoseClient("127.0.0.1:8001", model="yolo11n_pose") as client:
        result = client.predict("people.jpg", conf=0.3)
        print([pose["left_wrist"] for pose in result.poses])

The drawing helpers (``posetriton.client.drawing``), COCO evaluation (``posetriton.client.evaluation``,
needs pycocotools) and the CLI (``posetriton.client.cli``, needs Typer) are not imported here.
"""

from posetriton.core.contract import Smoothing, Thresholds

from ._core import DEFAULT_MODEL, DEFAULT_TIMEOUT_S
from .aio_client import AsyncPoseClient
from .batching import image_bytes_input
from .errors import (
    AccessDeniedError,
    DeadlineExceededError,
    InvalidInputError,
    ModelNotReadyError,
    PoseClientError,
    ServerBusyError,
    ServerUnavailableError,
)
from .grpc_client import PoseClient
from .inputs import DEFAULT_URL, ImageInput
from .results import (
    FailedImage,
    ImagePoses,
    ImageResult,
    Keypoint,
    ModelMetadata,
    Pose,
    PoseArrays,
    to_coco_results,
)
from .retry import NO_RETRY, RetryPolicy
from .streaming import Frame, StreamItem, directory_images, frames_from, video_frames
from .tracking_results import TimedFrame, TrackedFrame, TrackedPose, TrackingStreamError

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_URL",
    "NO_RETRY",
    "AccessDeniedError",
    "AsyncPoseClient",
    "DeadlineExceededError",
    "FailedImage",
    "Frame",
    "ImageInput",
    "ImagePoses",
    "ImageResult",
    "InvalidInputError",
    "Keypoint",
    "ModelMetadata",
    "ModelNotReadyError",
    "Pose",
    "PoseArrays",
    "PoseClient",
    "PoseClientError",
    "RetryPolicy",
    "ServerBusyError",
    "ServerUnavailableError",
    "Smoothing",
    "StreamItem",
    "Thresholds",
    "TimedFrame",
    "TrackedFrame",
    "TrackedPose",
    "TrackingStreamError",
    "directory_images",
    "frames_from",
    "image_bytes_input",
    "to_coco_results",
    "video_frames",
]
