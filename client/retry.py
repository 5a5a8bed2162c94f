"""Retries of transient failures and the deadline of one call: the policy, the busy-answer budget, the clock.

Pure bookkeeping: the flows in ``_core`` ask it whether and when to try again; the drivers only wait.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import PoseClientError


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient failures (gRPC ``UNAVAILABLE``: a server down, or up but busy) with exponential
    backoff, within the call's deadline.

    ``attempts`` counts every try, the first included (1 = never retry). The pause before
    retry ``n`` (0-based) is ``min(max_backoff_s, initial_backoff_s * multiplier ** n)``, less
    a random part of up to ``jitter`` of it so that many clients do not retry in step: the default
    ``jitter=1`` is "full jitter" (a pause drawn uniformly up to the backoff), which spreads the retries of
    clients refused together by a busy server. A retry whose pause would end past the call's deadline is not
    made. Errors that another try cannot fix (a refused image, an unknown model, a deadline) are raised at once.

    Busy answers (:class:`ServerBusyError`: the server is up and refusing work) are also throttled per client,
    as gRPC's retry throttling (gRFC A6) does: each one costs a token of ``busy_tokens``, each answered call
    earns ``busy_token_ratio`` back, and a busy answer is retried only while more than half of the tokens are
    left. So a client that meets a saturated server stops multiplying its own load (every refused try has
    already cost the server a decode), while it still retries a passing burst. A server that is down or
    restarting costs no tokens: those retries go on until the deadline.
    """

    attempts: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 1.0
    busy_tokens: float = 10.0
    busy_token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"invalid backoff settings: {self}")
        if self.busy_tokens <= 0 or self.busy_token_ratio <= 0:
            raise ValueError(f"busy_tokens and busy_token_ratio must be positive: {self}")

    def delay(self, retry: int) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return base * (1.0 - self.jitter * random.random())


NO_RETRY = RetryPolicy(attempts=1)


class RetryBudget:
    """The busy-answer token bucket of one client (:class:`RetryPolicy`); thread-safe, shared by its calls."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.max_tokens, self.ratio = policy.busy_tokens, policy.busy_token_ratio
        self.tokens = self.max_tokens
        self._lock = threading.Lock()

    def spend(self) -> bool:
        """A busy answer: take a token; whether it may still be retried."""
        with self._lock:
            self.tokens = max(0.0, self.tokens - 1.0)
            return self.tokens > self.max_tokens / 2

    def earn(self) -> None:
        """An answered call."""
        with self._lock:
            self.tokens = min(self.max_tokens, self.tokens + self.ratio)


# The share of what is left of a call's deadline that the server may spend queueing the request (Triton's
# per-request timeout, checked in each step's queue); the rest is left for computing it. Without it a request
# could wait in the network step's queue up to the whole deadline, then be computed for nobody.
QUEUE_SHARE = 0.3


class Deadline:
    """The end of one call, attempts and pauses included: each attempt gets what is left of it as its gRPC
    deadline, and the server gets a share of it (:data:`QUEUE_SHARE`, Triton's request ``timeout``), so that
    a request that could no longer be answered in time is dropped from the server's queues uncomputed."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self.end = clock() + seconds

    def remaining(self) -> float:
        return max(self.end - self._clock(), 0.0)

    def server_timeout_us(self) -> int:
        """The longest the server may queue the request, in microseconds, for Triton's per-request timeout (at
        least 1: 0 would mean none)."""
        return max(int(self.remaining() * QUEUE_SHARE * 1e6), 1)


# Called before each retry with (attempt that failed, 1-based; the error; seconds until the next try).
RetryHook = Callable[[int, PoseClientError, float], None]
