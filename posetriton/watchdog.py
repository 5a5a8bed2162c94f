"""Notice a Python-backend stub that died and bring its model back.

Triton 2.51 does not restart a dead stub: every request to that model instance then fails with
"Stub process '<instance>' is not healthy" while the model still reports ready, so readiness
probes never see it. The watchdog compares the stub processes of the server with the models
the server says are ready, reports a missing one, and reloads its model (unload + load through
the repository API, which starts fresh stubs).
"""

from __future__ import annotations

import json
import os
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
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
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
        known = python_stubs(self.server_pid)
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
