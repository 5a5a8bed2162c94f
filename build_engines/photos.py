"""Real photos as network inputs for the export parity checks, letterboxed by the served code itself.

The parity checks compare ONNX Runtime and OpenVINO with PyTorch on exactly what the server will
feed the network, so this uses the shared ``posetriton.core.processing`` letterbox with the model's
own spec (checked bit-exact against super-gradients and against Ultralytics by the tests).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from posetriton.core.images import decode_image
from posetriton.core.processing import letterbox, to_network_input
from posetriton.core.spec import LetterboxSpec


def network_input(path: Path, spec: LetterboxSpec) -> np.ndarray:
    """One photo -> ``[1, 3, S, S]`` float32 in [0, 1], as the served preprocess step makes it."""
    canvas, _ = letterbox(decode_image(Path(path).read_bytes(), spec.max_pixels), spec)
    return to_network_input(canvas[None], spec)


def network_batch(paths: list[Path], spec: LetterboxSpec) -> np.ndarray:
    """Several photos letterboxed into one ``[B, 3, S, S]`` batch (exercises a dynamic batch dimension)."""
    return np.concatenate([network_input(path, spec) for path in paths], axis=0)


def sample_photos() -> list[Path]:
    """Three real photos with people that ship inside installed packages (bus, zidane, grace_hopper).

    Located with ``find_spec`` so nothing is imported: the export environment needs no network or data set.
    """
    ultralytics = _package_dir("ultralytics")
    matplotlib = _package_dir("matplotlib")
    paths = [
        ultralytics / "assets" / "bus.jpg",
        ultralytics / "assets" / "zidane.jpg",
        matplotlib / "mpl-data" / "sample_data" / "grace_hopper.jpg",
    ]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"sample photos missing: {missing}")
    return paths


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))
