"""A request parameter is declared once (posetriton.core.contract) and every layer derives from it.

The proof: a parameter group declared here, at run time, with no other file edited, is validated, sent by
``request_parameters``, recognised in the server's messages, offered as CLI options and described to the web page.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
import typer
from starlette.testclient import TestClient
from typer.testing import CliRunner

from posetriton.client.errors import invalid_input
from posetriton.client.inputs import sdk_arguments
from posetriton.client.results import ModelMetadata
from posetriton.core import contract
from posetriton.core.contract import (
    ContractError,
    ParameterGroup,
    RequestParameter,
    Smoothing,
    Thresholds,
    parameter,
    parameter_groups,
    request_parameters,
)
from posetriton.ui.app import UiSettings, create_app
from posetriton.ui.limits import parameters_from_query


@dataclass(frozen=True)
class Crop(ParameterGroup):
    """A made-up group, as a new step would declare it: one bounded float, one int bounded per model."""

    margin: float | None = parameter(RequestParameter("crop_margin", float, "margin around each person", 0.0, 0.5))
    passes: int | None = parameter(
        RequestParameter("crop_passes", int, "refinement passes", minimum=1, limit="crop_passes")
    )


@pytest.fixture
def crop() -> Iterator[type[Crop]]:
    saved_groups, saved_parameters = contract.PARAMETER_GROUPS, dict(contract.REQUEST_PARAMETERS)
    contract.register_parameter_group(Crop)
    yield Crop
    contract.PARAMETER_GROUPS = saved_groups
    contract.REQUEST_PARAMETERS.clear()
    contract.REQUEST_PARAMETERS.update(saved_parameters)


@pytest.fixture
def cli(crop: type[Crop]) -> Iterator[ModuleType]:
    """The CLI module loaded while Crop is declared (Typer reads a command's options when the module loads)."""
    import posetriton.client.cli as module

    yield importlib.reload(module)
    contract.PARAMETER_GROUPS = tuple(g for g in contract.PARAMETER_GROUPS if g is not Crop)
    importlib.reload(module)


def _options(app: typer.Typer, command: str) -> dict[str, Any]:
    """The command's options by name, as Typer built them (its own click: ``opts``, ``help``, ``default``)."""
    params = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    return {opt: param for param in params for opt in param.opts if opt.startswith("--")}


def test_a_new_group_is_validated_and_sent(crop: type[Crop]) -> None:
    assert "crop_margin" in contract.REQUEST_PARAMETERS and crop in parameter_groups()
    assert request_parameters(Crop(margin=0.1), Thresholds(conf=0.3), crop_passes=2) == {
        "crop_margin": 0.1, "crop_passes": 2, "conf": 0.3,
    }  # fmt: skip
    with pytest.raises(ContractError, match=r"crop_margin must be in \[0, 0.5\], got 0.9"):
        request_parameters(crop_margin=0.9)
    with pytest.raises(ContractError, match=r"crop_passes must be in \[1, 3\], got 5"):
        request_parameters(Crop(passes=5), limits={"crop_passes": 3})
    with pytest.raises(ContractError, match="request parameter crop_passes must be an integer"):
        Crop.from_parameters({"crop_passes": 1.5})
    # Each step reads its own group and lets the others' names pass.
    assert Thresholds.from_parameters({"crop_margin": 0.2, "conf": 0.4}) == Thresholds(conf=0.4)
    assert Crop.from_parameters({"crop_margin": 0.2, "conf": 0.4}) == Crop(margin=0.2)
    with pytest.raises(ContractError, match="declared already"):
        contract.register_parameter_group(Crop)
    # What the CLI and the web page hand the SDK: the groups it takes as objects, the others' values by wire name.
    chosen = {"conf": 0.3, "smooth_beta": 0.5, "crop_margin": 0.1}
    assert sdk_arguments(chosen) == {"thresholds": Thresholds(conf=0.3), "crop_margin": 0.1}
    assert sdk_arguments(chosen, tracking=True) == {
        "thresholds": Thresholds(conf=0.3), "smoothing": Smoothing(beta=0.5), "crop_margin": 0.1,
    }  # fmt: skip


def test_the_servers_refusal_of_a_new_parameter_is_about_the_request(crop: type[Crop]) -> None:
    """A message naming a request parameter blames no image (so a caller retries none of them one by one)."""
    refused = invalid_input("crop_margin must be in [0, 0.5], got 0.9", ["a.jpg"], [0], "INVALID_ARGUMENT")
    assert refused.index is None and refused.image is None
    image = invalid_input("not a recognised image", ["a.jpg"], [0], "INVALID_ARGUMENT")
    assert (image.index, image.image) == (0, "a.jpg")


def test_a_new_group_is_offered_as_cli_options(cli: ModuleType) -> None:
    for command in ("predict", "eval", "track"):
        options = _options(cli.app, command)
        margin = options["--crop-margin"]
        assert margin.help.startswith("Margin around each person, in [0, 0.5].") and margin.default is None
        assert options["--crop-passes"].help.startswith("Refinement passes, at least 1, at most the model's")
    result = CliRunner().invoke(cli.app, ["predict", "missing.jpg", "--crop-margin", "0.9"])
    assert result.exit_code == cli.EXIT_USAGE
    assert result.stderr.startswith("error: crop_margin must be in [0, 0.5], got 0.9 (--conf, --iou, --max-det,")
    result = CliRunner().invoke(cli.app, ["predict", "missing.jpg", "--crop-passes", "1.5"])
    assert result.exit_code == cli.EXIT_USAGE and "integer" in result.stderr  # Typer's own refusal


def test_every_command_offers_exactly_the_parameters_its_ensemble_reads() -> None:
    """NAME's parameters on predict and eval; NAME_track's (the tracker's too) on track; each from its declaration."""
    from posetriton.client.cli import app

    for command, tracking in (("predict", False), ("eval", False), ("track", True)):
        options = _options(app, command)
        for group in (Thresholds, Smoothing):
            for declared in group.declarations().values():
                offered = declared.option in options
                assert offered == (tracking or not group.tracking_only), (command, declared.option)
                if offered:
                    help_text = options[declared.option].help or ""
                    assert declared.range_text() in help_text, (command, help_text)
    assert _options(app, "eval")["--conf"].default == 0.001, "eval's own default"
    assert _options(app, "predict")["--conf"].default is None, "the model's"


def test_a_new_group_is_described_to_the_web_page(crop: type[Crop]) -> None:
    meta = ModelMetadata(
        "m", ("nose",), (), 8, {"default.crop_margin": "0.25", "default.crop_passes_limit": "4", "default.conf": "0.5"}
    )
    assert meta.request_defaults == {"crop_margin": 0.25, "conf": 0.5}
    assert meta.request_limits == {"crop_passes": 4, "max_det": None}
    assert parameters_from_query({"crop_passes": "4"}, meta.request_limits) == {"crop_passes": 4}
    with pytest.raises(ContractError, match=r"crop_passes must be in \[1, 4\], got 5"):
        parameters_from_query({"crop_passes": "5"}, meta.request_limits)

    app = create_app(UiSettings())
    with TestClient(app, base_url="http://127.0.0.1:8080") as client:
        described: list[dict[str, Any]] = client.get("/api/config").json()["parameters"]
    by_name = {d["name"]: d for d in described}
    assert list(by_name) == list(contract.REQUEST_PARAMETERS), "every parameter, in declaration order"
    assert by_name["crop_margin"] == {
        **Crop.declarations()["margin"].describe(), "tracking_only": False, "range": "in [0, 0.5]"
    }  # fmt: skip
    assert by_name["crop_passes"]["limit"] == "crop_passes" and by_name["crop_passes"]["type"] == "int"
    assert by_name["smooth_beta"]["tracking_only"] and not by_name["conf"]["tracking_only"]
