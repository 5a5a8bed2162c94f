"""Notice a Python-backend stub that died and bring its model back.

Triton 2.51 does not restart a dead stub: every request to that model instance then fails with
"Stub process '<instance>' is not healthy" while the model still reports ready, so readiness
probes never see it. The watchdog compares the stub processes of the server with the models
the server says are ready, reports a missing one, and reloads its model (unload + load through
the repository API, which starts fresh stubs).

``posetriton.launcher`` runs the watchdog beside the server it starts. In a container, where
Triton is the entry point, ``python -m posetriton.watchdog -- tritonserver ARGS...`` runs Triton
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
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STUB_BINARY = "triton_python_backend_stub"


@dataclass(frozen=True)
class StubFailure:
    model: str
    instance: str
    pid: int
    detected_at: float
    recovered_after_s: float | None


def python_stubs(server_pid: int) -> dict[str, tuple[int, str]]:
    """``instance name -> (pid, model name)`` for the server's live Python-backend stubs."""
    stubs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline") as cmdline:
                argv = cmdline.read().split("\0")
        except OSError:
            continue
        if int(fields[1]) != server_pid or not argv[0].endswith(STUB_BINARY) or len(argv) < 9 or fields[0] == "Z":
            continue
        stubs[argv[8]] = (int(entry), Path(argv[1]).parent.parent.name)
    return stubs


class StubWatchdog(threading.Thread):
    """Polls every ``interval`` seconds; a stub gone from a READY model triggers a report and a reload."""

    def __init__(
        self,
        server_pid: int,
        http_url: str,
        interval: float = 2.0,
        report: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name="posetriton-stub-watchdog", daemon=True)
        self.server_pid, self.http_url, self.interval = server_pid, http_url, interval
        self.report = report or (lambda message: print(f"posetriton: {message}", file=sys.stderr, flush=True))
        self.failures: list[StubFailure] = []
        self.watched: dict[str, tuple[int, str]] = {}
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
        request = urllib.request.Request(f"{self.http_url}{path}", data=b"{}", method="POST")
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
            self.report(f"Python-backend stub(s) {dead} of model '{model}' died; reloading '{model}'")
            try:
                self._post(f"/v2/repository/models/{model}/unload")
                self._post(f"/v2/repository/models/{model}/load")
                recovered: float | None = time.monotonic() - started
                self.report(f"model '{model}' reloaded in {recovered:.1f} s")
            except OSError as exc:
                recovered = None
                self.report(f"reloading model '{model}' failed: {exc}")
            for instance, pid in dead:
                self.failures.append(StubFailure(model, instance, pid, started, recovered))


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


def supervise(command: list[str], interval: float = 2.0) -> int:
    """Run ``tritonserver`` as a child with a stub watchdog beside it; return its exit code.

    For containers, where no launcher starts Triton: SIGTERM and SIGINT go to Triton unchanged
    (it drains in-flight requests), its output goes to ours, and we exit with its code. The
    watchdog reloads models through the repository API, so Triton must run with
    ``--model-control-mode=explicit`` (and ``--load-model=*`` to load everything at start).
    """
    if not command:
        raise SystemExit("usage: python -m posetriton.watchdog [--interval S] -- tritonserver ARGS...")
    if _flag_value(command, "--model-control-mode", "none") != "explicit":
        raise SystemExit(
            "posetriton.watchdog: Triton must run with --model-control-mode=explicit (and --load-model=*): "
            "reloading a model whose stub died goes through the repository API, which other modes refuse"
        )
    address = _flag_value(command, "--http-address", "127.0.0.1")
    http_url = f"http://{'127.0.0.1' if address in ('0.0.0.0', '::') else address}:" + _flag_value(
        command, "--http-port", "8000"
    )
    server = subprocess.Popen(command)
    watchdog: StubWatchdog | None = None
    stopping = threading.Event()

    def shut_down(signum: int, _frame: object) -> None:
        stopping.set()
        if watchdog is not None:  # stubs now exit on purpose: a reload would keep a model alive
            watchdog.stop(wait=False)
        server.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, shut_down)
    try:
        while server.poll() is None and not stopping.is_set() and not http_ready(http_url):
            time.sleep(0.5)
        if server.poll() is None and not stopping.is_set():
            watchdog = StubWatchdog(server.pid, http_url, interval)
            watchdog.start()
            stubs, models = len(watchdog.watched), len({model for _, model in watchdog.watched.values()})
            watchdog.report(f"stub watchdog: watching {stubs} Python-backend stubs of {models} models")
            if stopping.is_set():  # a signal between the two checks
                watchdog.stop(wait=False)
        code = server.wait()
        return code if code >= 0 else 128 - code  # killed by signal N: exit 128 + N, as a shell reports it
    finally:
        if watchdog is not None:
            watchdog.stop()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    interval = 2.0
    if args[:1] == ["--interval"]:
        interval, args = float(args[1]), args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    return supervise(args, interval)


if __name__ == "__main__":
    sys.exit(main())
