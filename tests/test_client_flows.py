"""The client's flows without a server: they do no I/O, so a test performs their steps by hand.

Covers what both clients share by construction (client/_core.py, client/steps.py, client/tracking_session.py):
a retried call, request parameters checked before anything is sent, and a tracked video whose refusals the
public stream API delivers without their request IDs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from posetriton.client import AsyncPoseClient, PoseClient, RetryPolicy
from posetriton.client.steps import Call, Done, Pause, Stepper
from posetriton.client.streaming import Frame
from posetriton.client.tracking_session import StreamEvent, TrackSession
from posetriton.core.contract import BOXES, IMAGE_SIZE, KEYPOINTS, NUM_DETECTIONS, SCORES, SMOOTHED_KEYPOINTS, TRACK_IDS

UNREACHABLE = "127.0.0.1:1"


def test_a_retried_call_is_a_flow_of_calls_and_pauses() -> None:
    with PoseClient(UNREACHABLE, retry=RetryPolicy(attempts=3, initial_backoff_s=0.0)) as client:
        stepper = Stepper(client._is_server_live_flow())
        first = stepper.next()
        assert isinstance(first, Call) and first.method == "is_server_live"
        assert first.kwargs["client_timeout"] == 30.0
        stepper._error = InferenceServerException(
            msg="failed to connect to all addresses", status="StatusCode.UNAVAILABLE"
        )
        assert isinstance(stepper.next(), Pause)
        assert stepper.next() == first  # tried again, the same call
        stepper.reply(True)
        assert stepper.next() == Done(True)


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"bogus": 1}, "bogus"),
        ({"conf": 1.5}, "conf"),
        ({"max_det": 2.5}, "max_det"),
        ({"smooth_beta": 1.0}, "smooth_beta"),
    ],
)
def test_bad_request_parameters_are_refused_before_sending(parameters: dict[str, Any], named: str) -> None:
    with PoseClient(UNREACHABLE, retry=1) as client:
        with pytest.raises(ValueError, match=named):
            client.predict(b"not sent", **parameters)
        with pytest.raises(ValueError, match=named):
            list(client.stream([b"not sent"], **parameters))


def test_the_async_client_checks_the_same_parameters() -> None:
    async def check() -> None:
        async with AsyncPoseClient(UNREACHABLE, retry=1) as client:
            with pytest.raises(ValueError, match="iou"):
                await client.predict_batch([b"not sent"], iou=-0.1)
            with pytest.raises(ValueError, match="smooth_min_cutoff"):
                client.track([b"not sent"], smooth_min_cutoff=0.0)

    asyncio.run(check())


class _Result:
    """What tritonclient's InferResult offers the session: the response's ID and its outputs (no poses)."""

    def __init__(self, request_id: str) -> None:
        self.id = request_id

    def get_response(self) -> _Result:
        return self

    def as_numpy(self, name: str) -> np.ndarray:
        empty = {
            NUM_DETECTIONS: np.zeros((1, 1), np.int32), BOXES: np.zeros((1, 0, 4), np.float32),
            SCORES: np.zeros((1, 0), np.float32), KEYPOINTS: np.zeros((1, 0, 17, 3), np.float32),
            IMAGE_SIZE: np.array([[8, 6]], np.int32), TRACK_IDS: np.zeros((1, 0), np.int64),
            SMOOTHED_KEYPOINTS: np.zeros((1, 0, 17, 3), np.float32),
        }  # fmt: skip
        return empty[name]


def _frame(index: int) -> Frame:
    return Frame(image=b"jpeg", name=f"clip#{index}", index=index)


def test_a_refusal_without_its_request_id_is_given_to_the_one_frame_left() -> None:
    session = TrackSession("m", max_in_flight=3, parameters={})
    first = session.request(_frame(0))
    assert first is not None and first["sequence_start"] and not session.can_send()  # the first frame goes alone
    session.receive(StreamEvent(_Result(first["request_id"])))
    sent = [session.request(_frame(i)) for i in (1, 2, 3)]
    assert all(request is not None and not request["sequence_start"] for request in sent)

    session.receive(StreamEvent(error=InferenceServerException(msg="in ensemble 'm_track', corrupt JPEG data")))
    session.receive(StreamEvent(_Result("3")))  # the third frame's answer overtook the others
    session.receive(StreamEvent(_Result("1")))  # so the refusal was frame 2's
    results = list(session.ready())
    assert [(r.index, r.error) for r in results] == [(0, None), (1, None), (2, "corrupt JPEG data"), (3, None)]
    assert session.in_flight == 0


def test_as_many_refusals_as_frames_in_flight_are_given_in_order() -> None:
    session = TrackSession("m", max_in_flight=2, parameters={}, sequence_id=7)
    first = session.request(_frame(0))
    assert first is not None and first["sequence_id"] == 7
    session.receive(StreamEvent(_Result(first["request_id"])))
    session.request(_frame(1))
    session.request(_frame(2))
    for reason in ("timeout", "corrupt"):
        session.receive(StreamEvent(error=InferenceServerException(msg=reason)))
    assert [r.error for r in session.ready()] == [None, "timeout", "corrupt"]


def test_a_lost_sequence_and_a_broken_stream_end_the_video() -> None:
    session = TrackSession("m", max_in_flight=1, parameters={}, url="host:1")
    session.request(_frame(0))
    with pytest.raises(Exception, match="has no tracking state") as lost:
        session.receive(StreamEvent(error=InferenceServerException(msg="sequence 5 has no tracking state")))
    assert type(lost.value).__name__ == "TrackingStreamError" and session.closed
    broken = TrackSession("m", max_in_flight=1, parameters={})
    broken.request(_frame(0))
    with pytest.raises(Exception, match="connection to the server was lost") as failed:
        broken.receive(StreamEvent(error=InferenceServerException(msg="gone", status="StatusCode.UNAVAILABLE")))
    assert getattr(failed.value, "status", None) == "UNAVAILABLE"
