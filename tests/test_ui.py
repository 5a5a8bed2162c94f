"""posetriton ui in a real browser (Debian's headless Chromium driven by Playwright) against the real Triton.

The app runs as the user runs it (``posetriton ui`` in a subprocess) in front of the session's
server; every expectation is what the SDK gets from the same server for the same image.
``POSETRITON_UI_SCREENSHOT=path.png`` also saves the page with two photos (the README's picture).
"""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Playwright, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from posetriton.client import InvalidInputError, PoseClient
from posetriton.launcher import free_port
from tests.conftest import UL_MODEL

POSETRITON = Path(sys.executable).parent / "posetriton"
CHROMIUM = Path(os.environ.get("POSETRITON_CHROMIUM", "/usr/bin/chromium"))
# Headless Chromium as root, quiet: no sandbox (root), no background traffic, a fake camera that needs no prompt.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--use-fake-ui-for-media-stream",
]
# Small enough that a test can go past it cheaply; the photos used here are well under it.
MAX_UPLOAD_MB = 2
# Keypoints the page draws (its KPT_THRESHOLD).
KPT_THRESHOLD = 0.5
WAIT_MS = 60_000


def _photo(photo_paths: list[Path], name: str) -> Path:
    (path,) = [p for p in photo_paths if p.name == name]
    return path


@pytest.fixture(scope="module")
def ui_url(served_url: str) -> Iterator[str]:
    """``posetriton ui`` as a user starts it, in front of the session's Triton."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the UI tests drive Debian's Chromium (make browser)")
    port = free_port()
    command = [
        str(POSETRITON), "ui", "--url", served_url, "--model", UL_MODEL,
        "--port", str(port), "--max-upload-mb", str(MAX_UPLOAD_MB),
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"posetriton ui exited with {process.returncode}: {process.stderr.read()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/api/config", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("posetriton ui did not answer within 60 s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launch(playwright: Playwright, *extra: str) -> Browser:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[*CHROMIUM_ARGS, *extra])


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """One Playwright per module: its sync API cannot be started twice in a thread."""
    with sync_playwright() as instance:
        yield instance


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    chromium = launch(playwright)
    yield chromium
    chromium.close()


@pytest.fixture
def page(browser: Browser, ui_url: str) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    page.goto(ui_url)
    page.wait_for_selector("body[data-ready=true]", timeout=WAIT_MS)
    yield page
    context.close()


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_MS / 1000) -> None:
    """Poll from Python: the page's Content-Security-Policy forbids the eval that page.wait_for_function uses."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)


def _thresholds(page: Page) -> dict[str, Any]:
    return {
        "conf": float(page.input_value("#conf")),
        "iou": float(page.input_value("#iou")),
        "max_det": int(page.input_value("#max_det")),
    }


def _served(url: str, image: Path | bytes, **thresholds: Any) -> Any:
    with PoseClient(url, model=UL_MODEL) as client:
        return client.predict(image, **thresholds)


def _screenshot(locator: Any) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(np.int16)


def test_photo_skeletons_are_drawn_where_the_served_keypoints_are(
    page: Page, served_url: str, photo_paths: list[Path], tmp_path: Path
) -> None:
    photo = _photo(photo_paths, "zidane.jpg")
    page.set_input_files("#files", str(photo))
    card = page.locator(".card").first
    page.locator(".card[data-state=done]").wait_for(timeout=WAIT_MS)
    expected = _served(served_url, photo, **_thresholds(page))
    assert expected.poses, "the photo must hold people for this test to mean anything"
    assert card.get_attribute("data-people") == str(len(expected.poses))
    assert (int(card.get_attribute("data-width") or 0), int(card.get_attribute("data-height") or 0)) == (
        expected.width,
        expected.height,
    )

    stage = card.locator(".stage")
    drawn = _screenshot(stage)
    Image.fromarray(drawn.astype(np.uint8)).save(tmp_path / "drawn.png")
    stage.locator("canvas").evaluate("canvas => canvas.style.visibility = 'hidden'")
    bare = _screenshot(stage)
    changed = np.abs(drawn - bare).sum(axis=2) > 60
    scale = drawn.shape[1] / expected.width
    assert abs(drawn.shape[0] - expected.height * scale) <= 1.5, "the photo is shown at its aspect ratio"

    points = [(x, y) for pose in expected.poses for x, y, conf in pose.keypoints if conf >= KPT_THRESHOLD]
    assert len(points) >= 10
    missed = []
    for x, y in points:
        col, row = round(x * scale), round(y * scale)
        window = changed[max(0, row - 1) : row + 2, max(0, col - 1) : col + 2]
        if not window.any():
            missed.append((x, y))
    assert not missed, f"no drawing at served keypoints {missed}"

    # Away from every person (its box grown by the line width, and the score label above it) nothing is drawn.
    outside = np.ones_like(changed)
    for pose in expected.poses:
        x1, y1, x2, y2 = pose.box
        top, bottom = max(0, int((y1 - 40) * scale)), int((y2 + 12) * scale) + 1
        outside[top:bottom, max(0, int((x1 - 12) * scale)) : int((x2 + 12) * scale) + 1] = False
    assert outside.sum() > 0.1 * outside.size
    assert not changed[outside].any(), "pixels drawn away from the detected people"

    screenshot = os.environ.get("POSETRITON_UI_SCREENSHOT")
    if screenshot:
        page.set_input_files("#files", str(_photo(photo_paths, "bus.jpg")))
        page.locator(".card[data-state=done]").nth(1).wait_for(timeout=WAIT_MS)
        stage.locator("canvas").evaluate("canvas => canvas.style.visibility = ''")
        page.screenshot(path=screenshot, full_page=True)


def test_moving_the_conf_slider_changes_the_people_drawn(page: Page, served_url: str, photo_paths: list[Path]) -> None:
    photo = _photo(photo_paths, "bus.jpg")
    thresholds = _thresholds(page)
    low = len(_served(served_url, photo, **{**thresholds, "conf": 0.25}).poses)
    high = len(_served(served_url, photo, **{**thresholds, "conf": 0.85}).poses)
    assert low > high, "bus.jpg has people scored between 0.25 and 0.85"
    page.fill("#conf", "0.25")
    page.set_input_files("#files", str(photo))
    card = page.locator(".card").first
    page.locator(f".card[data-state=done][data-people='{low}']").wait_for(timeout=WAIT_MS)
    page.fill("#conf", "0.85")
    page.locator(f".card[data-state=done][data-people='{high}']").wait_for(timeout=WAIT_MS)
    assert f"{high} {'person' if high == 1 else 'people'}" in card.locator(".summary").inner_text()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that announces ``width`` x ``height`` and holds no pixels: its size is all a server may look at."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_refused_files_show_a_readable_message_on_that_photo(
    page: Page, served_url: str, photo_paths: list[Path], tmp_path: Path
) -> None:
    good = _photo(photo_paths, "zidane.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:4000])
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header_only(9000, 9000))
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo at all\n")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8\xff" + os.urandom(MAX_UPLOAD_MB * 2**20 + 1))
    server_reasons = {}
    for path in (truncated, huge):
        with pytest.raises(InvalidInputError) as refused:
            _served(served_url, path.read_bytes())
        assert refused.value.server_message, "the server, not the SDK, refused it"
        server_reasons[path.name] = refused.value.reason
    assert "corrupt or truncated" in server_reasons["truncated.jpg"]
    assert "too large" in server_reasons["huge.png"]

    page.set_input_files("#files", [str(p) for p in (truncated, good, huge, text, big)])
    wait_until(lambda: page.locator(".card:not([data-state=pending])").count() == 5, "every photo answered")
    cards = {card.locator(".name").inner_text(): card for card in page.locator(".card").all()}
    messages = {name: card.locator(".message").inner_text() for name, card in cards.items()}
    states = {name: card.get_attribute("data-state") for name, card in cards.items()}
    assert states == {"truncated.jpg": "error", "zidane.jpg": "done", "huge.png": "error", "notes.jpg": "error",
                      "big.jpg": "error"}  # fmt: skip
    assert messages["truncated.jpg"] == server_reasons["truncated.jpg"]
    assert messages["huge.png"] == server_reasons["huge.png"]
    assert messages["notes.jpg"].startswith("not an image this server accepts")
    assert messages["big.jpg"].startswith("the upload is too large")
    assert messages["zidane.jpg"] == ""
    assert page.locator("#banner").is_hidden(), "one refused photo never breaks the page"


def test_the_model_picker_lists_the_served_pose_ensembles(page: Page, served_url: str) -> None:
    with PoseClient(served_url) as client:
        expected = sorted(m.name for m in client.list_models() if m.input_name == "IMAGE")
    options = page.locator("#model option").evaluate_all("options => options.map(o => o.value)")
    assert sorted(options) == expected
    assert page.input_value("#model") == UL_MODEL


def test_non_loopback_addresses_are_warned_about() -> None:
    from posetriton.ui.app import exposure_warning

    assert exposure_warning("127.0.0.1") is None
    assert exposure_warning("::1") is None
    assert exposure_warning("localhost") is None
    for host in ("0.0.0.0", "192.168.1.20", "::", "example.org"):
        warning = exposure_warning(host)
        assert warning is not None and "no authentication" in warning and host in warning


def test_the_cli_warns_before_listening_beyond_loopback(served_url: str) -> None:
    """The warning comes before uvicorn binds: an address it cannot bind still shows the warning first."""
    proc = subprocess.run(
        [str(POSETRITON), "ui", "--url", served_url, "--host", "192.0.2.1",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "warning: posetriton ui listens on 192.0.2.1" in proc.stderr
    assert proc.stderr.index("warning:") < proc.stderr.index("posetriton ui: http://192.0.2.1")
    assert proc.returncode != 0, "192.0.2.1 (TEST-NET) is not an address of this machine"


def test_uploads_are_limited_before_they_are_read(ui_url: str) -> None:
    """A declared length over the limit is answered 413 from the headers alone: no body byte is ever sent."""
    host, port = urlsplit(ui_url).hostname, urlsplit(ui_url).port
    with socket.create_connection((host, port), timeout=30) as raw:
        raw.sendall(
            f"POST /api/predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {MAX_UPLOAD_MB * 2**20 + 1}\r\n\r\n".encode()
        )
        answer = b""
        while b"}" not in answer and (chunk := raw.recv(65536)):  # the JSON body may come in a second packet
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"the upload is too large" in answer
    with httpx.Client(base_url=ui_url, timeout=30) as http:
        assert http.post("/api/predict", content=Path(__file__).read_bytes()).status_code == 415
        threshold = http.post("/api/predict?conf=2", content=_png_header_only(8, 8))
        assert threshold.status_code == 400 and "conf must be in [0, 1]" in threshold.json()["error"]
        unknown = http.post("/api/predict?model=nope", content=_png_header_only(8, 8))
        assert unknown.status_code == 404 and "nope" in unknown.json()["error"]


def test_the_page_says_so_when_triton_is_unreachable(playwright: Playwright) -> None:
    port = free_port()
    command = [str(POSETRITON), "ui", "--url", f"127.0.0.1:{free_port()}",
               "--port", str(port), "--timeout", "2"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        chromium = launch(playwright)
        page = chromium.new_page()
        for _ in range(100):
            try:
                page.goto(f"http://127.0.0.1:{port}/")
                break
            except PlaywrightError:  # not listening yet
                time.sleep(0.2)
        banner = page.locator("#banner")
        banner.wait_for(state="visible", timeout=WAIT_MS)
        assert "cannot reach Triton" in banner.inner_text()
        chromium.close()
    finally:
        process.terminate()
        process.wait(timeout=15)
