"""Where a tracked video's frames come from, as the sender wants them: the newest one of a live source (a
camera, a stream: older unsent frames are replaced and counted as dropped), or every frame of a file, one
when a slot frees up. Sync iterables and async ones (frames arriving over a web socket) alike."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from os import PathLike
from pathlib import Path

from .inputs import ImageInput
from .streaming import Frame, as_frames


class NewestFrame:
    """The newest frame of a live source not yet taken: ``take()`` returns it (or None); a frame replaced before
    it was taken is counted in ``dropped``. ``on_frame`` is called when a frame arrives or the source ends, so
    a sender waiting for either can wake up. (The lock matters for the thread of :class:`LiveFeed`.)"""

    def __init__(self, on_frame: Callable[[], None]) -> None:
        self._on_frame = on_frame
        self._lock = threading.Lock()
        self._latest: Frame | None = None
        self.dropped = 0
        self.finished = False
        self.error: BaseException | None = None

    def _offer(self, frame: Frame) -> None:
        with self._lock:
            if self._latest is not None:
                self.dropped += 1
            self._latest = frame
        self._on_frame()

    @contextlib.contextmanager
    def _reading(self, errors: type[BaseException]) -> Iterator[None]:
        """Around reading the source: its end is recorded, and an error of kind ``errors`` kept for the sender,
        which raises it in the caller's thread."""
        error: BaseException | None = None
        try:
            yield
        except errors as exc:
            error = exc
        finally:
            with self._lock:
                self.error, self.finished = error, True
            self._on_frame()

    def take(self) -> tuple[Frame | None, int]:
        """(the newest untaken frame or None, frames dropped so far)."""
        with self._lock:
            frame, self._latest = self._latest, None
            return frame, self.dropped

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return self.finished and self._latest is None


class LiveFeed(NewestFrame):
    """Frames of a live source, read in a thread that keeps only the newest unsent one."""

    def __init__(self, frames: Iterable[Frame | ImageInput], on_frame: Callable[[], None] = lambda: None) -> None:
        super().__init__(on_frame)
        self._source = as_frames(frames)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="posetriton-live-feed", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self._reading(BaseException):
            for frame in self._source:
                self._offer(frame)
                if self._stop.is_set():
                    break

    def stop(self) -> None:
        self._stop.set()


class EveryFrame:
    """A source read one frame at a time when a slot is free: none dropped, errors raised where it is read."""

    dropped = 0
    error: BaseException | None = None
    exhausted = False


class FileFeed(EveryFrame):
    """Frames of a file (or any finite iterable), pulled one at a time when a slot is free."""

    def __init__(self, frames: Iterable[Frame | ImageInput]) -> None:
        self._source = as_frames(frames)

    def take(self) -> tuple[Frame | None, int]:
        frame = next(self._source, None)
        self.exhausted = frame is None
        return frame, 0

    def stop(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()


class AsyncLiveFeed(NewestFrame):
    """:class:`LiveFeed` for an async iterable of frames (e.g. frames arriving over a web socket)."""

    def __init__(self, frames: AsyncIterable[Frame | ImageInput], on_frame: Callable[[], None]) -> None:
        super().__init__(on_frame)
        self._task = asyncio.ensure_future(self._read(frames))

    async def _read(self, frames: AsyncIterable[Frame | ImageInput]) -> None:
        with self._reading(Exception):  # a cancelled reader (stop()) ends the feed without an error
            index = 0
            async for item in frames:
                self._offer(_as_frame(item, index))
                index += 1

    def stop(self) -> None:
        self._task.cancel()


class AsyncFileFeed(EveryFrame):
    """:class:`FileFeed` for an async iterable: every frame, pulled when a slot is free."""

    def __init__(self, frames: AsyncIterable[Frame | ImageInput]) -> None:
        self._source = aiter(frames)
        self._index = 0

    async def take(self) -> tuple[Frame | None, int]:
        item = await anext(self._source, None)
        self.exhausted = item is None
        if item is None:
            return None, 0
        self._index += 1
        return _as_frame(item, self._index - 1), 0

    def stop(self) -> None:
        pass


def _as_frame(item: Frame | ImageInput, index: int) -> Frame:
    """One item of an async source as a frame, named as :func:`as_frames` names them."""
    if isinstance(item, Frame):
        return item
    name = str(Path(item)) if isinstance(item, (str, PathLike)) else f"<image {index}>"
    return Frame(image=item, name=name, index=index)
