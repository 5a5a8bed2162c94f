"""The vocabulary between the client's flows (the logic, written once) and its two drivers (the I/O).

A *flow* is a generator that does no I/O: it yields a step (what to do next) and is sent the step's
outcome, or has the step's exception thrown into it. The synchronous driver (``PoseClient``) performs
the steps with ``tritonclient.grpc``, threads and ``time.sleep``; the asyncio driver (``AsyncPoseClient``)
with ``tritonclient.grpc.aio``, tasks and ``asyncio.sleep``. So retries, deadlines, shared memory,
discovery, batching, streaming and tracking behave the same in both clients by construction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

R = TypeVar("R")


@dataclass(frozen=True)
class Call:
    """Call tritonclient's ``method(*args, **kwargs)`` on the client's channel; its return value comes back."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pause:
    """Wait ``seconds`` (a retry's backoff, a poll)."""

    seconds: float


@dataclass(frozen=True)
class Together:
    """Run these flows (the sync driver one after another, the asyncio one concurrently); their results come
    back in order."""

    flows: tuple[Flow[Any], ...]


@dataclass(frozen=True)
class NextFrame:
    """Pull the next frame of ``source`` (in a worker thread under asyncio: decoding a video must not stall the
    loop); ``None`` at its end."""

    source: Iterator[Any]


@dataclass(frozen=True)
class Start:
    """Start a flow in the background (a thread pool or a task); a handle to :class:`Finish` comes back."""

    flow: Flow[Any]


@dataclass(frozen=True)
class Finish:
    """Wait for a started flow; its result comes back (or its exception is thrown in)."""

    handle: Any


@dataclass(frozen=True)
class Emit:
    """Hand ``item`` to the caller of a streaming method (the flow goes on when the caller asks for the next)."""

    item: Any


# What a flow may yield. Tracking adds its own steps (tracking_flow), performed by the drivers' track().
Step = Call | Pause | Together | NextFrame | Start | Finish | Emit
Flow = Generator[Any, Any, R]


@dataclass
class Done(Generic[R]):
    """A flow's return value (a generator's StopIteration must not escape into a driver that is a generator)."""

    value: R


class Stepper(Generic[R]):
    """Moves one flow on: the next step, given what the last one gave or raised. Drivers loop over it."""

    def __init__(self, flow: Flow[R]) -> None:
        self.flow = flow
        self._reply: Any = None
        self._error: BaseException | None = None
        self.result: R

    def __iter__(self) -> Iterator[Any]:
        """The flow's steps until it ends; then its return value is :attr:`result`."""
        while not isinstance(step := self.next(), Done):
            yield step
        self.result = step.value

    @contextlib.contextmanager
    def performing(self) -> Iterator[None]:
        """Around performing a step: an exception is thrown into the flow (its handlers and finally blocks decide)."""
        try:
            yield
        except Exception as exc:
            self._error = exc

    def next(self) -> Any | Done[R]:
        """The next step, or :class:`Done` with the flow's result; an exception of the flow propagates."""
        reply, error = self._reply, self._error
        self._reply = self._error = None
        try:
            return self.flow.throw(error) if error is not None else self.flow.send(reply)
        except StopIteration as finished:
            return Done(finished.value)

    def reply(self, value: Any) -> None:
        self._reply = value

    def close(self) -> None:
        self.flow.close()
