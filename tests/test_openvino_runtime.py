"""Network instances sharing the cores: each knows when another computes, and its share gives the same output."""

from __future__ import annotations

import multiprocessing
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np

from posetriton.core.images import decode_image
from posetriton.core.processing import letterbox
from posetriton.server.openvino_runtime import CoreShare, OpenVinoRunner, cpu_threads
from tests.conftest import UL_MODEL
from tests.test_repository import CATALOG


def _compute_until(path: Path, started: Event, finish: Event) -> None:
    share = CoreShare(path)
    with share.computing() as alone:
        assert alone
        started.set()
        finish.wait(60)


def test_an_instance_knows_when_another_process_computes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    started, finish = context.Event(), context.Event()
    share = CoreShare(tmp_path)
    with share.computing() as alone:
        assert alone, "nobody else computes"
    other = context.Process(target=_compute_until, args=(tmp_path, started, finish))
    other.start()
    try:
        assert started.wait(60)
        with share.computing() as alone:
            assert not alone, "the other process computes now: this one takes its share"
        # While this one computes, a newcomer sees it too (the other process still computes as well).
        with share.computing(), CoreShare(tmp_path).computing() as newcomer_alone:
            assert not newcomer_alone
    finally:
        finish.set()
        other.join(60)
    assert other.exitcode == 0
    with share.computing() as alone:
        assert alone, "the other process is done"
    share.close()


def test_the_shared_layout_runs_on_its_share_and_gives_the_same_candidates(
    model_repository: Path, photo_paths: list[Path]
) -> None:
    xml = model_repository / f"{UL_MODEL}_network" / "1" / "model.xml"
    runner = OpenVinoRunner(xml, precision="f32", shared_by=2)
    assert runner.shared is not None and runner.latency is not None and runner.throughput is not None
    threads = int(runner.shared.compiled.get_property("INFERENCE_NUM_THREADS"))
    assert threads == max(1, cpu_threads() // 2)
    spec = CATALOG[UL_MODEL].letterbox
    batch = np.stack([letterbox(decode_image(p.read_bytes(), spec.max_pixels), spec)[0] for p in photo_paths[:2]])
    runner.warm_up(batch.shape[1:])
    alone, shared = runner.infer(batch), runner.infer(batch, alone=False)
    assert alone.shape == shared.shape == (len(batch), *alone.shape[1:])
    np.testing.assert_allclose(shared, alone, rtol=1e-4, atol=1e-3)
    single = OpenVinoRunner(xml, precision="f32")
    assert single.shared is None, "one instance has the cores to itself: nothing else to compile"
