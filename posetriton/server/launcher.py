"""Start the real ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel, wait for it, stop it cleanly.

The wheel carries the server binary, the Python backend and one backend stub per Python
version. The stub takes its interpreter from the first ``python3`` on PATH, so the server is
started with this interpreter's environment first on PATH: the Python-backend models then
import ``posetriton`` and its dependencies from here.

The control APIs are restricted behind two keys made for each server start
(``TritonServer.admin_keys``, see ``posetriton.server.admin_keys``): one for model control, logging and
trace, one for shared memory; clients keep inference, health, metadata and statistics.
``POSETRITON_TRITONSERVER`` names another ``tritonserver`` binary to run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from posetriton.server.admin_keys import AdminKeys, command_line_exposure
from posetriton.server.server_ownership import Released, ServerReaper, with_shm_prefix
from posetriton.server.watchdog import (
    EXIT_GAVE_UP,
    KILL_GRACE_S,
    TRITON_EXIT_TIMEOUT_S,
    StubWatchdog,
    http_ready,
    wait_or_kill,
)

BINARY_ENV = "POSETRITON_TRITONSERVER"


class ServerStartError(RuntimeError):
    """Triton could not be started; the message says why in plain words."""


@dataclass
class ServerOptions:
    repository: Path
    config_name: str = "cpu"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    # Load only these models (with their ensemble steps); None loads the whole repository.
    models: list[str] | None = None
    log_file: Path | None = None
    log_verbose: int = 0
    # Reload a model whose Python-backend stub died (Triton itself does not); see posetriton.server.watchdog.
    stub_watchdog: bool = True
    # Close the model-repository, shared-memory, logging and trace APIs to clients without the admin key.
    restrict_control_apis: bool = True
    # Triton's --exit-timeout-secs; the launcher kills Triton KILL_GRACE_S after it.
    exit_timeout_s: int = TRITON_EXIT_TIMEOUT_S
    extra_args: list[str] = field(default_factory=list)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for servers started by tests, benchmarks and the demo)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerStartError(
            "the nvidia-pytriton package is not installed in this environment (pip install nvidia-pytriton)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _check_python_backend_environment() -> None:
    major = int(np.__version__.split(".")[0])
    if major >= 2:
        raise ServerStartError(
            f"numpy {np.__version__} is installed in {sys.prefix}; Triton's Python backend needs numpy < 2 "
            "(with numpy 2 it silently returns empty outputs). Install 'numpy<2' in this environment."
        )


def _check_port_free(host: str, port: int, what: str, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise ServerStartError(
                f"{what} port {port} on {host} is already in use (another Triton?); choose another with {flag}"
            ) from None


def _backend_directory(root: Path, workdir: Path) -> Path:
    """Lay out ``<workdir>/backends/python`` as Triton expects, with symlinks into the wheel."""
    stub = root / "tritonserver" / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = stub / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerStartError(f"nvidia-pytriton has no Python-backend stub for Python {sys.version_info[:2]}")
    backend = workdir / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    python_backend = root / "tritonserver" / "backends" / "python"
    for source in (python_backend / "libtriton_python.so", python_backend / "triton_python_backend_utils.py", stub):
        (backend / source.name).symlink_to(source)
    return backend.parent


def _failure_summary(log_text: str) -> str:
    """The lines of a Triton log that explain a failed start."""
    wanted = re.compile(r"failed to load|error:|Error|UNAVAILABLE|failed to|Unable|unable to|Traceback|Exception")
    harmless = re.compile(r"CudaDriverHelper|CUDA driver|pinned memory|cuda|GPU metrics|stream for")
    lines = [line for line in log_text.splitlines() if wanted.search(line) and not harmless.search(line)]
    return "\n".join(lines[-20:]) or log_text[-3000:]


class TritonServer:
    """A running ``tritonserver`` process; use as a context manager."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.watchdog: StubWatchdog | None = None
        # Ends the stubs and removes the shared memory of a Triton that died without doing so (server_ownership).
        self.reaper: ServerReaper | None = None
        self.shm_prefix: str | None = None
        self._workdir = tempfile.TemporaryDirectory(prefix="posetriton-")
        # Made here, for this server only; written (mode 0600, in a private temporary folder) for its owner and
        # for clients on this host that register system shared memory.
        self.admin_keys = AdminKeys.generate()
        self.control_key_file = Path(self._workdir.name) / "control-key"
        self.shm_key_file = Path(self._workdir.name) / "shm-key"
        self.gave_up: str | None = None
        self.log_path = options.log_file or Path(self._workdir.name) / "tritonserver.log"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.options.host}:{self.options.http_port}"

    def command(self, backend_dir: Path) -> list[str]:
        o = self.options
        binary = os.environ.get(BINARY_ENV) or _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
        args = [
            str(binary),
            f"--model-repository={o.repository.resolve()}",
            f"--backend-directory={backend_dir}",
            f"--model-config-name={o.config_name}",
            f"--http-address={o.host}",
            f"--http-port={o.http_port}",
            f"--grpc-address={o.host}",
            f"--grpc-port={o.grpc_port}",
            f"--metrics-address={o.host}",
            f"--metrics-port={o.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={o.exit_timeout_s}",
            f"--log-verbose={o.log_verbose}",
        ]
        if o.restrict_control_apis:
            args += self.admin_keys.triton_args()
        # Explicit control (all models unless some are named) lets the stub watchdog reload a model.
        args.append("--model-control-mode=explicit")
        args += [f"--load-model={name}" for name in (o.models if o.models is not None else ["*"])]
        return args + o.extra_args

    def environment(self, root: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        libs = [str(root.parent / "nvidia_pytriton.libs"), str(sysconfig.get_config_var("LIBDIR"))]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        # Several Python-backend stubs share the cores: keep numpy's BLAS single-threaded in each.
        # OpenVINO sizes its own threads (its performance hint and NUM_STREAMS in the model config).
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def start(self, timeout: float = 120.0) -> TritonServer:
        o = self.options
        if not (o.repository / "").is_dir():
            raise ServerStartError(f"model repository {o.repository} does not exist; build it first (make models)")
        if not any(p.joinpath("config.pbtxt").exists() for p in o.repository.iterdir()):
            raise ServerStartError(f"model repository {o.repository} holds no models; build it first (make models)")
        _check_python_backend_environment()
        for port, what, flag in (
            (o.http_port, "HTTP", "--http-port"),
            (o.grpc_port, "gRPC", "--grpc-port"),
            (o.metrics_port, "metrics", "--metrics-port"),
        ):
            _check_port_free(o.host, port, what, flag)
        root = _pytriton_root()
        backend_dir = _backend_directory(root, Path(self._workdir.name))
        if o.restrict_control_apis:
            self._write_keys()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the process for its lifetime
        command, self.shm_prefix = with_shm_prefix(self.command(backend_dir))
        # Its own process group: a Triton that hangs on exit is killed together with its stubs.
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.environment(root), start_new_session=True
        )
        log.close()
        self._start_reaper()
        self._wait_ready(timeout)
        if o.stub_watchdog:
            headers = self.admin_keys.control.http_headers if o.restrict_control_apis else None
            self.watchdog = StubWatchdog(self.process.pid, self.http_url, headers=headers, give_up=self._give_up)
            self.watchdog.start()
        return self

    # --- keys of the restricted APIs -------------------------------------------------------------

    def _write_keys(self) -> None:
        """Each key alone in its file, created exclusively (mode 0600) in this server's private folder."""
        self.admin_keys.control.write(self.control_key_file)
        self.admin_keys.shared_memory.write(self.shm_key_file)

    @property
    def control_headers(self) -> dict[str, str]:
        """gRPC metadata that opens model control, logging and trace (``load_model(..., headers=...)``)."""
        return self.admin_keys.control.grpc_headers

    @property
    def shared_memory_headers(self) -> dict[str, str]:
        """gRPC metadata that opens system shared memory (``PoseClient(..., shared_memory=True, headers=...)``)."""
        return self.admin_keys.shared_memory.grpc_headers

    def restricted_apis_notice(self) -> str:
        """What ``posetriton serve`` says about the keys: headers, files, and who else can read them."""
        control, shm = self.admin_keys.control, self.admin_keys.shared_memory
        return (
            f"Model control, logging and trace need the header '{control.name}' (HTTP) / '{control.grpc_header}' "
            f"(gRPC) with the key in {self.control_key_file}; system shared memory needs '{shm.name}' / "
            f"'{shm.grpc_header}' with the key in {self.shm_key_file} (both files mode 0600, this user only).\n"
            f"{command_line_exposure()}."
        )

    def _give_up(self, reason: str) -> None:
        """The watchdog cannot heal this server: stop it, so that its owner sees it end (non-zero)."""
        self.gave_up = reason
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.release_leftovers()
                raise ServerStartError(
                    f"tritonserver exited with code {self.process.returncode} while starting:\n"
                    f"{_failure_summary(self.log_text())}\n(full log: {self.log_path})"
                )
            if self.is_ready() and self._metrics_listening():
                return
            time.sleep(0.25)
        self.stop()
        raise ServerStartError(
            f"tritonserver was not ready after {timeout:.0f} s:\n{_failure_summary(self.log_text())}\n"
            f"(full log: {self.log_path})"
        )

    def _metrics_listening(self) -> bool:
        """Triton opens the metrics port just after HTTP reports ready; "ready" includes it unless disabled."""
        if "--allow-metrics=false" in self.options.extra_args:
            return True
        try:
            with socket.create_connection((self.options.host, self.options.metrics_port), timeout=2):
                return True
        except OSError:
            return False

    def is_ready(self) -> bool:
        return http_ready(self.http_url)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop_deadline(self) -> float:
        """When a Triton asked to stop now must be gone: its exit timeout, plus a few seconds."""
        return time.monotonic() + self.options.exit_timeout_s + KILL_GRACE_S

    def stop(self) -> int | None:
        """SIGTERM (Triton finishes in-flight requests); SIGKILL, said on stderr, if it outlives its exit timeout."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            wait_or_kill(self.process, self.stop_deadline(), _report)
        self.release_leftovers()
        code = self.process.returncode
        self.process = None
        return code

    # --- everything the server started ends with it (posetriton.server.server_ownership) ---------------------------

    def _start_reaper(self) -> None:
        assert self.process is not None and self.shm_prefix is not None
        self.reaper = ServerReaper(self.process.pid, self.shm_prefix, _report)
        self.reaper.start()

    def release_leftovers(self) -> Released | None:
        """Once Triton has exited: wait until its stubs are gone and its shared memory removed (what was left)."""
        if self.reaper is None:
            return None
        released = self.reaper.wait_released()
        self.reaper = None
        return released

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._workdir.cleanup()


def _report(message: str) -> None:
    print(f"posetriton: {message}", file=sys.stderr, flush=True)


def serve_forever(options: ServerOptions, timeout: float = 120.0) -> int:
    """Run until Ctrl-C or SIGTERM; return Triton's exit code (EXIT_GAVE_UP when the watchdog gave up)."""
    server = TritonServer(options)
    stop_by: list[float] = []

    def _stop(signum: int, _frame: object) -> None:
        if not stop_by:
            stop_by.append(server.stop_deadline())
        if server.watchdog is not None:  # stubs now exit on purpose: a reload would keep a model alive
            server.watchdog.stop(wait=False)
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start(timeout)
        print(
            f"Triton is ready: gRPC {server.grpc_url}, HTTP {server.http_url}, "
            f"metrics http://{options.host}:{options.metrics_port}/metrics (config '{options.config_name}'); "
            f"log: {server.log_path}. Ctrl-C stops it."
            + (f"\n{server.restricted_apis_notice()}" if options.restrict_control_apis else ""),
            flush=True,
        )
        process = server.process
        assert process is not None
        while process.poll() is None and not stop_by and not server.gave_up:
            time.sleep(0.2)
        if server.gave_up and not stop_by:
            stop_by.append(server.stop_deadline())
        code = wait_or_kill(process, stop_by[0], _report) if stop_by else process.wait()
        if server.gave_up:
            print(f"tritonserver stopped: {server.gave_up}; start it again", file=sys.stderr)
            return EXIT_GAVE_UP
        if not stop_by:
            print(f"tritonserver exited unexpectedly ({code}):\n{_failure_summary(server.log_text())}", file=sys.stderr)
        return code
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
