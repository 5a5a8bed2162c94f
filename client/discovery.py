"""Which models a server offers: its ready ensembles (not their steps), from the repository index or, where
that API is restricted, from the statistics of the loaded models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from posetriton.core.contract import STEP_SUFFIXES, TRACK_SUFFIX

# NAME_track serves video (track()), not predict(): not listed among the models.
TRACKING_SUFFIXES = (TRACK_SUFFIX,)


def ready_ensembles(index: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the READY models in a repository index, without the steps of the ensembles."""
    entries = index.get("models", []) if isinstance(index, Mapping) else index
    return sorted(
        str(entry.get("name"))
        for entry in entries
        if entry.get("state") == "READY" and not str(entry.get("name")).endswith(STEP_SUFFIXES + TRACKING_SUFFIXES)
    )


def loaded_models_index(statistics: Mapping[str, Any]) -> list[dict[str, str]]:
    """A repository index built from the statistics of every loaded model, for servers that restrict the
    model-repository API to their own tooling (posetriton's do); statistics stay open to clients."""
    return [{"name": str(s.get("name")), "state": "READY"} for s in statistics.get("model_stats", [])]


def served_models_hint(names: Sequence[str] | None) -> str:
    if names is None:
        return "could not list the models it serves"
    return f"models ready there: {', '.join(names)}" if names else "it has no models ready"
