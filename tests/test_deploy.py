"""deploy/: the systemd unit (a valid unit whose command line is one the CLI accepts), the Prometheus scrape
config (promtool accepts it, it scrapes the dashboard's /metrics) and the Grafana dashboard (its queries name
only metrics the service exports, and chart the ones a line engineer needs).

That every Grafana query runs on a real Prometheus against a real pipeline is checked in
tests/test_pipeline_e2e.py."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_service.runtime.heartbeat import beat
from stream_service.runtime.supervisor import StageSpec, StageState
from stream_service.settings import load_settings
from stream_service.web.prometheus import PipelineMetrics
from stream_service.wire.messages import Verdict

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "stream-service.service"
GRAFANA = REPO / "deploy" / "grafana-dashboard.json"
PROMETHEUS = REPO / "deploy" / "prometheus.yml"
METRIC = re.compile(r"\bstream_service_[a-z0-9_]+")
CLI = [sys.executable, "-m", "stream_service.cli"]


def exec_start() -> list[str]:
    line = next(x for x in UNIT.read_text().splitlines() if x.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def test_the_unit_runs_the_pipeline_with_options_the_cli_knows() -> None:
    program, command, *options = exec_start()
    assert program.endswith("/stream-service") and command == "run"
    flags = [o for o in options if o.startswith("--")]
    assert flags == ["--config", "--run-dir", "--summary-every"]
    help_text = subprocess.run([*CLI, "run", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert all(flag in help_text for flag in flags), help_text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    program = exec_start()[0]
    here = shutil.which("stream-service") or str(Path(sys.executable).parent / "stream-service")
    if not Path(here).exists():
        pytest.skip("the stream-service entry point is not installed in this environment")
    unit = tmp_path / "stream-service.service"
    unit.write_text(UNIT.read_text().replace(program, here))  # an executable that exists on this machine
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if "stream-service.service" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


def grafana_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard: its panels' targets and its variables' queries."""
    dashboard = json.loads(GRAFANA.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return queries + [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


CAPTURE_BEAT = {"capture": {"fps": 1.0, "frames": 1, "dropped": 1, "camera_errors": 1}, "camera": "cam0"}
INFER_BEAT: dict[str, Any] = {
    "stage": {"rejected": {"header json": 1}, "errors": {"ModelError": 1}},
    "receiver": {"dropped": {"cam0": 1}},
    "sender": {"dropped": {"cam0": 1}},
}


def exported_samples(make_verdict: Callable[..., Verdict]) -> set[str]:
    """The sample names of a PipelineMetrics fed a verdict and a capture and an infer process that have
    counted one of everything."""
    metrics = PipelineMetrics()
    metrics.verdict(make_verdict(latency_ms={"infer": 1.0, "end_to_end": 2.0}), missed=1)
    capture = StageState(StageSpec("capture-cam0", "capture", ()))
    capture.heartbeat = beat("capture-cam0", "capture", "running", CAPTURE_BEAT)
    infer = StageState(StageSpec("infer", "infer", ()), heartbeat=beat("infer", "infer", "running", INFER_BEAT))
    metrics.update([capture, infer], {})
    return {s.name for family in metrics.registry.collect() for s in family.samples}


def test_the_grafana_dashboard_queries_only_metrics_the_service_exports(make_verdict: Callable[..., Verdict]) -> None:
    exported = exported_samples(make_verdict)
    queries = grafana_queries()
    named = {name for q in queries for name in METRIC.findall(q)}
    assert named and named - exported == set(), f"not exported: {sorted(named - exported)}"
    wanted = {
        "stream_service_verdicts_total",
        "stream_service_latency_seconds_bucket",
        "stream_service_frames_dropped_total",
        "stream_service_messages_rejected_total",
        "stream_service_camera_up",
        "stream_service_process_restarts_total",
    }
    assert wanted - named == set(), f"the dashboard does not chart {sorted(wanted - named)}"
    latency = [q for q in queries if "stream_service_latency_seconds_bucket" in q]
    assert {"histogram_quantile(0.5,", "histogram_quantile(0.99,"} <= {q.split(" ")[0] for q in latency}
    assert all("by (le" in q for q in latency)  # a quantile of the summed buckets, per le


def test_the_grafana_dashboard_is_one_prometheus_datasource_variable_away_from_any_grafana() -> None:
    dashboard = json.loads(GRAFANA.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(set(ref_ids)) == len(ref_ids), panel["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_scrape_config_scrapes_the_default_dashboard() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = config["scrape_configs"]
    dashboard = load_settings(None).dashboard
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"{dashboard.host}:{dashboard.port}"]


def test_promtool_accepts_the_scrape_config(promtool: str) -> None:
    done = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
