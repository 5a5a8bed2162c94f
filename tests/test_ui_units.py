"""The pieces of posetriton ui that need no server: what uploads are accepted, and the newest-wins frame mailbox.

Kept apart from tests/test_ui.py, whose Playwright fixture holds an event loop in the test thread.
"""

from __future__ import annotations

import asyncio

import pytest

from posetriton.contract import ContractError, Thresholds
from posetriton.ui.app import allowed_hosts
from posetriton.ui.camera import CameraFrame, LatestFrame
from posetriton.ui.limits import UploadRefused, check_image, image_type, thresholds_from_query
from tests.test_ui import _png_header_only


def test_image_types_are_read_from_the_leading_bytes() -> None:
    assert image_type(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert image_type(_png_header_only(2, 2)) == "image/png"
    assert image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert image_type(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert image_type(b"<svg xmlns=") is None
    assert image_type(b"") is None
    with pytest.raises(UploadRefused) as refused:
        check_image(b"\xff\xd8\xff" + bytes(100), max_bytes=50)
    assert refused.value.status == 413


def test_latest_frame_keeps_only_the_newest_and_counts_the_rest() -> None:
    async def scenario() -> tuple[list[int], int, CameraFrame | None]:
        mailbox = LatestFrame()
        taken = []
        for seq in range(5):
            mailbox.put(CameraFrame(seq, b"", 0.0))
        first = await mailbox.get()
        assert first is not None
        taken.append(first.seq)
        waiter = asyncio.ensure_future(mailbox.get())
        await asyncio.sleep(0)
        mailbox.put(CameraFrame(5, b"", 0.0))
        second = await waiter
        assert second is not None
        taken.append(second.seq)
        mailbox.put(CameraFrame(6, b"", 0.0))
        mailbox.put_back(second)  # a newer frame waits: the returned one is dropped
        third = await mailbox.get()
        assert third is not None
        taken.append(third.seq)
        mailbox.put_back(third)  # nothing waits: it is kept
        fourth = await mailbox.get()
        assert fourth is not None
        taken.append(fourth.seq)
        mailbox.close()
        return taken, mailbox.dropped, await mailbox.get()

    taken, dropped, after_close = asyncio.run(scenario())
    assert taken == [4, 5, 6, 6]
    assert dropped == 5
    assert after_close is None


def test_thresholds_come_from_the_query_checked() -> None:
    assert thresholds_from_query({}) == Thresholds()
    assert thresholds_from_query({"conf": "0.3", "iou": "", "max_det": "7"}) == Thresholds(conf=0.3, max_det=7)
    for query, message in (
        ({"conf": "high"}, "conf must be a number"),
        ({"max_det": "2.5"}, "max_det must be an integer"),
        ({"iou": "1.5"}, "iou must be in [0, 1]"),
    ):
        with pytest.raises(ContractError, match=message.replace("[", r"\[").replace("]", r"\]")):
            thresholds_from_query(query)
    with pytest.raises(ContractError, match="max_det must be in"):
        thresholds_from_query({"max_det": "500"}, max_det_limit=300)


def test_loopback_binds_answer_loopback_host_names_only() -> None:
    assert allowed_hosts("127.0.0.1") == ("127.0.0.1", "localhost")
    assert allowed_hosts("localhost") == ("127.0.0.1", "localhost")
    assert allowed_hosts("0.0.0.0") == ("*",)  # reachable by names this app cannot know
    assert allowed_hosts("::1") == ("*",)  # Starlette's check cannot parse IPv6 literals
