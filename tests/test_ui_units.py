"""The pieces of posetriton ui that need no server: what uploads are accepted, and the newest-wins frame mailbox.

Kept apart from tests/test_ui.py, whose Playwright fixture holds an event loop in the test thread.
"""

from __future__ import annotations

import asyncio
import re
import socket

import pytest

from posetriton.core.contract import ContractError
from posetriton.ui.camera import CameraFrame, LatestFrame
from posetriton.ui.limits import UploadRefused, check_image, checked_parameters, image_type, parameters_from_query
from posetriton.ui.origins import HostPolicy, parse_authority
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


def test_request_parameters_come_from_the_query_checked() -> None:
    assert parameters_from_query({}) == {}
    assert parameters_from_query({"conf": "0.3", "iou": "", "max_det": "7", "model": "m"}) == {
        "conf": 0.3,
        "max_det": 7,
    }
    assert parameters_from_query({"smooth_beta": "0.5"}) == {"smooth_beta": 0.5}
    for query, message in (
        ({"conf": "high"}, "conf must be a number"),
        ({"max_det": "2.5"}, "max_det must be an integer"),
        ({"iou": "1.5"}, "iou must be in [0, 1]"),
        ({"smooth_min_cutoff": "0"}, "smooth_min_cutoff must be > 0"),
    ):
        with pytest.raises(ContractError, match=re.escape(message)):
            parameters_from_query(query)
    with pytest.raises(ContractError, match="max_det must be in"):
        parameters_from_query({"max_det": "500"}, limits={"max_det": 300})


def test_camera_settings_refuse_unknown_names_before_checking() -> None:
    assert checked_parameters({"conf": 0.4, "iou": None}) == {"conf": 0.4}
    for values in ({"limits": 3}, {"confidence": 0.4}):
        with pytest.raises(ContractError, match="unknown request parameter"):
            checked_parameters(values)


def test_loopback_binds_answer_loopback_names_with_their_port() -> None:
    for bind in ("127.0.0.1", "localhost", "::1", "[::1]", "0:0::1"):
        hosts = HostPolicy.for_bind(bind, 8080)
        for name in ("127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080", "[::1]:8080", "[0:0:0:0:0:0:0:1]:8080"):
            assert hosts.host_allowed(name), (bind, name)
        for name in ("localhost:8081", "localhost", "rebound.example:8080", "127.0.0.2:8080", "[::2]:8080", None):
            assert not hosts.host_allowed(name), (bind, name)
        for origin in ("http://localhost:8080", "http://127.0.0.1:8080", "http://[::1]:8080"):
            assert hosts.origin_allowed(origin), (bind, origin)
        for origin in ("http://rebound.example:8080", "http://localhost:8081", "null", "file://", "http://localhost"):
            assert not hosts.origin_allowed(origin), (bind, origin)
    assert HostPolicy.for_bind("127.0.0.2", 80).host_allowed("127.0.0.2"), "port 80 is omitted by browsers"
    assert HostPolicy.for_bind("127.0.0.1", 443).origin_allowed("https://localhost")


def test_other_binds_answer_their_own_address_ipv6_included() -> None:
    v6 = HostPolicy.for_bind("2001:db8::5", 9000)
    assert v6.host_allowed("[2001:db8::5]:9000") and v6.host_allowed("[2001:DB8:0::5]:9000")
    assert not v6.host_allowed("2001:db8::5:9000"), "an IPv6 Host without brackets is malformed"
    assert not v6.host_allowed("localhost:9000") and not v6.host_allowed("rebound.example:9000")
    assert v6.origin_allowed("http://[2001:db8::5]:9000") and not v6.origin_allowed("http://evil.example:9000")
    lan = HostPolicy.for_bind("192.168.1.20", 8080, extra=("poses.lan", "proxy.example:443"))
    assert lan.host_allowed("192.168.1.20:8080") and lan.host_allowed("poses.lan:8080")
    assert lan.origin_allowed("https://proxy.example") and not lan.host_allowed("localhost:8080")
    with pytest.raises(ValueError, match="--allowed-host takes NAME or NAME:PORT"):
        HostPolicy.for_bind("127.0.0.1", 8080, extra=("http://x/",))


def test_wildcard_binds_answer_loopback_and_this_machines_names_only() -> None:
    for bind in ("0.0.0.0", "::"):
        hosts = HostPolicy.for_bind(bind, 8080)
        assert hosts.host_allowed("localhost:8080") and hosts.host_allowed("[::1]:8080")
        assert hosts.host_allowed(f"{socket.gethostname()}:8080")
        assert not hosts.host_allowed("rebound.example:8080") and not hosts.host_allowed("0.0.0.0:8080")
        assert not hosts.host_allowed("[::]:8080")


def test_authorities_are_parsed_strictly() -> None:
    assert parse_authority("[::1]:8080", 80) == ("::1", 8080)
    assert parse_authority("Example.ORG.", 80) == ("example.org", 80)
    for bad in ("", "a:b", "host:0", "host:70000", "[::1", "[::1]x", "user@host:80", "host/path", "a b:1"):
        assert parse_authority(bad, 80) is None, bad
