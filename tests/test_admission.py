"""Admission before decoding (posetriton.server.admission): leases that the network ends oldest first, that expire
when their request never reaches it, and a gate that stays open while no network step holds the ledger."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from posetriton.server.admission import (
    MAX_LEASE_S,
    AdmissionLedger,
    Door,
    ServiceTime,
    lease_seconds,
    ledger_path,
)

NOW = 1000.0


@pytest.fixture
def ledger(tmp_path: Path) -> AdmissionLedger:
    ledger = AdmissionLedger(tmp_path / "ledger", capacity=3)
    ledger.attach()
    return ledger


def test_the_gate_holds_capacity_leases_and_the_network_ends_the_oldest(ledger: AdmissionLedger) -> None:
    leases = [ledger.admit(2.0, now=NOW + i / 10) for i in range(3)]
    assert all(lease is not None for lease in leases) and ledger.held(now=NOW + 0.3) == 3
    assert ledger.admit(2.0, now=NOW + 0.3) is None, "every slot is held: refused before decoding"
    ledger.started(now=NOW + 0.3)  # the first one admitted (expiring first) started on the network
    assert ledger.held(now=NOW + 0.3) == 2
    oldest = leases[0]
    assert oldest is not None and ledger.admit(2.0, now=NOW + 0.3) == type(oldest)(oldest.index, NOW + 2.3)


def test_a_lease_whose_request_never_reaches_the_network_expires(ledger: AdmissionLedger) -> None:
    for _ in range(3):
        assert ledger.admit(0.5, now=NOW) is not None
    assert ledger.admit(0.5, now=NOW + 0.4) is None
    assert ledger.admit(0.5, now=NOW + 0.6) is not None, "expired leases free their slots"
    assert ledger.held(now=NOW + 0.6) == 1


def test_a_cancelled_lease_frees_its_own_slot_only(ledger: AdmissionLedger) -> None:
    first = ledger.admit(2.0, now=NOW)
    assert first is not None
    ledger.cancel(first)
    assert ledger.held(now=NOW) == 0
    ledger.admit(2.0, now=NOW + 0.5)  # may take the same slot again
    ledger.cancel(first)  # a stale lease: the slot belongs to the newer request now
    assert ledger.held(now=NOW + 0.5) == 1


def test_the_gate_is_open_while_no_live_network_step_holds_the_ledger(tmp_path: Path) -> None:
    ledger = AdmissionLedger(tmp_path / "ledger", capacity=1)
    for _ in range(5):  # a GPU server's TensorRT network never ends a lease: nothing may be refused for it
        assert ledger.admit(2.0, now=NOW) is not None
    dead = multiprocessing.get_context("spawn").Process(target=os.getpid)
    dead.start()
    dead.join()
    ledger.attach(pid=dead.pid)  # a network stub that died
    assert ledger.admit(2.0, now=NOW) is not None and ledger.admit(2.0, now=NOW) is not None
    ledger.attach()
    assert ledger.admit(2.0, now=NOW) is not None and ledger.admit(2.0, now=NOW) is None
    ledger.detach()
    assert ledger.admit(2.0, now=NOW) is not None


def test_processes_share_one_ledger_through_its_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    preprocess, network = AdmissionLedger(path, capacity=2), AdmissionLedger(path, capacity=2)
    network.attach()
    assert preprocess.admit(2.0, now=NOW) and preprocess.admit(2.0, now=NOW + 0.1)
    assert preprocess.admit(2.0, now=NOW + 0.2) is None
    network.started(now=NOW + 0.2)
    assert preprocess.admit(2.0, now=NOW + 0.2) is not None


def test_leases_follow_the_request_timeout_and_the_ledger_sits_under_the_server_prefix(tmp_path: Path) -> None:
    assert lease_seconds(600_000) == pytest.approx(0.85) and lease_seconds(0) == MAX_LEASE_S
    assert lease_seconds(60_000_000) == MAX_LEASE_S
    region = "posetriton_test12_ab12cd_" + "a05e3710-9872-4704-aa4a-a43281d18392"
    path = ledger_path("m_network", region, shm_dir=tmp_path)
    assert path == tmp_path / "posetriton_test12_ab12cd_admission_m_network"
    planted = tmp_path / "planted"
    planted.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):  # never written through a link someone planted in /dev/shm
        AdmissionLedger(planted, capacity=1)


def test_a_request_is_refused_when_the_leases_ahead_would_start_after_its_timeout(ledger: AdmissionLedger) -> None:
    ledger.publish_service_time(0.25)  # the network answers one request every 0.25 s under this load
    assert ledger.service_time() == 0.25
    assert ledger.admit(2.0, wait_s=0.6, now=NOW) is not None  # nothing ahead
    assert ledger.admit(2.0, wait_s=0.6, now=NOW) is not None  # one ahead: starts in about 0.25 s
    assert ledger.admit(2.0, wait_s=0.6, now=NOW) is not None  # two ahead: 0.5 s, inside its 0.6 s
    ledger.started(now=NOW)
    assert ledger.admit(2.0, wait_s=0.4, now=NOW) is None, "two ahead take 0.5 s: longer than it may wait"
    assert ledger.admit(2.0, wait_s=0.0, now=NOW) is not None, "no timeout: only the slots bound it"
    ledger.publish_service_time(0.05)  # the machine sped up: the same queue starts in time again
    ledger.started(now=NOW)
    assert ledger.admit(2.0, wait_s=0.4, now=NOW) is not None


def test_the_service_time_is_the_interval_between_answers_while_busy() -> None:
    service = ServiceTime(smoothing=0.5)
    service.started(now=0.0)  # a lone request: its latency
    assert service.answered(now=0.08) == pytest.approx(0.08)
    for _ in range(3):  # three at once after an idle spell: the first from when the network turned busy
        service.started(now=10.0)
    assert service.answered(now=10.1) == pytest.approx(0.09)
    assert service.answered(now=10.15) == pytest.approx(0.07)  # then the interval between answers
    assert service.answered(now=10.2) == pytest.approx(0.06)
    service.started(now=11.0)
    service.dropped()  # refused before it started: it does not count
    service.started(now=20.0)
    assert service.answered(now=20.06) == pytest.approx(0.06), "the idle spell is not service time"


def test_the_door_holds_capacity_waiting_requests_and_counts_what_it_refuses() -> None:
    door = Door(capacity=3)
    assert [door.admit(0.0, 0.05) for _ in range(3)] == [None, None, None] and door.waiting == 3
    refusal = door.admit(0.0, 0.05)
    assert refusal is not None and "(3)" in refusal and door.refused == 1 and door.waiting == 3
    door.dequeued(0.25)
    door.started()  # one left the wait: its slot is free again
    assert door.waiting == 2 and door.admit(0.0, 0.05) is None and door.queued_us == pytest.approx(250_000)
    with pytest.raises(ValueError, match="at least 1"):
        Door(0)


def test_the_door_refuses_a_request_that_would_not_start_within_its_timeout() -> None:
    door = Door(capacity=64)
    service_s, timeout_s = 0.1, 0.65  # about the SDK's timeout for a 2 s deadline (0.3 of it)
    for _ in range(7):  # the 7th finds 6 waiting ahead, 0.6 s of work: it starts within its timeout
        assert door.admit(timeout_s, service_s) is None
    assert door.waiting == 7
    refusal = door.admit(timeout_s, service_s)
    assert refusal is not None and "7 request(s) wait ahead" in refusal and "100 ms each" in refusal
    # The same request without a deadline, or with a longer one, still fits; so does any before a measurement.
    assert door.admit(0.0, service_s) is None
    assert door.admit(2 * timeout_s, service_s) is None
    assert Door(capacity=64).admit(0.001, 0.0) is None
    assert door.refused == 1
