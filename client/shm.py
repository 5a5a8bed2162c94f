"""System shared memory for a client on the same host as the server (Triton's system shm API).

The input tensor (``IMAGE`` bytes or ``PIXELS``) is written into a POSIX shared memory region
that the server has registered, and the request carries only the region's name and size
instead of the data. Outputs come back in the gRPC response as usual: they are small (a few
KB per image) and their size depends on the number of people found.

A pool keeps one region per request in flight and reuses them; a region too small for a
request is replaced by a larger one (sizes round up to powers of two). ``close()`` unregisters
and unlinks every region, waiting (up to ``RELEASE_WAIT_S``) for the server to release it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.utils.shared_memory as shm
from numpy.typing import NDArray

MIN_REGION_BYTES = 1 << 16
# Triton refuses to unregister a region that a request still holds ("currently in use"); an
# ensemble may release its input a moment after the response reached the client, so retry.
RELEASE_WAIT_S = 10.0
RELEASE_POLL_S = 0.02


def still_in_use(error: Exception) -> bool:
    """Whether Triton refused to unregister a region because a request still holds it."""
    return "currently in use" in str(error)


@dataclass
class Region:
    """A registered region: Triton knows it as ``name``; ``key`` is its POSIX shm name."""

    name: str
    key: str
    size: int
    handle: Any

    def write_bytes_tensor(self, items: Sequence[bytes]) -> int:
        """Serialise BYTES elements as Triton expects (little-endian uint32 length, then the bytes); return the size."""
        buffer = self.handle._mpsm_handle.buf  # tritonclient's own handle; no public zero-copy writer exists
        offset = 0
        for item in items:
            struct.pack_into("<I", buffer, offset, len(item))
            buffer[offset + 4 : offset + 4 + len(item)] = item
            offset += 4 + len(item)
        return offset

    def write_array(self, array: NDArray[Any]) -> int:
        shm.set_shared_memory_region(self.handle, [np.ascontiguousarray(array)])
        return int(array.nbytes)


def bytes_tensor_size(items: Sequence[bytes]) -> int:
    return sum(4 + len(item) for item in items)


class RegionPool:
    """Regions not in use, by size; thread-safe so the sync client can share it across threads."""

    def __init__(self) -> None:
        self._prefix = f"posetriton_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self._counter = itertools.count()
        self._free: list[Region] = []
        self._all: list[Region] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> tuple[Region, bool, Region | None]:
        """A free region of at least ``nbytes``: ``(region, created, replaced)``.

        A created region still has to be registered with the server; ``replaced`` (a free region
        that was too small, or None) has to be unregistered and then passed to :func:`destroy`.
        """
        with self._lock:
            fitting = [r for r in self._free if r.size >= nbytes]
            if fitting:
                region = min(fitting, key=lambda r: r.size)
                self._free.remove(region)
                return region, False, None
            replaced = self._free.pop() if self._free else None
            if replaced is not None:
                self._all.remove(replaced)
            size = max(MIN_REGION_BYTES, 1 << max(0, nbytes - 1).bit_length())
            number = next(self._counter)
            name = f"{self._prefix}_{number}"
            key = f"/{name}"
            region = Region(name, key, size, shm.create_shared_memory_region(name, key, size, create_only=True))
            self._all.append(region)
            return region, True, replaced

    def give_back(self, region: Region) -> None:
        with self._lock:
            if region in self._all:
                self._free.append(region)

    def forget(self, region: Region) -> None:
        """Drop a region that could not be registered."""
        with self._lock:
            if region in self._all:
                self._all.remove(region)
        destroy(region)

    def drain(self) -> list[Region]:
        """Every region, for the client to unregister and destroy when it closes."""
        with self._lock:
            regions, self._all, self._free = self._all, [], []
        return regions


def destroy(region: Region) -> None:
    with contextlib.suppress(shm.SharedMemoryException):
        shm.destroy_shared_memory_region(region.handle)
