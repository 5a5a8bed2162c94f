"""The launcher says plainly why Triton cannot start: busy port, missing repository, broken model, numpy 2."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from posetriton import launcher
from posetriton.launcher import ServerOptions, ServerStartError, TritonServer
from posetriton.watchdog import main as watchdog_main
from tests.conftest import UL_MODEL, free_port, start_server


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
    config = repo / f"{UL_MODEL}_preprocess" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "114"', 'string_value: "999"'))
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
    # The k8s pod runs Triton under posetriton.watchdog, which reloads models through the repository API.
    with pytest.raises(SystemExit, match="--model-control-mode=explicit"):
        watchdog_main(["--", "/opt/tritonserver/bin/tritonserver", "--model-repository=/models"])
    with pytest.raises(SystemExit, match="usage"):
        watchdog_main(["--"])


def test_container_entry_point_passes_on_tritons_exit_code() -> None:
    # A stand-in for Triton that exits before it is ready: the entry point exits as a shell would report it.
    explicit = ["--model-control-mode", "explicit"]  # Triton takes "--flag value" as well as "--flag=value"
    assert watchdog_main(["--", "sh", "-c", "exit 3", *explicit]) == 3
    assert watchdog_main(["--", "sh", "-c", "kill -9 $$", *explicit]) == 128 + 9
