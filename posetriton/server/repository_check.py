"""Refuse a model repository that cannot serve: no ensemble, a missing step, or a model without its files.

Run at image build time (k8s/Dockerfile) so that an image with an empty or half-copied repository
fails to build instead of starting green and serving nothing:

    python3 -m posetriton.server.repository_check /models --config-name cpu

``--config-name`` is Triton's ``--model-config-name``: ``configs/NAME.pbtxt`` where a model has one,
else ``config.pbtxt``. Standard library only: it runs before anything else is known to work.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# Files a model's version folder must hold, per backend or platform (Triton's default file names).
DEFAULT_FILES = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx", "python": "model.py"}


def _config(model: Path, config_name: str | None) -> Path:
    named = model / "configs" / f"{config_name}.pbtxt"
    return named if config_name and named.is_file() else model / "config.pbtxt"


def _field(text: str, name: str) -> str | None:
    found = re.search(rf'^\s*{name}\s*:\s*"([^"]*)"', text, re.MULTILINE)
    return found.group(1) if found else None


def _parameter(text: str, key: str) -> str | None:
    found = re.search(rf'key:\s*"{re.escape(key)}"\s*value\s*{{\s*string_value:\s*"([^"]*)"', text)
    return found.group(1) if found else None


def repository_problems(root: Path, config_name: str | None = None) -> list[str]:
    """What keeps ``root`` from serving with ``config_name``; empty when every ensemble has every file."""
    if not root.is_dir():
        return [f"{root} is not a directory"]
    configs = {}
    problems = []
    for model in sorted(p for p in root.iterdir() if p.is_dir()):
        config = _config(model, config_name)
        if config.is_file():
            configs[model.name] = config.read_text()
        elif not model.name.startswith("."):
            problems.append(f"{model.name}: no {config.relative_to(root)}")
    ensembles = [name for name, text in configs.items() if _field(text, "platform") == "ensemble"]
    if not ensembles:
        return [*problems, f"{root} holds no ensemble model: nothing to serve (run `make models` first)"]
    for ensemble in ensembles:
        for step in re.findall(r'model_name:\s*"([^"]+)"', configs[ensemble]):
            if step not in configs:
                problems.append(f"{ensemble}: step model {step} is missing")
    for name, text in configs.items():
        if name in ensembles:
            continue
        kind = _field(text, "backend") or _field(text, "platform") or ""
        versions = [p for p in (root / name).iterdir() if p.is_dir() and p.name.isdigit()]
        if not versions:
            problems.append(f"{name}: no version folder (e.g. {name}/1)")
        wanted = [_field(text, "default_model_filename") or DEFAULT_FILES.get(kind, "")]
        if kind == "python" and _parameter(text, "model_file"):
            file = str(_parameter(text, "model_file"))
            wanted += [file, str(Path(file).with_suffix(".bin"))] if file.endswith(".xml") else [file]
        for version in versions:
            for file in filter(None, wanted):
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
