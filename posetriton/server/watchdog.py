"""Notice a Python-backend stub that died and bring its model back.

Triton 2.51 does not restart a dead stub: every request to that model instance then fails with
"Stub process '<instance>' is not healthy" while the model still reports ready, so readiness
probes never see it. The watchdog compares the stub processes of the server with the models
the server says are ready, reports a missing one, and reloads its model (unload + load through
the repository API, which starts fresh stubs).

A reload that fails, or more than ``max_reloads`` reloads within ``window_s``, means the process
cannot heal itself: the watchdog then gives up, and its owner stops Triton and exits non-zero so
that whoever runs it (Kubernetes, systemd) starts a fresh one.

The control APIs Triton exposes next to inference (model repository, shared memory, logging,
trace) are closed to clients: Triton runs with ``--grpc-restricted-protocol`` and
``--http-restricted-api`` behind two keys made afresh at every start (``AdminKeys.generate``, see
``posetriton.server.admin_keys``): model control (with logging and trace), which only the watchdog and the
launcher send for their reloads, and shared memory, for clients on the same host.

``posetriton.server.launcher`` runs the watchdog beside the server it starts. In a container, where
Triton is the entry point, ``python -m posetriton.server.watchdog -- tritonserver ARGS...`` runs Triton
as a child with the watchdog beside it (see ``supervise``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posetriton.server.admin_keys import AdminKeys, command_line_exposure
from posetriton.server.server_ownership import ServerReaper, processes, with_shm_prefix

# Triton's own default for --exit-timeout-secs; we kill it this long after that if it has not exited.
TRITON_EXIT_TIMEOUT_S = 30
KILL_GRACE_S = 5
# Exit status when the watchdog gave up (a reload failed, or too many reloads): restart me.
EXIT_GAVE_UP = 70


@dataclass(frozen=True)
class StubFailure:
    model: str
    instance: str
    pid: int
    detected_at: float
    recovered_after_s: float | None


def python_stubs(server_pid: int) -> dict[str, tuple[int, str]]:
    """``instance name -> (pid, model name)`` for the server's live Python-backend stubs."""
    return {
        p.argv[8]: (p.pid, Path(p.argv[1]).parent.parent.name)
        for p in processes()
        if p.ppid == server_pid and p.is_stub and len(p.argv) >= 9
    }


class StubWatchdog(threading.Thread):
    """Polls every ``interval`` seconds; a stub gone from a READY model triggers a report and a reload.

    ``headers`` go with every repository call (the admin key of a server with restricted APIs).
    ``give_up(reason)`` is called once, and the watchdog stops, when a reload fails or when more than
    ``max_reloads`` reloads happened within ``window_s``: a server whose stubs keep dying is not healing.
    """

    def __init__(
        self,
        server_pid: int,
        http_url: str,
        interval: float = 2.0,
        report: Callable[[str], None] | None = None,
        headers: Mapping[str, str] | None = None,
        give_up: Callable[[str], None] | None = None,
        max_reloads: int = 3,
        window_s: float = 600.0,
    ) -> None:
        super().__init__(name="posetriton-stub-watchdog", daemon=True)
        self.server_pid, self.http_url, self.interval = server_pid, http_url, interval
        self.report = report or (lambda message: print(f"posetriton: {message}", file=sys.stderr, flush=True))
        self.headers = dict(headers or {})
        self.give_up = give_up
        self.max_reloads, self.window_s = max_reloads, window_s
        self.gave_up: str | None = None
        self.failures: list[StubFailure] = []
        self.watched: dict[str, tuple[int, str]] = {}
        self._reloads: deque[float] = deque()
        self._stopping = threading.Event()

    def start(self) -> None:
        # The stubs alive now are the reference: one that dies after start() returns is noticed.
        self.watched = python_stubs(self.server_pid)
        super().start()

    def stop(self, wait: bool = True) -> None:
        """Stop watching; before the server shuts down, since its stubs then go away on purpose."""
        self._stopping.set()
        if wait and self.is_alive():
            self.join(timeout=10)

    def _post(self, path: str) -> Any:
        request = urllib.request.Request(f"{self.http_url}{path}", data=b"{}", method="POST", headers=self.headers)
        with urllib.request.urlopen(request, timeout=300) as response:
            body = response.read()
        return json.loads(body) if body else {}

    def _ready_models(self) -> set[str]:
        index = self._post("/v2/repository/index")
        return {m["name"] for m in index if m.get("state") == "READY"}

    def run(self) -> None:
        known = self.watched
        while not self._stopping.wait(self.interval):
            try:
                current = python_stubs(self.server_pid)
                lost = {name: known[name] for name in known.keys() - current.keys()}
                if lost:
                    self._recover(lost, self._ready_models())
                    current = python_stubs(self.server_pid)
                known = current
            except OSError as exc:  # the server is going away or busy: try again next round
                self.report(f"stub watchdog could not check the server: {exc}")

    def _recover(self, lost: dict[str, tuple[int, str]], ready: set[str]) -> None:
        for model in sorted({model for _, model in lost.values()} & ready):
            if self._stopping.is_set():
                return
            dead = [(instance, pid) for instance, (pid, m) in lost.items() if m == model]
            started = time.monotonic()
            while self._reloads and started - self._reloads[0] > self.window_s:
                self._reloads.popleft()
            if len(self._reloads) >= self.max_reloads:
                self._give_up(
                    f"stub(s) {dead} of model '{model}' died after {len(self._reloads)} reloads within "
                    f"{self.window_s:.0f} s"
                )
                return
            self._reloads.append(started)
            self.report(f"Python-backend stub(s) {dead} of model '{model}' died; reloading '{model}'")
            try:
                self._post(f"/v2/repository/models/{model}/unload")
                self._post(f"/v2/repository/models/{model}/load")
                recovered: float | None = time.monotonic() - started
                self.report(f"model '{model}' reloaded in {recovered:.1f} s")
            except OSError as exc:
                recovered = None
                self.report(f"reloading model '{model}' failed: {_reason(exc)}")
            for instance, pid in dead:
                self.failures.append(StubFailure(model, instance, pid, started, recovered))
            if recovered is None:
                self._give_up(f"model '{model}' could not be reloaded")
                return

    def _give_up(self, reason: str) -> None:
        self.gave_up = reason
        self._stopping.set()
        self.report(f"stub watchdog gives up: {reason}; the server must be restarted")
        if self.give_up is not None:
            self.give_up(reason)


def _reason(error: OSError) -> str:
    """Triton's own words for a refused repository call (the JSON body of an HTTP error), else the error."""
    if isinstance(error, urllib.error.HTTPError):
        try:
            return f"HTTP {error.code}: {json.loads(error.read())['error']}"
        except (ValueError, KeyError, OSError):
            return f"HTTP {error.code}"
    return str(error)


# --- in-container supervisor ------------------------------------------------------------------


def _flag_value(command: list[str], flag: str, default: str) -> str:
    """The last value of ``--flag=value`` or ``--flag value`` (Triton takes both), else ``default``."""
    values = []
    for arg, following in zip(command, [*command[1:], None], strict=True):
        if arg.startswith(f"{flag}="):
            values.append(arg.split("=", 1)[1])
        elif arg == flag and following is not None:
            values.append(following)
    return values[-1] if values else default


def http_ready(http_url: str) -> bool:
    """Whether Triton at ``http_url`` answers its readiness endpoint (every model ready, with strict readiness)."""
    try:
        with urllib.request.urlopen(f"{http_url}/v2/health/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def exit_timeout_s(command: list[str]) -> float:
    """Triton's ``--exit-timeout-secs`` in a command line (its default when absent)."""
    return float(_flag_value(command, "--exit-timeout-secs", str(TRITON_EXIT_TIMEOUT_S)))


def wait_or_kill(
    process: subprocess.Popen[bytes], deadline: float, report: Callable[[str], None], what: str = "tritonserver"
) -> int:
    """Wait for ``process`` until ``deadline`` (``time.monotonic()``); then SIGKILL its process group and say so.

    Triton 2.51 was once seen logging "Exit timeout expired. Exiting immediately." and then hanging in a
    futex wait: a shutdown must end anyway. The process group (started with ``start_new_session``) holds
    Triton's Python-backend stubs too, so none is left behind.
    """
    try:
        return process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    report(f"{what} (pid {process.pid}) did not exit in time after it was asked to stop; killing it")
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    return process.wait()


def _report(message: str) -> None:
    print(f"posetriton: {message}", file=sys.stderr, flush=True)


def supervise(
    command: list[str], interval: float = 2.0, control_key_file: Path | None = None, max_reloads: int = 3,
    window_s: float = 600.0, shm_key_file: Path | None = None,
) -> int:  # fmt: skip
    """Run ``tritonserver`` as a child with a stub watchdog beside it; return its exit code.

    For containers, where no launcher starts Triton: SIGTERM and SIGINT go to Triton unchanged
    (it drains in-flight requests), its output goes to ours, and we exit with its code. The
    watchdog reloads models through the repository API, so Triton must run with
    ``--model-control-mode=explicit`` (and ``--load-model=*`` to load everything at start).

    The control APIs are restricted behind two keys made here, at every start (see ``start_keys``);
    they never appear in a manifest or an image.
    Triton is killed when it has not exited ``KILL_GRACE_S`` after its own ``--exit-timeout-secs``.
    When the watchdog gives up, Triton is stopped and we exit ``EXIT_GAVE_UP``.
    """
    if not command:
        raise SystemExit(
            "usage: python -m posetriton.server.watchdog [--interval S] [--control-key-file F] [--shm-key-file F] "
            "-- tritonserver ..."
        )
    if _flag_value(command, "--model-control-mode", "none") != "explicit":
        raise SystemExit(
            "posetriton.server.watchdog: Triton must run with --model-control-mode=explicit (and --load-model=*): "
            "reloading a model whose stub died goes through the repository API, which other modes refuse"
        )
    address = _flag_value(command, "--http-address", "127.0.0.1")
    http_url = f"http://{'127.0.0.1' if address in ('0.0.0.0', '::') else address}:" + _flag_value(
        command, "--http-port", "8000"
    )
    keys = start_keys(control_key_file, shm_key_file)
    command, shm_prefix = with_shm_prefix(command)
    server = subprocess.Popen([*command, *keys.triton_args()], start_new_session=True)
    reaper = _reap_when_gone(server, shm_prefix)
    watchdog: StubWatchdog | None = None
    stopping = threading.Event()
    gave_up = threading.Event()
    stop_by: list[float] = []

    def shut_down(signum: int) -> None:
        if not stop_by:
            stop_by.append(time.monotonic() + exit_timeout_s(command) + KILL_GRACE_S)
        stopping.set()
        if watchdog is not None:  # stubs now exit on purpose: a reload would keep a model alive
            watchdog.stop(wait=False)
        if server.poll() is None:
            server.send_signal(signum)

    def give_up(reason: str) -> None:
        gave_up.set()
        shut_down(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: shut_down(signum))
    try:
        while server.poll() is None and not stopping.is_set() and not http_ready(http_url):
            time.sleep(0.5)
        if server.poll() is None and not stopping.is_set():
            watchdog = StubWatchdog(
                server.pid, http_url, interval, headers=keys.control.http_headers, give_up=give_up,
                max_reloads=max_reloads,
                window_s=window_s,
            )  # fmt: skip
            watchdog.start()
            stubs, models = len(watchdog.watched), len({model for _, model in watchdog.watched.values()})
            watchdog.report(f"stub watchdog: watching {stubs} Python-backend stubs of {models} models")
            if stopping.is_set():  # a signal between the two checks
                watchdog.stop(wait=False)
        while server.poll() is None and not stop_by:
            stopping.wait(0.5)
        code = wait_or_kill(server, stop_by[0], _report) if stop_by else server.wait()
        if gave_up.is_set():
            return EXIT_GAVE_UP
        return code if code >= 0 else 128 - code  # killed by signal N: exit 128 + N, as a shell reports it
    finally:
        if watchdog is not None:
            watchdog.stop()
        if server.poll() is not None:
            reaper.wait_released()


def _reap_when_gone(server: subprocess.Popen[bytes], shm_prefix: str) -> ServerReaper:
    """However Triton ends, its stubs end and its shared memory goes with it (posetriton.server.server_ownership)."""
    reaper = ServerReaper(server.pid, shm_prefix, _report)
    reaper.start()
    return reaper


def start_keys(control_key_file: Path | None, shm_key_file: Path | None) -> AdminKeys:
    """The keys of this start, each written (mode 0600, created exclusively) where asked, and who can see them.

    A file left by an earlier start of the same container (the pod's ``/tmp`` outlives it) is
    replaced; a symlink or another user's file in its place is refused.
    """
    keys = AdminKeys.generate()
    for key, path in ((keys.control, control_key_file), (keys.shared_memory, shm_key_file)):
        if path is not None:
            key.write(path, replace_own=True)
    _report(
        f"restricted APIs: {', '.join(keys.control.apis)} need header '{keys.control.name}'"
        + (f" (key in {control_key_file})" if control_key_file else " (key not written to any file)")
        + f"; {', '.join(keys.shared_memory.apis)} needs header '{keys.shared_memory.name}'"
        + (f" (key in {shm_key_file})" if shm_key_file else " (key not written to any file)")
        + f". {command_line_exposure()}"
    )
    return keys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    options: dict[str, str] = {}
    entry_options = ("--interval", "--control-key-file", "--shm-key-file", "--max-reloads", "--reload-window")
    while args and args[0] in entry_options:
        options[args[0]], args = args[1], args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    control_key, shm_key = options.get("--control-key-file"), options.get("--shm-key-file")
    return supervise(
        args, float(options.get("--interval", 2.0)), Path(control_key) if control_key else None,
        int(options.get("--max-reloads", 3)), float(options.get("--reload-window", 600.0)),
        Path(shm_key) if shm_key else None,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
