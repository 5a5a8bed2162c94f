"""A new family is its catalogue entry plus one module: exported, gated, served and described end to end.

``tests/families/toy_pose.py`` is such a module (a seeded PyTorch head with 5 keypoints of its own names and
skeleton, 320-px input); the catalogue written here is the only other thing it needs. Nothing in build_engines,
posetriton or the client names it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from posetriton.client import PoseClient
from posetriton.server.repository import load_catalog
from tests.conftest import EXPORT_PYTHON, ROOT, run_export_python, start_server

NAMES = ["head", "left_hand", "right_hand", "left_foot", "right_foot"]
SKELETON = [[0, 1], [0, 2], [0, 3], [0, 4]]
CATALOG = f"""
[families.toy_pose]
description = "A seeded toy pose head (tests only)"
exporter = "tests.families.toy_pose"
keypoint_names = {json.dumps(NAMES)}
skeleton = {json.dumps(SKELETON)}
letterbox = {{ input_size = 320, channel_order = "RGB", pad_position = "center", pad_value = 114 }}
postprocess = {{ conf = 0.6, iou = 0.5, max_det = 20, pre_nms_topk = 500, clip_to_image = true }}
candidates_topk = 200

[models.toy_pose_s]
family = "toy_pose"
"""


def _build(catalog: Path, repository: Path, workdir: Path, *extra: str) -> list[str]:
    return ["-m", "build_engines", "build", "toy_pose_s", "--catalog", str(catalog), "--repository", str(repository),
            "--workdir", str(workdir), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def toy_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy_family")
    catalog = root / "models.toml"
    catalog.write_text(CATALOG)
    run_export_python(*_build(catalog, root / "repository", root / "export", "--seed", "0"))
    return root


def test_the_catalogue_entry_gives_the_family_its_exporter_and_keypoint_layout(toy_repository: Path) -> None:
    model = load_catalog(toy_repository / "models.toml")["toy_pose_s"]
    assert model.exporter == "tests.families.toy_pose"
    assert model.postprocess.num_keypoints == 5, "the keypoint count follows from the catalogue's names"
    assert list(model.keypoint_names) == NAMES and [list(e) for e in model.skeleton] == SKELETON
    report = json.loads((toy_repository / "repository" / "toy_pose_s_network" / "export_report.json").read_text())
    gate = report["parity"]["openvino_vs_pytorch"]
    assert gate, "the export gate held the toy family's served IR to its PyTorch forward"


def test_the_new_family_serves_with_its_own_keypoint_names_and_skeleton(toy_repository: Path) -> None:
    server = start_server(toy_repository / "repository", models=["toy_pose_s"])
    try:
        with PoseClient(server.grpc_url, model="toy_pose_s") as client:
            meta = client.model_metadata()
            assert list(meta.keypoint_names) == NAMES and [list(e) for e in meta.skeleton] == SKELETON
            result = client.predict(ROOT / "samples" / "grace_hopper.jpg")
    finally:
        server.stop()
    assert result.keypoints.shape[1:] == (5, 3) and result.xy.shape[1:] == (5, 2)
    assert (result.width, result.height) == (512, 600)
    if len(result):
        assert set(result.poses[0].keypoint_names) == set(NAMES)


def test_a_family_whose_module_is_missing_is_refused_by_name(tmp_path: Path) -> None:
    catalog = tmp_path / "models.toml"
    catalog.write_text(CATALOG.replace("tests.families.toy_pose", "tests.families.no_such_family"))
    proc = subprocess.run(
        [str(EXPORT_PYTHON), *_build(catalog, tmp_path / "repository", tmp_path / "export", "--seed", "0")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "400"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "exporter module 'tests.families.no_such_family' not found" in proc.stdout + proc.stderr
