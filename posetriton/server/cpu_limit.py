"""The container's CPU limit, for sizing thread pools (OpenVINO) to it rather than to the node's cores.

Under Kubernetes' default (none) CPU manager policy a container may run on every core of its node
but only gets its limit's worth of CPU time; a thread pool sized to the visible cores is then
throttled. The Deployment hands the limit over through the downward API (``resourceFieldRef:
limits.cpu``, divisor 1, rounded up to whole CPUs) in ``POSETRITON_CPU_LIMIT``.
"""

from __future__ import annotations

import os

CPU_LIMIT_ENV = "POSETRITON_CPU_LIMIT"


def container_cpu_limit() -> int | None:
    """Whole CPUs this container may use, or None when not set (outside Kubernetes: let the library decide)."""
    value = os.environ.get(CPU_LIMIT_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{CPU_LIMIT_ENV} must be a whole number of CPUs >= 1, got {value!r}")
    return int(value)
