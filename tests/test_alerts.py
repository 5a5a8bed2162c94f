"""The Prometheus alerting rules (k8s/monitoring/alert-rules.yaml), offline: promtool checks the file and runs
each alert on synthetic series of the metrics the real server exports (names and labels as scraped from
Triton 2.51 and the tracker's gauge); each fires when it should and stays quiet otherwise. Thresholds must
follow the repository's sequence slots and queue bounds."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from posetriton.server.admission import DOOR_PENDING_METRIC, DOOR_REFUSED_METRIC
from posetriton.server.repository import QUEUE_LIMITS, TRACK_MAX_SEQUENCES
from tests.test_k8s import K8S, _run, _tool

RULES = K8S / "monitoring" / "alert-rules.yaml"


def _rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_alert_thresholds_follow_the_repository() -> None:
    rules = _rules()
    assert re.search(rf"> 0\.8 \* {TRACK_MAX_SEQUENCES}$", rules["PosetritonTrackerSlotsFilling"]["expr"])
    assert rules["PosetritonNetworkBacklog"]["expr"].endswith(f">= {QUEUE_LIMITS['network'].max_queue_size}")
    assert (
        f"queue bound {QUEUE_LIMITS['network'].max_queue_size}"
        in rules["PosetritonNetworkBacklog"]["annotations"]["summary"]
    )


def _series(name: str, labels: str, values: str, pod: str = "p0") -> dict[str, str]:
    return {"series": f'{name}{{namespace="posetriton",pod="{pod}",{labels}}}', "values": values}


def test_alerts_fire_on_overload_and_full_slots_and_not_otherwise(tmp_path: Path) -> None:
    promtool = _tool("promtool", "apt-get install prometheus (Debian's package ships promtool)")
    check = _run([promtool, "check", "rules", str(RULES)])
    assert check.returncode == 0, f"promtool check rules:\n{check.stdout}{check.stderr}"
    slots, bound = TRACK_MAX_SEQUENCES, QUEUE_LIMITS["network"].max_queue_size
    model, tracker = 'model="yolo11n_pose_network",version="1"', 'model="yolo11n_pose_tracker"'
    rules = _rules()

    def fired(alert: str, value: str, **labels: str) -> dict:
        """The alert as promtool reports it: its labels, and its annotations with the templates filled in."""
        notes = rules[alert]["annotations"]
        fill = {"$value | humanize": value, "$value": value, **{f"$labels.{k}": v for k, v in labels.items()}}
        expanded = {}
        for key, text in notes.items():
            expanded[key] = re.sub(r"\{\{ (.+?) \}\}", lambda m: fill[m.group(1)], text)
        return {"exp_labels": {"severity": "warning", "namespace": "posetriton", **labels}, "exp_annotations": expanded}

    busy = {
        "interval": "1m",
        "input_series": [
            # 60 refusals a minute (1/s), then nothing
            _series("nv_inference_request_failure", f'{model},reason="REJECTED"', "0+60x20 1200x20"),
            _series("nv_inference_pending_request_count", model, f"{bound}x10 0x30"),
            # p1: a CPU pod whose network step refuses and holds its requests at its own door (Triton's queue empty)
            _series("nv_inference_request_failure", f'{model},reason="REJECTED"', "0x40", pod="p1"),
            _series("nv_inference_pending_request_count", model, "0x40", pod="p1"),
            _series(DOOR_REFUSED_METRIC, 'model="yolo11n_pose_network"', "0+60x20 1200x20", pod="p1"),
            _series(DOOR_PENDING_METRIC, 'model="yolo11n_pose_network"', f"{bound}x10 0x30", pod="p1"),
            _series(
                "posetriton_track_sequences",
                f'{tracker},instance="yolo11n_pose_tracker_0_0"',
                f"{int(0.9 * slots)}x10 3x30",
            ),
        ],
        "alert_rule_test": [
            {
                "eval_time": "9m",
                "alertname": "PosetritonRejectingRequests",
                "exp_alerts": [fired("PosetritonRejectingRequests", "1", pod=pod) for pod in ("p0", "p1")],
            },
            {
                "eval_time": "8m",
                "alertname": "PosetritonNetworkBacklog",
                "exp_alerts": [
                    fired("PosetritonNetworkBacklog", str(bound), pod=pod, model="yolo11n_pose_network")
                    for pod in ("p0", "p1")
                ],
            },
            {
                "eval_time": "8m",
                "alertname": "PosetritonTrackerSlotsFilling",
                "exp_alerts": [
                    fired(
                        "PosetritonTrackerSlotsFilling",
                        str(int(0.9 * slots)),
                        pod="p0",
                        model="yolo11n_pose_tracker",
                        instance="yolo11n_pose_tracker_0_0",
                    )
                ],
            },
            # quiet once the load is gone
            {"eval_time": "38m", "alertname": "PosetritonRejectingRequests", "exp_alerts": []},
            {"eval_time": "38m", "alertname": "PosetritonNetworkBacklog", "exp_alerts": []},
            {"eval_time": "38m", "alertname": "PosetritonTrackerSlotsFilling", "exp_alerts": []},
        ],
    }
    tests = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [busy]}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    proc = _run([promtool, "test", "rules", str(tmp_path / "tests.yaml")])
    assert proc.returncode == 0, f"promtool test rules:\n{proc.stdout}\n{proc.stderr}"
    # promtool really compared: expecting no alert where one fires fails
    busy["alert_rule_test"][0]["exp_alerts"] = []
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    assert _run([promtool, "test", "rules", str(tmp_path / "tests.yaml")]).returncode == 1
