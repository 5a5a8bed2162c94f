"""Tracking people through a video (``PoseClient.track`` / ``AsyncPoseClient.track``): the names in one place.

The work is split by job: results (``tracking_results``), the I/O-free session and its flows
(``tracking_session``, which also documents how frames are sent), frame feeds (``feeds``), frame
sources (``sources``) and drawing (``drawing``). This module gathers their public names, e.g.
``from posetriton.client.tracking import video_file_frames``.
"""

from posetriton.core.contract import FRAME_INDEX, TRACK_IDS, TRACK_SUFFIX

from .drawing import draw_tracks, track_color
from .feeds import AsyncFileFeed, AsyncLiveFeed, FileFeed, LiveFeed
from .sources import is_live_source, live_frames, video_file_frames
from .tracking_results import TimedFrame, TrackedFrame, TrackedPose, TrackingStreamError
from .tracking_session import CLOSE_WAIT_S, TRACK_OUTPUT_NAMES, TrackSession, new_sequence_id, track_model

__all__ = [
    "CLOSE_WAIT_S",
    "FRAME_INDEX",
    "TRACK_IDS",
    "TRACK_OUTPUT_NAMES",
    "TRACK_SUFFIX",
    "AsyncFileFeed",
    "AsyncLiveFeed",
    "FileFeed",
    "LiveFeed",
    "TimedFrame",
    "TrackSession",
    "TrackedFrame",
    "TrackedPose",
    "TrackingStreamError",
    "draw_tracks",
    "is_live_source",
    "live_frames",
    "new_sequence_id",
    "track_color",
    "track_model",
    "video_file_frames",
]
