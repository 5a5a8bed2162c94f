"""Admission before decoding: refuse a request at the door when the network cannot start it in time.

Under overload the network step's bounded queue refuses what it cannot hold, but by then the preprocess step
has decoded the request, and on a CPU server that decode is taken from the network: at 2.5x capacity half the
cores went to decoding requests that were then refused (docs/reliability.md, overload). Triton 2.51 has no
admission limit for a whole ensemble, so the steps keep one themselves, in a small file both processes open:

* the preprocess step *admits* a request before it reads a byte of it, as a **lease** in one of ``capacity``
  slots, or refuses it at once (UNAVAILABLE, "server busy") when every slot is held;
* the network step ends the oldest lease each time it starts a request (its queue is first in, first out);
* a lease also ends when it **expires**: a request refused or dropped on its way (a full queue, its timeout,
  its client gone) never reaches the network, and its slot must not stay taken.

``capacity`` is what the network may hold waiting (its queue bound) plus what it computes at once, so a
request admitted here is one the network queue can take. The network also publishes how long it takes per
request under its current load (:class:`ServiceTime`), and a request is refused as well when the leases ahead
of it would take longer to start than it may wait in a queue (its Triton ``timeout``): under overload the
queue holds only what can start in time, on a slow machine or a slowed one as on a fast one, and a request
retried late in its deadline is refused at once rather than admitted, decoded and then answered too late.

The gate is open while no network has attached to the ledger (a GPU server's TensorRT network runs no Python
and never ends a lease). Times are ``time.monotonic()``: one clock for every process of the host.

On the CPU, ``NAME`` and ``NAME_pixels`` are the network step alone: it decodes their images itself, so it
admits them itself, at its :class:`Door`, by the same two rules (slots, and the work ahead against the request's
timeout) in its own process, with what is ahead known exactly. The ledger serves the tracking ensembles, whose
preprocess step still decodes before the network.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# The model parameter both steps read: the ledger's slots (derived in posetriton.server.repository).
CAPACITY_PARAMETER = "admission_capacity"
# A request that carries no timeout holds its lease at most this long: one refused or dropped on its way then
# frees its slot soon, and one that legitimately waits longer only lets the next ones meet the network's own
# queue bound, as without the gate.
MAX_LEASE_S = 5.0
# What a lease adds to the request's own timeout: the preprocess step's work before the network queue.
LEASE_MARGIN_S = 0.25

# The Python backend names a stub's region PREFIX + a 36-character UUID (argv[2]); the ledger shares the prefix,
# so the server's reaper removes it with the regions (posetriton.server.server_ownership.release).
_UUID_LENGTH = 36
# What follows the prefix in a ledger's name: the reaper removes ledgers with the regions, as an expected leftover.
LEDGER_INFIX = "admission_"
# The attached network step's pid (0: none) and its seconds per request (0.0: not measured yet).
_HEADER = struct.Struct("<qd")
_SLOT = struct.Struct("<d")  # a lease's expiry (monotonic seconds), 0.0 when free


def ledger_path(network_model: str, region_name: str | None = None, shm_dir: Path = Path("/dev/shm")) -> Path:
    """Where the steps of one server share the ledger of ``network_model``: beside the server's shared-memory
    regions, under their prefix (``region_name``: this stub's own region, by default read from its argv)."""
    if region_name is None:
        argv = Path("/proc/self/cmdline").read_bytes().split(b"\0")
        region_name = argv[2].decode() if len(argv) > 2 else "posetriton_"
    prefix = region_name[:-_UUID_LENGTH] if len(region_name) > _UUID_LENGTH else region_name
    return shm_dir / f"{prefix}{LEDGER_INFIX}{network_model}"


@dataclass(frozen=True)
class Lease:
    """One admitted request's slot and when its lease ends (index -1: admitted with the gate open)."""

    index: int
    expiry: float


def starts_too_late(waiting: int, service_s: float, timeout_s: float) -> bool:
    """The time rule of both gates: ``waiting`` requests ahead, at ``service_s`` each, would not let a request
    start within its Triton timeout ``timeout_s`` (the longest it may wait in a queue; 0: none)."""
    return timeout_s > 0 and waiting * service_s > timeout_s


def lease_seconds(timeout_us: int) -> float:
    """How long a request with Triton timeout ``timeout_us`` (0: none) may hold its lease."""
    return min(timeout_us / 1e6 + LEASE_MARGIN_S, MAX_LEASE_S) if timeout_us > 0 else MAX_LEASE_S


class AdmissionLedger:
    """The leases of one network's admitted requests, shared by the processes that open ``path``."""

    def __init__(self, path: Path, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"admission capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._size = _HEADER.size + capacity * _SLOT.size
        # O_NOFOLLOW: /dev/shm is shared with other users of the host; never write through a planted link.
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with self._locked():
            if os.fstat(self._fd).st_size < self._size:
                os.ftruncate(self._fd, self._size)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _slots(self) -> list[float]:
        data = os.pread(self._fd, self.capacity * _SLOT.size, _HEADER.size)
        return [value for (value,) in _SLOT.iter_unpack(data.ljust(self.capacity * _SLOT.size, b"\0"))]

    def _write_slot(self, index: int, value: float) -> None:
        os.pwrite(self._fd, _SLOT.pack(value), _HEADER.size + index * _SLOT.size)

    def attach(self, pid: int | None = None) -> None:
        """The network step runs here and ends leases: the gate applies from now on."""
        with self._locked():
            os.pwrite(self._fd, _HEADER.pack(os.getpid() if pid is None else pid, 0.0), 0)

    def detach(self) -> None:
        with self._locked():
            os.pwrite(self._fd, _HEADER.pack(0, 0.0), 0)

    def publish_service_time(self, seconds: float) -> None:
        """The network's current seconds per request (see :class:`ServiceTime`), for the preprocess step's gate."""
        with self._locked():
            os.pwrite(self._fd, struct.pack("<d", seconds), _HEADER.size - 8)

    def _header(self) -> tuple[int, float]:
        pid, service_s = _HEADER.unpack(os.pread(self._fd, _HEADER.size, 0).ljust(_HEADER.size, b"\0"))
        return int(pid), float(service_s)

    def service_time(self) -> float:
        """Seconds per request the network last published (0.0: not measured yet)."""
        with self._locked():
            return self._header()[1]

    def _attached(self, pid: int) -> bool:
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)  # a network stub that died ends no lease: the gate opens until one attaches again
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def admit(self, lease_s: float, wait_s: float = 0.0, now: float | None = None) -> Lease | None:
        """Take a lease of ``lease_s`` seconds; None when every slot is held by a live lease, or when the live
        leases would take the network longer than ``wait_s`` (the request's queue timeout; 0: none) to start at
        its published service time. With no network attached the gate is open: an empty lease."""
        now = time.monotonic() if now is None else now
        with self._locked():
            pid, service_s = self._header()
            if not self._attached(pid):
                return Lease(-1, 0.0)
            slots = self._slots()
            ahead = sum(expiry > now for expiry in slots)
            if starts_too_late(ahead, service_s, wait_s):
                return None
            for index, expiry in enumerate(slots):
                if expiry <= now:
                    self._write_slot(index, now + lease_s)
                    return Lease(index, now + lease_s)
        return None

    def cancel(self, lease: Lease) -> None:
        """Give a lease back early (its request failed before the network): its slot is free again, unless the
        network already ended it and another request holds it now."""
        if lease.index < 0:
            return
        with self._locked():
            if self._slots()[lease.index] == lease.expiry:
                self._write_slot(lease.index, 0.0)

    def started(self, now: float | None = None) -> None:
        """The network started a request: end the oldest live lease (the one expiring first)."""
        now = time.monotonic() if now is None else now
        with self._locked():
            live = [(expiry, index) for index, expiry in enumerate(self._slots()) if expiry > now]
            if live:
                self._write_slot(min(live)[1], 0.0)

    def held(self, now: float | None = None) -> int:
        """Live leases now (for metrics and tests)."""
        now = time.monotonic() if now is None else now
        with self._locked():
            return sum(expiry > now for expiry in self._slots())

    def close(self) -> None:
        os.close(self._fd)


class ServiceTime:
    """Seconds the network takes per request under its current load: a moving average of the time between
    answers while it is busy (from when it last turned busy, for the first answer after an idle spell).

    With several requests in flight that interval is the inverse of the network's throughput, which is what a
    queued request waits per request ahead of it; for a lone request it is its latency."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self.smoothing = smoothing
        self.seconds = 0.0
        self._busy_since: float | None = None
        self._last_answer = 0.0
        self._in_flight = 0
        self._lock = threading.Lock()  # started on Triton's thread, answered on the runtime's callback thread

    def started(self, now: float) -> None:
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = now
            self._in_flight += 1

    def dropped(self) -> None:
        """A request counted as started that never ran (nothing will answer it)."""
        with self._lock:
            self._in_flight = max(self._in_flight - 1, 0)

    def answered(self, now: float) -> float:
        """One request answered at ``now``: the updated seconds per request."""
        with self._lock:
            since = max(self._last_answer, self._busy_since if self._busy_since is not None else now)
            interval = max(now - since, 0.0)
            average = self.seconds + self.smoothing * (interval - self.seconds) if self.seconds else interval
            self.seconds = average
            self._last_answer = now
            self._in_flight = max(self._in_flight - 1, 0)
            return average


# The model parameter of a step that admits its own requests (:class:`Door`): how many may wait to start.
DOOR_CAPACITY_PARAMETER = "door_capacity"
# What waits at a door, on Triton's metrics endpoint (labels: model), since Triton's own queue series see none of it
# (the requests leave its queue at once): the requests waiting now, the microseconds the started ones waited before
# their decode, and the requests refused busy. The HPA's queue time and the alerts read them (k8s/monitoring/).
DOOR_PENDING_METRIC = "posetriton_door_pending_request_count"
DOOR_QUEUE_METRIC = "posetriton_door_queue_duration_us"
DOOR_REFUSED_METRIC = "posetriton_door_refused_request_count"


class Door:
    """Admission of a step that queues its own requests before their decode (the CPU network step, which decodes
    the images of the CPU ensembles itself): its ``execute`` admits or refuses each request at once and never waits,
    so Triton's queue stays empty and the decision is taken here, in the process that does the work, with what is
    ahead known exactly. A request is refused when ``capacity`` requests already wait to start, or when those
    waiting would not let it start within its Triton timeout (the longest it may wait in a queue, which the SDK
    sets to a share of its deadline) at the step's current service time (:class:`ServiceTime`): what Triton's
    queue would drop at that timeout, uncomputed but late, the door refuses at once. The rules of
    :class:`AdmissionLedger`, which keeps them across processes for the preprocess step."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"door capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.waiting = 0
        self.refused = 0  # in all (for the metrics)
        self.queued_us = 0.0  # microseconds the started requests waited before their decode, in all
        self._lock = threading.Lock()  # admitted on Triton's thread, started on the decode threads

    def admit(self, timeout_s: float, service_s: float) -> str | None:
        """Admit a request with Triton timeout ``timeout_s`` (0: none) and count it as waiting; or say why not."""
        with self._lock:
            if self.waiting >= self.capacity:
                refusal = f"already holds as many requests waiting to start as it may ({self.capacity})"
            elif starts_too_late(self.waiting, service_s, timeout_s):
                refusal = (
                    f"would not start this request within its timeout ({timeout_s:.3g} s): {self.waiting} "
                    f"request(s) wait ahead of it at {service_s * 1e3:.0f} ms each"
                )
            else:
                self.waiting += 1
                return None
            self.refused += 1
            return refusal

    def dequeued(self, waited_s: float) -> None:
        """An admitted request's work begins (its decode) after ``waited_s`` seconds at the door."""
        with self._lock:
            self.queued_us += waited_s * 1e6

    def started(self) -> None:
        """An admitted request left the wait: started, or answered without starting."""
        with self._lock:
            self.waiting = max(self.waiting - 1, 0)
