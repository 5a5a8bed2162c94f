"""The launcher says plainly why Triton cannot start (busy port, missing repository, broken model, numpy 2), closes
the control APIs to clients, always ends a shutdown, and stops a server its watchdog cannot heal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from posetriton.client import AccessDeniedError, PoseClient
from posetriton.server import launcher, model_config
from posetriton.server.launcher import ServerOptions, ServerStartError, TritonServer
from posetriton.server.server_ownership import regions_of, stubs_of
from posetriton.server.watchdog import KILL_GRACE_S, http_ready, python_stubs
from posetriton.server.watchdog import main as watchdog_main
from tests.conftest import (
    RELEASE_WAIT_S,
    SESSION_SHM_PREFIX,
    UL_MODEL,
    assert_nothing_left,
    free_port,
    leftovers,
    start_server,
)


def test_busy_port_is_named(tmp_path: Path) -> None:
    (tmp_path / "some_model").mkdir()
    (tmp_path / "some_model" / "config.pbtxt").write_text('backend: "python"\n')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        options = ServerOptions(repository=tmp_path, grpc_port=port, http_port=free_port(), metrics_port=free_port())
        with pytest.raises(ServerStartError, match=f"gRPC port {port} on 127.0.0.1 is already in use"):
            TritonServer(options).start()


def test_missing_repository_is_named(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match="does not exist; build it first"):
        TritonServer(ServerOptions(repository=tmp_path / "nowhere")).start()
    with pytest.raises(ServerStartError, match="holds no models"):
        TritonServer(ServerOptions(repository=tmp_path)).start()


def test_numpy_2_in_the_backend_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher.np, "__version__", "2.1.0")
    with pytest.raises(ServerStartError, match=r"numpy 2\.1\.0 .* needs numpy < 2"):
        launcher._check_python_backend_environment()


def test_model_that_fails_to_load_is_reported(model_repository: Path, tmp_path: Path) -> None:
    """A preprocess model with an invalid parameter: the start fails and the reason is in the message."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repository / f"{UL_MODEL}_preprocess", repo / f"{UL_MODEL}_preprocess")
    with model_config.editing(repo / f"{UL_MODEL}_preprocess" / "config.pbtxt") as config:
        config.parameters["pad_value"].string_value = "999"
    with pytest.raises(ServerStartError) as error:
        start_server(repo)
    message = str(error.value)
    assert f"{UL_MODEL}_preprocess" in message and "pad_value must be in [0, 255]" in message


def test_sigterm_stops_the_server_and_frees_its_ports(model_repository: Path) -> None:
    server = start_server(model_repository, models=[f"{UL_MODEL}_postprocess"])
    port = server.options.grpc_port
    assert server.is_ready()
    assert server.stop() == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # free again


def test_container_entry_point_refuses_a_triton_that_cannot_reload_models() -> None:
    # The k8s pod runs Triton under posetriton.server.watchdog, which reloads models through the repository API.
    with pytest.raises(SystemExit, match="--model-control-mode=explicit"):
        watchdog_main(["--", "/opt/tritonserver/bin/tritonserver", "--model-repository=/models"])
    with pytest.raises(SystemExit, match="usage"):
        watchdog_main(["--"])


def test_container_entry_point_passes_on_tritons_exit_code() -> None:
    # A stand-in for Triton that exits before it is ready: the entry point exits as a shell would report it.
    explicit = ["--model-control-mode", "explicit"]  # Triton takes "--flag value" as well as "--flag=value"
    assert watchdog_main(["--", "sh", "-c", "exit 3", *explicit]) == 3
    assert watchdog_main(["--", "sh", "-c", "kill -9 $$", *explicit]) == 128 + 9


# --- shutdown always ends ---------------------------------------------------------------------

STANDIN = Path(__file__).parent / "standins" / "tritonserver_ignoring_sigterm.py"


def _one_model_repository(tmp_path: Path) -> Path:
    (tmp_path / "repo" / "some_model").mkdir(parents=True)
    (tmp_path / "repo" / "some_model" / "config.pbtxt").write_text('backend: "python"\n')
    return tmp_path / "repo"


def test_stop_kills_a_triton_that_ignores_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(launcher.BINARY_ENV, str(STANDIN))
    options = ServerOptions(
        repository=_one_model_repository(tmp_path), http_port=free_port(), grpc_port=free_port(),
        metrics_port=free_port(), stub_watchdog=False, exit_timeout_s=1,
    )  # fmt: skip
    server = TritonServer(options).start(timeout=30)
    assert server.process is not None
    pid = server.process.pid
    started = time.monotonic()
    assert server.stop() == -signal.SIGKILL
    elapsed = time.monotonic() - started
    assert options.exit_timeout_s <= elapsed < options.exit_timeout_s + KILL_GRACE_S + 3, elapsed
    assert f"tritonserver (pid {pid}) did not exit in time after it was asked to stop; killing it" in (
        capsys.readouterr().err
    )
    assert "ignoring signal 15" in server.log_text(), "the stand-in really got SIGTERM and ignored it"


def test_container_entry_point_kills_a_triton_that_ignores_sigterm(tmp_path: Path) -> None:
    http = free_port()
    command = [
        sys.executable, "-m", "posetriton.server.watchdog", "--", str(STANDIN), "--model-control-mode=explicit",
        "--exit-timeout-secs=1", f"--http-port={http}", f"--metrics-port={free_port()}",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not http_ready(f"http://127.0.0.1:{http}"):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=1 + KILL_GRACE_S + 10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGKILL, stderr
    assert time.monotonic() - started < 1 + KILL_GRACE_S + 3
    assert "did not exit in time after it was asked to stop; killing it" in stderr
    assert "ignoring signal 15" in stdout, "SIGTERM reached the stand-in, which ignored it"


# --- control APIs closed to clients -----------------------------------------------------------


def _http_call(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """POST for the repository and logging APIs, GET for a status (what Triton's HTTP API expects of each)."""
    post = not url.endswith("/status")
    request = urllib.request.Request(url, data=b"{}" if post else None, method="POST" if post else "GET")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


def test_each_key_opens_only_its_own_api_group(model_repository: Path, photo_paths: list[Path]) -> None:
    """Two keys per start: the control key opens model loading, logging and trace, the shared-memory key system
    shared memory; neither opens the other's group, a wrong or missing key is refused naming the header, and
    inference, health, metadata and statistics stay open. No key value reaches Triton's log."""
    photo = photo_paths[0]
    with start_server(model_repository, models=[UL_MODEL], restrict_control_apis=True) as server:
        keys = server.admin_keys
        for key, path in ((keys.control, server.control_key_file), (keys.shared_memory, server.shm_key_file)):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip() == key.value
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert TritonServer(server.options).admin_keys.values != keys.values, "new keys at every start"
        with grpcclient.InferenceServerClient(server.grpc_url) as triton:
            groups = {
                keys.control: {
                    "load": lambda h: triton.load_model(UL_MODEL, headers=h),
                    "unload": lambda h: triton.unload_model(UL_MODEL, headers=h),
                    "repository index": lambda h: triton.get_model_repository_index(headers=h),
                    "log settings": lambda h: triton.update_log_settings({"log_verbose_level": 1}, headers=h),
                    "trace settings": lambda h: triton.update_trace_settings(settings={"trace_rate": "2"}, headers=h),
                },
                keys.shared_memory: {
                    "register shared memory": lambda h: triton.register_system_shared_memory("x", "/x", 64, headers=h),
                    "shared memory status": lambda h: triton.get_system_shared_memory_status(headers=h),
                },
            }
            for own, calls in groups.items():
                other = keys.shared_memory if own is keys.control else keys.control
                refused = f"This protocol is restricted, expecting header '{own.grpc_header}'"
                wrong_keys = (None, {own.grpc_header: "wrong"}, {own.grpc_header: other.value}, other.grpc_headers)
                for what, call in calls.items():
                    for headers in wrong_keys:
                        with pytest.raises(grpcclient.InferenceServerException) as error:
                            call(headers)
                        assert error.value.message() == refused, (what, headers and list(headers))
            # Each key opens its own group.
            assert triton.get_model_repository_index(headers=server.control_headers).models
            assert triton.get_log_settings(headers=server.control_headers) is not None
            assert triton.get_system_shared_memory_status(headers=server.shared_memory_headers) is not None
            # Open to clients: health, metadata, configuration, statistics.
            assert triton.is_server_ready() and triton.is_model_ready(UL_MODEL)
            assert triton.get_model_metadata(UL_MODEL).name == UL_MODEL
            assert triton.get_inference_statistics(UL_MODEL).model_stats
        control, shm = keys.control, keys.shared_memory
        for path, own, other in (
            (f"/v2/repository/models/{UL_MODEL}/unload", control, shm),
            ("/v2/repository/index", control, shm),
            ("/v2/logging", control, shm),
            ("/v2/systemsharedmemory/status", shm, control),
        ):
            for headers in (None, other.http_headers, {own.name: other.value}):
                status, body = _http_call(f"{server.http_url}{path}", headers)
                expected = {"error": f"This API is restricted, expecting header '{own.name}'"}
                assert (status, json.loads(body)) == (403, expected), (path, headers and list(headers))
        # Each owner opens its own group (the launcher's watchdog uses the repository API).
        assert _http_call(f"{server.http_url}/v2/repository/index", control.http_headers)[0] == 200
        assert _http_call(f"{server.http_url}/v2/systemsharedmemory/status", shm.http_headers)[0] == 200
        # Inference needs no key, and model discovery falls back to the statistics.
        with PoseClient(server.grpc_url, UL_MODEL) as client:
            expected = client.predict(photo)
            assert expected.poses and client.ready_models() == [UL_MODEL]
        # System shared memory from the SDK: refused clearly without its key (the control key is not it), the
        # same results with it.
        for headers in (None, server.control_headers):
            with (
                PoseClient(server.grpc_url, UL_MODEL, shared_memory=True, retry=3, headers=headers) as client,
                pytest.raises(AccessDeniedError, match=f"pass it with headers={{'{shm.grpc_header}': ...}}"),
            ):
                client.predict(photo)
        with PoseClient(server.grpc_url, UL_MODEL, shared_memory=True, headers=server.shared_memory_headers) as client:
            got = client.predict(photo)
        assert [p.score for p in got.poses] == [p.score for p in expected.poses]
        log = server.log_text()
        assert all(value not in log for value in keys.values), "no key value is in Triton's log"
    assert not server.control_key_file.exists() and not server.shm_key_file.exists(), "the key files go with the server"


# --- a server that cannot heal ends -----------------------------------------------------------


def test_a_failed_reload_stops_the_server_with_a_reason(model_repository: Path, tmp_path: Path) -> None:
    """The network step's stub dies and its files changed meanwhile so that it cannot load again:
    the watchdog gives up and the server stops (Kubernetes would restart the container)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for model in model_repository.iterdir():  # the ensemble's folders, the network's large files linked
        if model.name.startswith(UL_MODEL):
            shutil.copytree(model, repo / model.name, copy_function=os.symlink)
    config = repo / f"{UL_MODEL}_network" / "configs" / "cpu.pbtxt"
    with start_server(repo, models=[UL_MODEL], restrict_control_apis=True) as server:
        assert server.process is not None and server.watchdog is not None
        broken = model_config.read(config)
        broken.parameters["pad_value"].string_value = "999"
        config.unlink()  # a link to the shared repository's file: write a file of its own
        model_config.write(config, broken)
        for pid, model in python_stubs(server.process.pid).values():
            if model == f"{UL_MODEL}_network":
                os.kill(pid, signal.SIGKILL)
        code = server.process.wait(timeout=server.watchdog.interval + 60 + server.options.exit_timeout_s + 10)
        assert server.gave_up == f"model '{UL_MODEL}_network' could not be reloaded"
        assert code is not None
        assert "pad_value must be in [0, 255]" in server.log_text(), "Triton's reason is in its log"


# --- a server that dies takes its stubs and shared memory with it ------------------------------------------------


def _stop_stubs(prefix: str) -> list[int]:
    """SIGSTOP the server's stubs: a stopped stub cannot notice its parent died and exit by itself, as a stub hung
    in its shutdown (the case seen in the wild, 16 minutes after its server was killed) does not either."""
    stubs = stubs_of(prefix)
    assert stubs and regions_of(prefix), "the server runs Python-backend stubs with shared memory of its own prefix"
    for pid in stubs:
        os.kill(pid, signal.SIGSTOP)
    return stubs


def test_a_sigkilled_server_leaves_no_stub_and_no_shared_memory(
    model_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(model_repository, models=[UL_MODEL, f"{UL_MODEL}_track"])
    try:
        assert server.process is not None and server.shm_prefix is not None
        assert server.shm_prefix.startswith(SESSION_SHM_PREFIX) and server.shm_prefix != SESSION_SHM_PREFIX
        stubs = _stop_stubs(server.shm_prefix)
        assert len(stubs) >= 3, "the network, the tracking ensemble's preprocess instances and its tracker run in stubs"
        os.kill(server.process.pid, signal.SIGKILL)
        assert_nothing_left(server.shm_prefix, "a SIGKILLed tritonserver")
        released = server.release_leftovers()
    finally:
        server.stop()
    assert released is not None and list(released.stubs) == stubs and released.regions, released
    assert f"killed {len(stubs)} stub(s) {stubs}" in capsys.readouterr().err


class _EntryPointServer(TritonServer):
    """The real tritonserver run as the container runs it, under ``python -m posetriton.server.watchdog``."""

    def command(self, backend_dir: Path) -> list[str]:
        return [sys.executable, "-m", "posetriton.server.watchdog", "--", *super().command(backend_dir)]

    def triton_pid(self) -> int:
        assert self.process is not None
        (child,) = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return int(child)


def test_container_entry_point_ends_the_stubs_of_a_sigkilled_server(model_repository: Path) -> None:
    options = ServerOptions(
        repository=model_repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        models=[UL_MODEL], stub_watchdog=False, restrict_control_apis=False,  # the entry point does both itself
    )  # fmt: skip
    server = _EntryPointServer(options).start(timeout=180)
    try:
        assert server.process is not None and server.shm_prefix is not None
        triton = server.triton_pid()
        assert f"--backend-config=python,shm-region-prefix-name={server.shm_prefix}" in Path(
            f"/proc/{triton}/cmdline"
        ).read_text().split("\0"), "the entry point passes the launcher's prefix on to Triton"
        stubs = _stop_stubs(server.shm_prefix)
        os.kill(triton, signal.SIGKILL)
        assert server.process.wait(timeout=RELEASE_WAIT_S) == 128 + signal.SIGKILL
        assert not any(leftovers(server.shm_prefix).values()), "the entry point released all before it exited"
        assert f"killed {len(stubs)} stub(s) {stubs}" in server.log_text()
        assert not server.release_leftovers(), "nothing was left for the launcher to end"
    finally:
        server.stop()
