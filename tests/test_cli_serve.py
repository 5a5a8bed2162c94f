"""`posetriton serve` as a user runs it: a real subprocess, stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from posetriton.server.launcher import BINARY_ENV
from posetriton.server.server_ownership import regions_of, shm_prefix_in, stubs_of
from posetriton.server.watchdog import KILL_GRACE_S, TRITON_EXIT_TIMEOUT_S, http_ready
from tests.conftest import SESSION_SHM_PREFIX, UL_MODEL, free_port, leftovers, wait_until

POSETRITON = Path(sys.executable).parent / "posetriton"
READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60
STANDIN = Path(__file__).parent / "standins" / "tritonserver_ignoring_sigterm.py"


def _serve(repository: Path, http: int, grpc: int, metrics: int, *options: str) -> list[str]:
    return [
        str(POSETRITON), "serve", "--repository", str(repository), "--http-port", str(http),
        "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--model", f"{UL_MODEL}_postprocess", *options,
    ]  # fmt: skip


def _stop(process: subprocess.Popen[str]) -> None:
    """Cleanup for a failed test: SIGTERM lets serve stop its tritonserver; SIGKILL only as a last resort."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_serve_runs_until_ctrl_c_and_frees_its_ports(model_repository: Path, tmp_path: Path) -> None:
    http, grpc, metrics = free_port(), free_port(), free_port()
    log = tmp_path / "triton.log"
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    command = _serve(model_repository, http, grpc, metrics, "--log-file", str(log))
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "Triton is ready" not in stdout.read_text():  # serve says so once Triton answers
            assert process.poll() is None, f"serve exited with {process.returncode}: {stderr.read_text()}"
            assert time.monotonic() < deadline, f"not ready after {READY_TIMEOUT_S} s; log:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        assert process.poll() is None and http_ready(f"http://127.0.0.1:{http}")
        assert f"Triton is ready: gRPC 127.0.0.1:{grpc}, HTTP http://127.0.0.1:{http}" in stdout.read_text()
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", grpc)) == 0, "the gRPC port is served"
        # It names both keys' headers and files and says who else can read tritonserver's command line; the
        # values themselves are in the files only, never in what serve or Triton print.
        said = stdout.read_text()
        key_files = re.findall(r"with the key in (\S+?)[;\s]", said)
        assert len(key_files) == 2 and "posetriton-control-key" in said and "posetriton-shm-key" in said, said
        assert "tritonserver's command line" in said and "hidepid" in said, said
        for key_file in key_files:
            value = Path(key_file).read_text().strip()
            assert len(value) == 64 and all(value not in text for text in (said, stderr.read_text(), log.read_text()))

        process.send_signal(signal.SIGINT)
        code = process.wait(STOP_TIMEOUT_S)
    finally:
        _stop(process)

    assert code == 0, stderr.read_text()
    assert "Traceback" not in stderr.read_text()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", grpc))  # tritonserver is gone: the port is free again
    assert not http_ready(f"http://127.0.0.1:{http}")


def test_serve_on_a_busy_grpc_port_fails_in_one_line(model_repository: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            _serve(model_repository, free_port(), port, free_port()),
            capture_output=True,
            text=True,
            timeout=STOP_TIMEOUT_S,
        )
        elapsed = time.monotonic() - started

    assert result.returncode == 1
    assert result.stderr == (
        f"error: gRPC port {port} on 127.0.0.1 is already in use (another Triton?); choose another with --grpc-port\n"
    )
    assert "Traceback" not in result.stdout and not result.stdout.strip()
    assert elapsed < 30, f"took {elapsed:.1f} s to refuse the port"


def test_serve_kills_a_triton_that_does_not_exit(tmp_path: Path) -> None:
    """A tritonserver that ignores SIGTERM (a stand-in: Triton 2.51 once hung in a futex wait after its exit
    timeout): `posetriton serve` kills it a few seconds after Triton's own exit timeout, says so, and ends."""
    (tmp_path / "repo" / "some_model").mkdir(parents=True)
    (tmp_path / "repo" / "some_model" / "config.pbtxt").write_text('backend: "python"\n')
    http, grpc, metrics = free_port(), free_port(), free_port()
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    command = _serve(tmp_path / "repo", http, grpc, metrics)
    environment = {**os.environ, BINARY_ENV: str(STANDIN)}
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=environment)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "Triton is ready" not in stdout.read_text():
            assert process.poll() is None, f"serve exited with {process.returncode}: {stderr.read_text()}"
            assert time.monotonic() < deadline, "the stand-in never became ready"
            time.sleep(0.2)
        standin = int(Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()[0])
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        code = process.wait(TRITON_EXIT_TIMEOUT_S + KILL_GRACE_S + 15)
        elapsed = time.monotonic() - started
    finally:
        _stop(process)
    assert TRITON_EXIT_TIMEOUT_S <= elapsed < TRITON_EXIT_TIMEOUT_S + KILL_GRACE_S + 5, elapsed
    assert code == 128 + signal.SIGKILL, stderr.read_text()
    assert f"tritonserver (pid {standin}) did not exit in time after it was asked to stop; killing it" in (
        stderr.read_text()
    )
    assert not Path(f"/proc/{standin}").exists(), "the stand-in is gone"


def test_serve_ends_the_stubs_of_a_sigkilled_triton(model_repository: Path, tmp_path: Path) -> None:
    """The OOM killer takes tritonserver: `posetriton serve` says so, ends its stubs (SIGSTOPped here, so that
    they cannot end by themselves) and removes its shared memory before it exits."""
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            _serve(model_repository, free_port(), free_port(), free_port()), stdout=out, stderr=err, text=True
        )
    try:
        wait_until(lambda: "Triton is ready" in stdout.read_text() or process.poll() is not None, "serve", 120)
        assert process.poll() is None, stderr.read_text()
        (triton,) = map(int, Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split())
        prefix = shm_prefix_in(Path(f"/proc/{triton}/cmdline").read_text().split("\0"))
        assert prefix and prefix.startswith(SESSION_SHM_PREFIX), "serve gives Triton a region prefix of its own"
        stubs = stubs_of(prefix)
        assert stubs and regions_of(prefix), "the postprocess step runs in a stub with its own shared memory"
        for pid in stubs:
            os.kill(pid, signal.SIGSTOP)
        os.kill(triton, signal.SIGKILL)
        code = process.wait(STOP_TIMEOUT_S)
    finally:
        _stop(process)
    assert code == 128 + signal.SIGKILL, stderr.read_text()  # as a shell reports a process killed by signal 9
    assert not any(leftovers(prefix).values()), "serve released everything before it exited"
    assert f"killed {len(stubs)} stub(s) {stubs}" in stderr.read_text()
    assert "tritonserver exited unexpectedly" in stderr.read_text()
