"""What a ``tritonserver`` starts ends with it: its Python-backend stubs and their shared-memory regions.

Triton's Python backend forks one stub per model instance and gives each a region in ``/dev/shm``. When
``tritonserver`` dies without shutting down (SIGKILL, the OOM killer, a crash) the stubs are re-parented to
init and may keep running (they ignore SIGTERM), and the regions stay. Each server gets its own region prefix
(``--backend-config=python,shm-region-prefix-name=PREFIX``). A stub's command line carries its region's name
(argv[2]), so the stubs and regions of one server are found by that prefix alone, whoever their parent is now,
and never confused with those of another server on the same host.

:class:`ServerReaper` watches the server process (a pidfd, so it does not reap it) and, once it has exited,
SIGKILLs its stubs and removes its regions (:func:`release`). The launcher (``posetriton serve``, the test
fixtures) and the container entry point (``python -m posetriton.server.watchdog``) both run one beside their server.

``POSETRITON_SHM_PREFIX`` sets the start of every prefix made here (default ``posetriton_``); each server adds
its own unique part. A test session sets it to find, at its end, anything of its own servers left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from posetriton.server.admission import LEDGER_INFIX

STUB_BINARY = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
PREFIX_ENV = "POSETRITON_SHM_PREFIX"
DEFAULT_PREFIX_BASE = "posetriton_"
BACKEND_CONFIG_FLAG = "--backend-config"
PREFIX_SETTING = "python,shm-region-prefix-name="
# A region name is a file name in /dev/shm: keep prefixes to characters no shell or glob treats specially.
_PREFIX_CHARACTERS = re.compile(r"[A-Za-z0-9_.-]+")
# SIGKILL takes effect at once, but a stub in uninterruptible I/O ends when that returns: wait this long.
RELEASE_TIMEOUT_S = 10.0


def new_shm_prefix() -> str:
    """A prefix no other server uses: ``$POSETRITON_SHM_PREFIX`` (or ``posetriton_``), this pid, random hex."""
    base = os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX_BASE
    if not _PREFIX_CHARACTERS.fullmatch(base):
        raise ValueError(f"{PREFIX_ENV} may hold only letters, digits, '_', '.' and '-', got {base!r}")
    return f"{base}{os.getpid()}_{secrets.token_hex(4)}_"


def shm_prefix_in(command: Sequence[str]) -> str | None:
    """The Python-backend region prefix a Triton command line sets (``--backend-config[=| ]python,...``)."""
    found = None
    for arg, following in zip(command, [*command[1:], ""], strict=True):
        value = arg.removeprefix(f"{BACKEND_CONFIG_FLAG}=") if arg.startswith(f"{BACKEND_CONFIG_FLAG}=") else None
        if arg == BACKEND_CONFIG_FLAG:
            value = following
        if value is not None and value.startswith(PREFIX_SETTING):
            found = value.removeprefix(PREFIX_SETTING)
    return found


def with_shm_prefix(command: Sequence[str]) -> tuple[list[str], str]:
    """``command`` with a region prefix of its own (a new one appended unless it sets one), and that prefix."""
    existing = shm_prefix_in(command)
    if existing:
        return list(command), existing
    prefix = new_shm_prefix()
    return [*command, f"{BACKEND_CONFIG_FLAG}={PREFIX_SETTING}{prefix}"], prefix


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    state: str  # "Z" for a zombie
    argv: list[str]

    @property
    def is_stub(self) -> bool:
        return self.argv[0].endswith(STUB_BINARY) and self.state != "Z"


def processes() -> list[ProcessInfo]:
    """Every process this user can read in ``/proc``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline") as cmdline:
                argv = cmdline.read().split("\0")
        except (OSError, IndexError):
            continue
        found.append(ProcessInfo(int(entry), int(fields[1]), fields[0], argv))
    return found


def stubs_of(prefix: str) -> list[int]:
    """Live Python-backend stubs whose region has ``prefix``: the stubs of the server that set it."""
    return sorted(p.pid for p in processes() if p.is_stub and len(p.argv) > 2 and p.argv[2].startswith(prefix))


def servers_of(prefix: str) -> list[int]:
    """Live processes other than stubs whose command line sets a region prefix starting with ``prefix``
    (``tritonserver``, or an entry point that passes it on)."""
    setting = f"{PREFIX_SETTING}{prefix}"
    return sorted(
        p.pid for p in processes() if p.state != "Z" and not p.is_stub and any(setting in arg for arg in p.argv)
    )


def regions_of(prefix: str) -> list[Path]:
    """The shared-memory regions named with ``prefix``."""
    return sorted(SHM_DIR.glob(f"{prefix}*"))


@dataclass(frozen=True)
class Released:
    """What :func:`release` ended and removed (empty after a clean shutdown)."""

    stubs: tuple[int, ...]
    regions: tuple[str, ...]
    # Admission ledgers (posetriton.server.admission): left to the reaper by design, so not a sign of a bad stop.
    ledgers: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.stubs or self.regions)


def release(prefix: str, timeout: float = RELEASE_TIMEOUT_S) -> Released:
    """SIGKILL the stubs of ``prefix`` (they ignore SIGTERM), wait until they are gone, remove its regions.

    Only for a server that has exited: a live one still uses both. A stub that became our child (we are its
    subreaper or PID 1) is reaped too, so it does not stay a zombie.
    """
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while (stubs := stubs_of(prefix)) and time.monotonic() < deadline:
        for pid in stubs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        for pid in stubs:
            with contextlib.suppress(ChildProcessError):  # not our child: init reaps it
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    removed: list[str] = []
    ledgers: list[str] = []
    for region in regions_of(prefix):
        region.unlink(missing_ok=True)
        (ledgers if region.name[len(prefix) :].startswith(LEDGER_INFIX) else removed).append(region.name)
    return Released(tuple(sorted(set(killed))), tuple(removed), tuple(ledgers))


class ServerReaper(threading.Thread):
    """Waits for the process ``server_pid`` to exit, however it ends, then :func:`release` s ``prefix``.

    ``report`` is told what was left behind (nothing after a clean shutdown, when Triton ends its stubs itself).
    :meth:`wait_released` returns once that is done.
    """

    def __init__(self, server_pid: int, prefix: str, report: Callable[[str], None] | None = None) -> None:
        super().__init__(name=f"posetriton-reaper-{server_pid}", daemon=True)
        self.server_pid, self.prefix = server_pid, prefix
        self.report = report
        self.released: Released | None = None
        self._done = threading.Event()
        # Opened now, while the process exists (at worst a zombie): a pid reused later cannot be mistaken for it.
        self._pidfd: int | None = os.pidfd_open(server_pid)

    def run(self) -> None:
        try:
            assert self._pidfd is not None
            select.select([self._pidfd], [], [])  # readable once the process has exited
            self.released = release(self.prefix)
            if self.released and self.report is not None:
                self.report(
                    f"tritonserver (pid {self.server_pid}) ended without stopping its Python-backend stubs: "
                    f"killed {len(self.released.stubs)} stub(s) {list(self.released.stubs)} and removed "
                    f"{len(self.released.regions)} shared-memory region(s) {self.prefix}*"
                )
        finally:
            os.close(self._pidfd)  # type: ignore[arg-type]
            self._pidfd = None
            self._done.set()

    def wait_released(self, timeout: float = RELEASE_TIMEOUT_S + 5) -> Released:
        """Block until the server has exited and its leftovers are gone; what was released."""
        if not self._done.wait(timeout) or self.released is None:
            raise TimeoutError(f"stubs or regions of {self.prefix} still there {timeout:.0f} s after the server ended")
        return self.released
