"""The families the export knows: each catalogue family names its module (``exporter`` in ``models.toml``).

A family module defines ``export(model, out_dir, options) -> FamilyExport``: it turns its weights into the
unified candidates graph (float input, every anchor) and says how PyTorch computes the same candidates;
:mod:`build_engines.export` does the rest for every family alike. Adding a family is its catalogue entry and its
module: nothing here lists them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

if TYPE_CHECKING:
    from posetriton.server.repository import ServedModel

OPSET = 17  # every runtime here loads it, the ONNX Runtime 1.15 that super-gradients pins included


@dataclass(frozen=True)
class ExportOptions:
    """Where the weights come from (one of them) and the parity-gate overrides."""

    checkpoint: Path | None = None
    weights_url: str | None = None
    seed: int | None = None
    weights_file: Path | None = None  # a family's own default weights, resolved from the catalogue
    tolerance_overrides: dict[str, float] = field(default_factory=dict)


@dataclass
class FamilyExport:
    """A family's unified graph and its PyTorch reference (float batch ``[B, 3, S, S]`` -> ``[B, A, 5 + 3K]``)."""

    unified: onnx.ModelProto
    reference: Callable[[np.ndarray], np.ndarray]
    # The same network in float64 (float64 batch in, float64 candidates out): the exact result the parity bounds
    # are measured from (build_engines.parity.float32_noise).
    reference_float64: Callable[[np.ndarray], np.ndarray]
    source: str
    extra_files: dict[str, Path]
    # Extra checks on (float inputs, reference candidates, the gate's bounds), e.g. a reference ONNX the tests use.
    extra_check: Callable[[list[np.ndarray], list[np.ndarray], dict[str, float]], None] | None = None


Exporter = Callable[["ServedModel", Path, ExportOptions], FamilyExport]


class FamilyModuleError(ValueError):
    """A catalogue family's ``exporter`` module cannot be imported or does not define ``export``."""


def family_exporter(model: ServedModel) -> Exporter:
    """The ``export`` function of the module the model's family names (a dotted module path)."""
    if not model.exporter:
        raise FamilyModuleError(f"{model.name}: family {model.family!r} names no exporter module in the catalogue")
    try:
        module = importlib.import_module(model.exporter)
    except ModuleNotFoundError as exc:
        raise FamilyModuleError(f"{model.name}: exporter module {model.exporter!r} not found ({exc})") from None
    export = getattr(module, "export", None)
    if not callable(export):
        raise FamilyModuleError(f"{model.name}: exporter module {model.exporter!r} defines no export() function")
    return export  # type: ignore[no-any-return]
