"""Refuse a model repository that cannot serve: no ensemble, a missing step, or a model without its files.

Run at image build time (k8s/Dockerfile) so that an image with an empty or half-copied repository
fails to build instead of starting green and serving nothing:

    python3 -m posetriton.server.repository_check /models --config-name cpu

``--config-name`` is Triton's ``--model-config-name``: ``configs/NAME.pbtxt`` where a model has one,
else ``config.pbtxt``. Each config is read as Triton reads it, a ``ModelConfig`` message
(posetriton.server.model_config), so one Triton could not parse is refused too. It needs protobuf alone
(in the image's lock): it runs before anything else is known to work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from posetriton.server import model_config

# Files a model's version folder must hold, per backend or platform (Triton's default file names).
DEFAULT_FILES = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx", "python": "model.py"}


def _config(model: Path, config_name: str | None) -> Path:
    named = model / "configs" / f"{config_name}.pbtxt"
    return named if config_name and named.is_file() else model / "config.pbtxt"


def _read_configs(root: Path, config_name: str | None) -> tuple[dict[str, Any], list[str]]:
    """Each model folder's config as a ``ModelConfig``, by model name, and what kept one from being read."""
    configs, problems = {}, []
    for model in sorted(p for p in root.iterdir() if p.is_dir()):
        config = _config(model, config_name)
        if not config.is_file():
            if not model.name.startswith("."):
                problems.append(f"{model.name}: no {config.relative_to(root)}")
            continue
        try:
            configs[model.name] = model_config.read(config)
        except text_format.ParseError as exc:
            problems.append(f"{model.name}: {config.relative_to(root)} is not a Triton model configuration: {exc}")
    return configs, problems


def _model_files(config: Any) -> list[str]:
    """The files a model's version folder must hold: its model file and, for an OpenVINO IR that a
    Python-backend step loads (parameter ``model_file``), the IR's weights beside it."""
    kind = config.backend or config.platform
    wanted = [config.default_model_filename or DEFAULT_FILES.get(kind, "")]
    model_file = config.parameters["model_file"].string_value if "model_file" in config.parameters else ""
    if kind == "python" and model_file:
        weights = [str(Path(model_file).with_suffix(".bin"))] if model_file.endswith(".xml") else []
        wanted += [model_file, *weights]
    return [file for file in wanted if file]


def repository_problems(root: Path, config_name: str | None = None) -> list[str]:
    """What keeps ``root`` from serving with ``config_name``; empty when every ensemble has every file."""
    if not root.is_dir():
        return [f"{root} is not a directory"]
    configs, problems = _read_configs(root, config_name)
    ensembles = [name for name, config in configs.items() if config.platform == "ensemble"]
    if not ensembles:
        return [*problems, f"{root} holds no ensemble model: nothing to serve (run `make models` first)"]
    for ensemble in ensembles:
        for step in configs[ensemble].ensemble_scheduling.step:
            if step.model_name not in configs:
                problems.append(f"{ensemble}: step model {step.model_name} is missing")
    for name, config in configs.items():
        if name in ensembles:
            continue
        versions = [p for p in (root / name).iterdir() if p.is_dir() and p.name.isdigit()]
        if not versions:
            problems.append(f"{name}: no version folder (e.g. {name}/1)")
        for version in versions:
            for file in _model_files(config):
                path = version / file
                if not path.is_file() or path.stat().st_size == 0:
                    problems.append(f"{name}: {path.relative_to(root)} is missing or empty")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--config-name", default=None, help="Triton's --model-config-name (default: config.pbtxt)")
    args = parser.parse_args(argv)
    problems = repository_problems(args.repository, args.config_name)
    for problem in problems:
        print(f"model repository: {problem}", file=sys.stderr)
    if not problems:
        print(f"model repository {args.repository}: ok ({args.config_name or 'default'} configuration)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
