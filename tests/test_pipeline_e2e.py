"""End to end: real stage processes on loopback under `stream-service run`, with the bundled model.

One pipeline (a 256x256 synthetic camera at 6 fps, pixels through shared memory as the default config
sends them on one host, the dashboard on) serves the tests in order: verdicts against the synthetic
ground truth, the dashboard in a browser, its /metrics checked by promtool and scraped by a real
Prometheus server, a malformed message at the infer stage, a slow subscriber, a killed stage, and
SIGTERM last. Overloaded pipelines (pixels over tcp and through shared memory) check
drop-oldest, and a soartc stage runs alone. Ports are picked free; every process started here is
stopped in teardown, by pid, even when a test fails.
Skipped only when the bundled model (models/soartc-vit) is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pytest

from stream_service.model.card import resolve_model_dir
from stream_service.model.references import build_reference, save_reference
from stream_service.runtime.summary import PipelineSummary
from stream_service.settings import load_settings
from stream_service.sources.synthetic import SyntheticCamera
from stream_service.wire.messages import FeaturesHeader, FrameHeader, Stamp, Verdict, encode
from stream_service.wire.shm_ring import ring_directory
from stream_service.wire.transport import FrameReceiver, open_socket, request

if TYPE_CHECKING:
    from conftest import PrometheusServer

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "stream_service.cli"]
STARTUP_S = 240.0  # imports, model load and JIT on a loaded 2-core machine
WAIT_S = 120.0

MODEL_DIR = resolve_model_dir(load_settings(None).inference.model)
MODEL_NAME = json.loads((MODEL_DIR / "card.json").read_text())["name"] if (MODEL_DIR / "card.json").is_file() else ""
pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.slow,
    pytest.mark.skipif(
        not (MODEL_DIR / "card.json").is_file() or not (MODEL_DIR / "model.onnx").is_file(),
        reason=f"the bundled model is missing ({MODEL_DIR}: card.json + model.onnx); train or install it first",
    ),
]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_config(
    directory: Path,
    fps: float,
    defect_rate: float,
    shared_memory: bool = False,
    camera: dict[str, Any] | None = None,
    dashboard: bool = False,
    **supervisor: float,
) -> tuple[Path, dict[str, str]]:
    """A pipeline config on free loopback ports: the synthetic camera at ``fps``, or ``camera`` when given;
    with ``dashboard``, the dashboard on a free port too (``endpoints["dashboard"]``: its URL)."""
    capture, features, verdicts, http, journal = free_ports(5)
    endpoints = {
        "capture": f"tcp://127.0.0.1:{capture}",
        "features": f"tcp://127.0.0.1:{features}",
        "verdicts": f"tcp://127.0.0.1:{verdicts}",
        "dashboard": f"http://127.0.0.1:{http}/",
        "journal": f"tcp://127.0.0.1:{journal}",
    }
    timing = {"heartbeat_s": 0.2, "heartbeat_timeout_s": 30.0, "restart_backoff_s": 0.5, "max_restarts": 5}
    timing |= {"shutdown_deadline_s": 4.0, "startup_timeout_s": STARTUP_S} | supervisor
    synthetic = {"kind": "synthetic", "width": 256, "height": 256, "fps": fps, "seed": 11, "defect_rate": defect_rate}
    config = {
        "cameras": [camera if camera is not None else {"id": "cam0", "source": synthetic}],
        "transport": {
            "capture_out": [endpoints["capture"]],
            "features_out": endpoints["features"],
            "verdicts_pub": endpoints["verdicts"],
            "journal_rep": endpoints["journal"],
            "shared_memory": shared_memory,
        },
        "soartc": {"device": "cpu"},
        "inference": {"device": "cpu", "threads": 1},
        "journal": {"path": str(directory / "journal.sqlite")},
        "supervisor": timing,
        "dashboard": {"enabled": dashboard, "host": "127.0.0.1", "port": http},
    }
    path = directory / "pipeline.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path, endpoints


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@dataclass
class Pipeline:
    process: subprocess.Popen[str]
    run_dir: Path
    config: Path
    endpoints: dict[str, str]
    subscriber: FrameReceiver
    seen: list[Verdict] = field(default_factory=list)  # every verdict the test's subscriber received

    @property
    def journal(self) -> Path:
        return self.config.parent / "journal.sqlite"

    def journal_ids(self) -> list[str]:
        """The verdict ids in the journal, in publishing order (read while the infer stage writes: WAL)."""
        with sqlite3.connect(self.journal) as db:
            return [row[0] for row in db.execute("SELECT verdict_id FROM verdicts ORDER BY id")]

    def drain(self, until: str | None = None) -> None:
        """Take what the test's subscriber holds into ``seen`` (verdicts keep coming: stop once its queue is
        empty), and wait for the verdict ``until`` when given."""
        deadline = time.monotonic() + WAIT_S
        while True:
            message = self.subscriber.receive(0.0 if until is None else 0.5)
            if message is not None and isinstance(message.header, Verdict):
                self.seen.append(message.header)
                if message.header.verdict_id == until:
                    until = None
            elif message is None and until is None:
                return
            assert time.monotonic() < deadline, f"verdict {until} never reached the test's subscriber"

    def heartbeat(self, name: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self.run_dir / f"{name}.json").read_text()))
        except (OSError, ValueError):
            return {}

    def pids(self) -> dict[str, int]:
        return {p.stem: int(json.loads(p.read_text())["pid"]) for p in self.run_dir.glob("*.json")}

    def verdicts(self, n: int, timeout_s: float = WAIT_S, after_ns: int = 0) -> list[Verdict]:
        out: list[Verdict] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < n:
            assert time.monotonic() < deadline, f"only {len(out)} of {n} verdicts in {timeout_s} s\n{self.logs()}"
            assert self.process.poll() is None, f"`run` exited with {self.process.returncode}\n{self.logs()}"
            message = self.subscriber.receive(0.2)
            if message is not None and isinstance(message.header, Verdict):
                self.seen.append(message.header)
                if message.header.capture_ns > after_ns:
                    out.append(message.header)
        return out

    def output(self) -> str:
        """What `run` printed (summary lines, the supervisor's log)."""
        return (self.run_dir.parent / "run.out").read_text()

    def logs(self) -> str:
        logs = [f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.run_dir.glob("*.log"))]
        return "\n".join([*logs, f"--- run\n{self.output()[-3000:]}"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.pids().values():  # only the stage processes this pipeline started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.subscriber.close()


def start_pipeline(
    directory: Path,
    fps: float,
    defect_rate: float,
    shared_memory: bool = False,
    camera: dict[str, Any] | None = None,
    dashboard: bool = False,
    **supervisor: float,
) -> Pipeline:
    config, endpoints = write_config(directory, fps, defect_rate, shared_memory, camera, dashboard, **supervisor)
    run_dir = directory / "run"
    with (directory / "run.out").open("w") as out:  # a file, not a pipe: nobody reads it while it runs
        process = subprocess.Popen(
            [*CLI, "run", "--config", str(config), "--run-dir", str(run_dir), "--summary-every", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    subscriber = FrameReceiver(endpoints["verdicts"], kind="sub", topics=["verdicts."], hwm=1000, linger_ms=0)
    pipeline = Pipeline(process, run_dir, config, endpoints, subscriber)
    try:
        pipeline.verdicts(1, timeout_s=STARTUP_S)
    except BaseException:
        pipeline.stop()
        raise
    return pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    started = start_pipeline(
        tmp_path_factory.mktemp("pipeline"), fps=6, defect_rate=0.6, shared_memory=True, dashboard=True
    )
    yield started
    started.stop()


def validator() -> Callable[[Verdict], None]:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "schemas" / "verdict.v1.json").read_text())
    return lambda v: jsonschema.validate(json.loads(v.model_dump_json()), schema)


def overlaps(region: Any, box: list[int], margin: int = 8) -> bool:
    return bool(
        region.x1 <= box[2] + margin
        and box[0] <= region.x2 + margin
        and region.y1 <= box[3] + margin
        and box[1] <= region.y2 + margin
    )


# -- the running pipeline -------------------------------------------------------------------------------------
def test_verdicts_of_known_frames_agree_with_the_synthetic_truth(pipeline: Pipeline) -> None:
    validate = validator()
    verdicts = pipeline.verdicts(48)
    for v in verdicts:
        validate(v)
        assert v.truth is not None and set(v.latency_ms) >= {"soartc", "infer", "end_to_end"}
        assert (v.model_id, v.reference_id) == (MODEL_NAME, "synthetic-seed11-256x256")
    defective = [v for v in verdicts if v.truth and v.truth["label"] == "fail"]
    clean = [v for v in verdicts if v.truth and v.truth["label"] == "pass"]
    assert len(defective) >= 10 and len(clean) >= 8
    caught = [v for v in defective if v.verdict == "fail"]
    located = [v for v in caught if any(overlaps(r, b) for r in v.regions for b in v.truth["boxes"])]  # type: ignore[index]
    false_alarms = [v for v in clean if v.verdict == "fail"]
    assert len(caught) >= 0.85 * len(defective), f"{len(caught)} of {len(defective)} defective frames judged fail"
    assert len(located) >= 0.8 * len(caught), f"{len(located)} of {len(caught)} fails have a region on a truth box"
    assert len(false_alarms) <= 0.15 * len(clean), f"{len(false_alarms)} of {len(clean)} clean frames judged fail"


def browser() -> str:
    """A headless Chromium for the dashboard test: skipped without one, unless CI requires it."""
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if found is None:
        if os.environ.get("STREAM_SERVICE_REQUIRE_BROWSER") == "1":
            pytest.fail("STREAM_SERVICE_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH: the dashboard's browser test needs one (apt-get install chromium)")
    return found


def rendered_page(url: str, profile: Path) -> str:
    """The dashboard's DOM after its script has fetched and rendered the status, in headless Chromium."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
    ]
    done = subprocess.run([browser(), *flags, url], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_dashboard_shows_live_verdicts_latency_and_processes_in_a_browser(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    pipeline.verdicts(6)  # verdicts and highlights have flowed for a while
    time.sleep(2.5)  # the run loop publishes to the dashboard once a second
    dom = rendered_page(pipeline.endpoints["dashboard"], tmp_path / "profile")
    assert 'data-ready="1"' in dom, dom[-3000:]  # the script fetched /api/status and rendered it
    assert f"model {MODEL_NAME}" in dom
    e2e = re.search(r'<tr data-stage="end_to_end"><td>end to end</td><td>([0-9.]+)</td><td>([0-9.]+)</td>', dom)
    assert e2e is not None and 0 < float(e2e.group(1)) <= float(e2e.group(2)), dom[-3000:]
    for name in ("infer", "soartc-0", "capture-cam0"):
        assert re.search(rf'data-process="{name}"><td>{name}</td><td class="state-running">running</td>', dom), name
    fps = re.search(r'id="camera-cam0".*?data-field="fps">([0-9.]+)<', dom, re.S)
    assert fps is not None and float(fps.group(1)) > 0
    assert re.search(r'id="camera-cam0".*?<img [^>]*src="/api/highlight/cam0\.jpg\?seq=\d+"', dom, re.S)
    with urllib.request.urlopen(pipeline.endpoints["dashboard"] + "api/highlight/cam0.jpg", timeout=10) as answer:
        picture = answer.read()
    assert answer.headers["Content-Type"] == "image/jpeg" and picture[:2] == b"\xff\xd8"  # a JPEG


def live_metrics(pipeline: Pipeline) -> str:
    """The dashboard's /metrics, once the run loop has published the stages' heartbeats to it."""
    deadline = time.monotonic() + WAIT_S
    while True:
        with urllib.request.urlopen(pipeline.endpoints["dashboard"] + "metrics", timeout=10) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain; version=")
            text = str(answer.read().decode())
        if 'stream_service_frames_captured_total{camera="cam0"}' in text:
            return text
        assert time.monotonic() < deadline, f"no stage counters on /metrics in {WAIT_S} s:\n{text}"
        time.sleep(0.5)


def test_promtool_accepts_the_live_metrics_of_the_pipeline(pipeline: Pipeline, promtool: str) -> None:
    pipeline.verdicts(6)
    text = live_metrics(pipeline)
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
    lines = text.splitlines()
    assert 'stream_service_camera_up{camera="cam0"} 1.0' in lines
    for name in ("infer", "soartc-0", "capture-cam0"):
        assert f'stream_service_process_restarts_total{{process="{name}"}} 0.0' in lines, name
    for stage in ("soartc", "infer", "end_to_end"):
        assert re.search(rf'^stream_service_latency_seconds_count{{camera="cam0",stage="{stage}"}} [1-9]', text, re.M)
    assert re.search(r'^stream_service_verdicts_total{camera="cam0",verdict="(pass|fail)"} [1-9]', text, re.M)


def grafana_queries(rate_interval: str) -> list[str]:
    """The Grafana dashboard's queries as Grafana sends them with every camera selected."""
    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return [q.replace("$__rate_interval", rate_interval).replace("$camera", ".*") for q in queries]


def test_a_real_prometheus_scrapes_the_pipeline_and_reports_the_verdict_rate(
    pipeline: Pipeline, start_prometheus: Callable[[str, float], PrometheusServer]
) -> None:
    prometheus = start_prometheus(pipeline.endpoints["dashboard"].removeprefix("http://").rstrip("/"), 0.5)
    deadline, rate = time.monotonic() + 45, 0.0
    while rate <= 0:
        assert time.monotonic() < deadline, f"no verdict rate in 45 s:\n{prometheus.log.read_text()[-3000:]}"
        time.sleep(1.0)
        result = prometheus.query("sum(rate(stream_service_verdicts_total[10s]))")
        rate = float(result[0]["value"][1]) if result else 0.0
    assert 0 < rate < 20, rate  # a 6 fps camera
    assert [r["value"][1] for r in prometheus.query('up{job="stream-service"}')] == ["1"]
    p99 = prometheus.query(
        'histogram_quantile(0.99, sum by (le) (rate(stream_service_latency_seconds_bucket{stage="end_to_end"}[10s])))'
    )
    assert p99 and 0 < float(p99[0]["value"][1]) <= 10, p99
    answered = {q: prometheus.query(q) for q in grafana_queries("10s")}  # each one valid PromQL, and
    # each one charts data, but those of counters that have no series until their first event.
    eventless = ("stream_service_messages_rejected_total", "stream_service_processing_errors_total", "_missed_")
    empty = [q for q, result in answered.items() if not result and not any(e in q for e in eventless)]
    assert not empty, f"no data for {empty}"


def test_a_malformed_message_is_rejected_counted_and_the_stage_keeps_serving(pipeline: Pipeline) -> None:
    infer_pid = pipeline.pids()["infer"]
    bogus = FeaturesHeader.model_validate(
        {
            "camera_id": "cam0",
            "seq": 1,
            "capture_ns": 0,
            "shape": [4, 4],
            "dtype": "uint8",
            "arrays": [{"name": "aligned", "shape": [4, 4], "dtype": "uint8"}],
            "registration": {"dx": 0, "dy": 0, "confidence": 1},
        }
    ).model_dump_json()
    push = open_socket("push", pipeline.endpoints["features"], bind=False, hwm=10, linger_ms=1000)
    try:
        push.send_multipart([b"features.cam0", b"{not json"])
        push.send_multipart([b"features.cam0", bogus.encode(), b"short"])  # payload of the wrong size
        push.send_multipart([b"features.cam0", b'{"schema_version": "9.0", "kind": "features"}'])
    finally:
        push.close()
    deadline = time.monotonic() + WAIT_S
    while True:
        rejected = pipeline.heartbeat("infer").get("stats", {}).get("stage", {}).get("rejected", {})
        if sum(rejected.values()) >= 3:
            break
        assert time.monotonic() < deadline, f"rejections not counted: {rejected}"
        time.sleep(0.2)
    assert {"header json", "payload size", "schema_version"} <= set(rejected)
    assert len(pipeline.verdicts(5, after_ns=time.time_ns())) == 5
    assert pipeline.pids()["infer"] == infer_pid  # the same process, still serving


def subscribe(pipeline: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*CLI, "subscribe", "--config", str(pipeline.config), "--json", "--timeout", "60", *args],
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_a_subscriber_down_for_30_s_backfills_every_missed_verdict_exactly_once(pipeline: Pipeline) -> None:
    first = subscribe(pipeline, "--count", "3")
    last = Verdict.model_validate_json(first.stdout.splitlines()[-1]).verdict_id
    assert last is not None
    time.sleep(30)  # the subscriber is down; the line goes on
    journal = pipeline.journal_ids()
    missed = len(journal) - journal.index(last) - 1
    assert missed >= 30, f"only {missed} verdicts in 30 s"
    wanted = missed + 40  # what it missed, then a few seconds of live verdicts
    again = subscribe(pipeline, "--since", last, "--count", str(wanted))
    got = [Verdict.model_validate_json(line).verdict_id for line in again.stdout.splitlines()]
    journal = pipeline.journal_ids()
    start = journal.index(last) + 1
    assert got == journal[start : start + wanted]  # every verdict after the last one it had, once, in order
    replayed = int(re.search(r"replayed (\d+) verdict", again.stderr).group(1))  # type: ignore[union-attr]
    assert missed <= replayed < wanted, again.stderr  # from the journal first, then live
    pipeline.drain(until=got[-1])  # the test's own subscriber never stopped: it received the very same verdicts
    reference = [v.verdict_id for v in pipeline.seen]
    at = reference.index(last) + 1
    assert reference[at : at + wanted] == got


def test_api_verdicts_replays_the_journal(pipeline: Pipeline) -> None:
    journal = pipeline.journal_ids()
    url = pipeline.endpoints["dashboard"] + "api/verdicts"
    with urllib.request.urlopen(f"{url}?camera=cam0&limit=5", timeout=30) as answer:
        page = json.loads(answer.read())
    assert [v["verdict_id"] for v in page["verdicts"]] == journal[:5] and page["more"] is True
    with urllib.request.urlopen(f"{url}?camera=cam0&since={page['next']}&limit=3", timeout=30) as answer:
        assert [v["verdict_id"] for v in json.loads(answer.read())["verdicts"]] == journal[5:8]
    try:
        urllib.request.urlopen(f"{url}?since=01a23768-5eba-72a1-8876-7a619778c6d2", timeout=30)
        raise AssertionError("an unknown id was accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == 400 and "since: expected the verdict_id" in json.loads(exc.read())["error"]
    infer_pid = pipeline.pids()["infer"]
    for body in (b"\xff\xfe", b'{"limit": "many"}', b"[]"):  # malformed requests: answered, never fatal
        assert json.loads(request(pipeline.endpoints["journal"], body, timeout_ms=10_000))["error"]
    assert pipeline.pids()["infer"] == infer_pid and len(pipeline.verdicts(2, after_ns=time.time_ns())) == 2


def test_a_slow_subscriber_drops_and_counts_without_holding_back_the_pipeline(pipeline: Pipeline) -> None:
    infer_pid = pipeline.pids()["infer"]
    rss_before = rss_mib(infer_pid)
    slow = FrameReceiver(
        pipeline.endpoints["verdicts"], kind="sub", topics=["verdicts."], hwm=2, linger_ms=0, max_drain=64
    )
    try:
        assert slow.receive(WAIT_S) is not None  # subscribed
        started_ns = time.time_ns()
        assert len(pipeline.verdicts(24, after_ns=started_ns)) == 24  # the slow one reads nothing meanwhile
        took_s = (time.time_ns() - started_ns) / 1e9
        # One receive drains what is queued for the slow subscriber and keeps only the newest verdict.
        newest = slow.receive(WAIT_S)
    finally:
        slow.close()
    assert newest is not None and isinstance(newest.header, Verdict)
    assert took_s < 24 / 6 * 3, f"the fast subscriber needed {took_s:.1f} s for 24 verdicts at 6 fps"
    assert slow.dropped["cam0"] > 0 and newest.header.dropped >= slow.dropped["cam0"]  # skipped, counted, reported
    assert rss_mib(infer_pid) - rss_before < 50


@pytest.mark.parametrize("stage", ["soartc-0", "infer", "capture-cam0"])
def test_a_killed_stage_is_restarted_by_the_supervisor_and_verdicts_resume(pipeline: Pipeline, stage: str) -> None:
    """kill -9 of any stage: restarted, verdicts resume; every verdict received, before and after, is in the
    journal (the infer stage writes it before publishing it); the journal survives its writer's kill -9
    intact; verdict ids stay unique when the capture restarts its sequence numbers."""
    pipeline.drain()
    before = list(pipeline.seen)
    pid = pipeline.pids()[stage]
    os.kill(pid, signal.SIGKILL)
    killed_ns = time.time_ns()
    deadline = time.monotonic() + STARTUP_S
    while True:
        beat = pipeline.heartbeat(stage)
        if beat.get("pid") not in (None, pid) and beat.get("state") == "running":
            break
        assert time.monotonic() < deadline, f"{stage} was not restarted\n{pipeline.logs()}"
        time.sleep(0.2)
    assert not alive(pid)
    resumed = pipeline.verdicts(5, timeout_s=STARTUP_S, after_ns=killed_ns)
    assert all(v.capture_ns > killed_ns for v in resumed)
    assert f"{stage} exited with code -9; restarting" in pipeline.output()
    received = [v.verdict_id for v in pipeline.seen]
    assert None not in received and len(set(received)) == len(received), "a verdict id was repeated"
    journal = pipeline.journal_ids()
    assert set(received) <= set(journal), f"{len(set(received) - set(journal))} received verdicts not journaled"
    order = {vid: i for i, vid in enumerate(journal)}
    assert [order[v] for v in received] == sorted(order[v] for v in received)  # journaled in publishing order
    with sqlite3.connect(pipeline.journal) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) = COUNT(DISTINCT verdict_id) FROM verdicts").fetchone()[0] == 1
    if stage == "capture-cam0":  # the new capture numbers its frames from the start again; the ids differ
        assert min(v.seq for v in resumed) < max(v.seq for v in before)
        assert not {v.verdict_id for v in resumed} & {v.verdict_id for v in before}


def test_a_200_mb_message_is_refused_by_size_and_the_infer_stage_keeps_serving(pipeline: Pipeline) -> None:
    infer_pid = pipeline.pids()["infer"]
    rss_before = rss_mib(infer_pid)

    def refused() -> tuple[dict[str, int], dict[str, int]]:
        core = pipeline.heartbeat("infer").get("stats", {}).get("stage", {})
        return core.get("rejected", {}), core.get("errors", {})

    before = refused()
    # A valid header for its 200 MB payload: only the size bound stands in its way.
    header = FrameHeader(camera_id="cam0", seq=1, capture_ns=0, shape=(10_000, 20_000), dtype="uint8")
    push = open_socket("push", pipeline.endpoints["features"], bind=False, hwm=1, linger_ms=0)
    try:
        push.send_multipart([b"features.cam0", header.model_dump_json().encode(), np.zeros(200 * 2**20, np.uint8)])
        assert len(pipeline.verdicts(5, after_ns=time.time_ns())) == 5
    finally:
        push.close()
    assert pipeline.pids()["infer"] == infer_pid
    assert refused() == before  # ZeroMQ refused it: it never reached the stage to be counted
    assert rss_mib(infer_pid) - rss_before < 100, "the 200 MB message was taken into memory"


def test_sigterm_stops_every_process_within_5_s(pipeline: Pipeline) -> None:
    pids = pipeline.pids()
    assert set(pids) == {"infer", "soartc-0", "capture-cam0"} and all(alive(p) for p in pids.values())
    started = time.monotonic()
    pipeline.process.send_signal(signal.SIGTERM)
    pipeline.process.wait(10)
    took = time.monotonic() - started
    output = pipeline.output()
    assert took < 5.0, f"`run` took {took:.1f} s to stop"
    assert pipeline.process.returncode == 0, output[-3000:]
    assert not [name for name, pid in pids.items() if alive(pid)]
    assert "verdicts" in output and "restarts" in output  # the final summary
    # and, into a file (not a terminal), a one-line summary every --summary-every second
    assert len(re.findall(r"^\[\s*\d+ s\] cam0 [0-9.]+ fps \d+ pass \d+ fail", output, re.M)) >= 5


# -- an overloaded pipeline, a stage alone ---------------------------------------------------------------------
def replay_camera(directory: Path, fps: float, frames: int = 12) -> dict[str, Any]:
    """A folder camera replaying pre-rendered synthetic frames, with the clean render as its reference.

    Reading a small PNG costs a fraction of a millisecond, far less than registering, scoring and
    inferring it, so at a high ``fps`` the capture outruns the stages on any machine (the synthetic
    camera renders each frame and, on two busy cores, may be no faster than the stages).
    """
    camera = SyntheticCamera(width=256, height=256, seed=11, defect_rate=0.5)
    folder = directory / "frames"
    folder.mkdir()
    for i in range(frames):
        assert cv2.imwrite(str(folder / f"{i:03d}.png"), camera.next_frame()[0])
    reference = build_reference([camera.reference()], reference_id="replay", polarity="dark-object")
    save_reference(reference, directory / "reference")
    return {
        "id": "cam0",
        "source": {"kind": "folder", "path": str(folder), "fps": fps, "loop": True},
        "reference": str(directory / "reference"),
    }


@pytest.mark.parametrize("shared_memory", [False, True], ids=["tcp", "shm"])
def test_an_overloaded_pipeline_drops_the_oldest_frames_and_counts_them(tmp_path: Path, shared_memory: bool) -> None:
    camera = replay_camera(tmp_path, fps=500)
    overloaded = start_pipeline(tmp_path, fps=500, defect_rate=0.5, shared_memory=shared_memory, camera=camera)
    try:
        overloaded.verdicts(5)  # past the start-up backlog
        pids = overloaded.pids()
        rss_before = {name: rss_mib(pid) for name, pid in pids.items()}
        frames_before = overloaded.heartbeat("capture-cam0")["stats"]["capture"]["frames"]
        summary = PipelineSummary()
        for v in overloaded.verdicts(30):
            summary.add(v, time.monotonic_ns())
        capture = overloaded.heartbeat("capture-cam0")["stats"]
        soartc = overloaded.heartbeat("soartc-0")["stats"]
        rss_after = {name: rss_mib(pid) for name, pid in pids.items()}
    finally:
        overloaded.stop()
    tally = summary.cameras["cam0"]
    frames = capture["capture"]["frames"] - frames_before
    assert frames > 30, f"capture delivered {frames} frames while 30 verdicts were made: was it blocked?"
    assert tally.dropped > 0  # reported in the verdicts,
    assert tally.missed == 0  # and every gap in the sequence numbers is a reported drop
    stage_drops = capture["capture"]["dropped"] + sum(soartc["receiver"]["dropped"].values())
    assert stage_drops > 0  # and in the stages' counters
    e2e = summary.latency.percentiles()["end_to_end"]
    assert e2e.p50 < 2000, f"end-to-end p50 {e2e.p50:.0f} ms: frames are queueing instead of being dropped"
    grown = {name: rss_after[name] - rss_before[name] for name in pids}
    assert max(grown.values()) < 50, f"memory grew (MiB): {grown}"
    leftover = [p for pid in pids.values() for p in ring_directory().glob(f"stream-service-ring-{pid}-*")]
    assert not leftover  # every shared-memory ring was unlinked


def test_the_soartc_stage_runs_alone_rejects_malformed_frames_and_keeps_serving(tmp_path: Path) -> None:
    config, endpoints = write_config(tmp_path, fps=5, defect_rate=1.0)
    stats = tmp_path / "soartc.json"
    features = FrameReceiver(endpoints["features"], bind=True, hwm=10, linger_ms=0)
    capture = open_socket("push", endpoints["capture"], bind=True, hwm=10, linger_ms=0)
    process = subprocess.Popen(
        [*CLI, "soartc", "--config", str(config), "--stats", str(stats)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        camera = SyntheticCamera(256, 256, seed=11, defect_rate=1.0)
        frame, truth = camera.next_frame()
        header = FrameHeader(
            camera_id="cam0",
            seq=4,
            capture_ns=time.time_ns(),
            shape=frame.shape,
            dtype="uint8",
            stamps=(Stamp(stage="capture", t_ns=time.time_ns()),),
            truth=dict(truth),
        )
        capture.send_multipart([b"frames.cam0", b"\xff\xfe"])  # blocks until the stage has connected
        wrong_size = header.model_copy(update={"shape": (10, 10)})
        capture.send_multipart(encode("frames.cam0", wrong_size, [np.zeros((10, 10), np.uint8)]))
        deadline = time.monotonic() + STARTUP_S
        while True:
            core = json.loads(stats.read_text())["stats"].get("stage", {}) if stats.exists() else {}
            if core.get("rejected") and core.get("errors"):
                break
            assert time.monotonic() < deadline, core
            assert process.poll() is None, process.communicate()[0][-3000:]
            time.sleep(0.2)
        assert core["rejected"] == {"header json": 1} and core["errors"] == {"FrameShapeError": 1}
        capture.send_multipart(encode("frames.cam0", header, [frame]))  # the stage still serves
        message = features.receive(WAIT_S)
        assert message is not None and isinstance(message.header, FeaturesHeader)
        out = message.header
        assert (out.seq, out.reference_id, out.truth) == (4, "synthetic-seed11-256x256", dict(truth))
        assert out.dropped == 1  # the wrong-size frame, lost, reported with the next one
        assert [s.stage for s in out.stamps] == ["capture", "soartc"]
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        assert time.monotonic() - started < 5.0 and process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        capture.close()
        features.close()


def test_an_infer_stage_with_a_corrupt_journal_runs_on_and_says_why_to_replay_clients(tmp_path: Path) -> None:
    config, endpoints = write_config(tmp_path, fps=5, defect_rate=0.5)
    (tmp_path / "journal.sqlite").write_bytes(b"garbage, not SQLite " * 500)  # the path write_config sets
    stats = tmp_path / "infer.json"
    process = subprocess.Popen(
        [*CLI, "infer", "--config", str(config), "--stats", str(stats)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_S
        while not (stats.exists() and json.loads(stats.read_text()).get("state") == "running"):
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()[0][-3000:]
            time.sleep(0.2)
        assert "expected a stream-service journal" in json.loads(stats.read_text())["stats"]["journal"]["off"]
        for body in (b'{"since": null}', b"{garbage", b'{"limit": -3}'):
            reply = json.loads(request(endpoints["journal"], body, timeout_ms=10_000))
            assert reply["verdicts"] == [] and reply["error"], reply
        assert (
            f"journal.path {tmp_path / 'journal.sqlite'}: expected a stream-service journal"
            in json.loads(request(endpoints["journal"], b"{}", timeout_ms=10_000))["error"]
        )
        assert process.poll() is None  # still serving
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_pipeline_on_a_loaded_machine_gives_verdicts_within_60_s_and_no_stage_is_taken_for_hung(
    tmp_path: Path,
) -> None:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        started = time.monotonic()
        # The supervisor's own defaults: 5 s without a heartbeat is a hang, 60 s to start.
        loaded = start_pipeline(
            tmp_path, fps=5, defect_rate=0.5, heartbeat_s=1.0, heartbeat_timeout_s=5.0, startup_timeout_s=60.0
        )
        try:
            took = time.monotonic() - started
            loaded.verdicts(5)
            restarts = [line for line in loaded.output().splitlines() if "restarting in" in line]
        finally:
            loaded.stop()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert took < 60, f"first verdict after {took:.0f} s with every core busy"
    assert restarts == []


def test_the_soartc_stage_refuses_crashers_and_frames_on_another_cameras_endpoint(tmp_path: Path) -> None:
    config, endpoints = write_config(tmp_path, fps=5, defect_rate=1.0)
    settings = json.loads(config.read_text())
    second = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    cam1 = settings["cameras"][0] | {"id": "cam1"}
    settings["cameras"].append(cam1)
    settings["transport"]["capture_out"].append(second)
    config.write_text(json.dumps(settings))
    stats = tmp_path / "soartc.json"
    features = FrameReceiver(endpoints["features"], bind=True, hwm=10, linger_ms=0)
    to_cam0 = open_socket("push", endpoints["capture"], bind=True, hwm=10, linger_ms=0)
    to_cam1 = open_socket("push", second, bind=True, hwm=10, linger_ms=0)
    process = subprocess.Popen(
        [*CLI, "soartc", "--config", str(config), "--stats", str(stats)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        frame, _ = SyntheticCamera(256, 256, seed=11, defect_rate=1.0).next_frame()
        header = FrameHeader(camera_id="cam0", seq=4, capture_ns=time.time_ns(), shape=frame.shape, dtype="uint8")
        good = [bytes(p) for p in encode("frames.cam0", header, [frame])]
        to_cam1.send_multipart(good)  # cam0's frame on cam1's endpoint; blocks until the stage connected
        for bad_header in (
            b"[" * 100_000,
            good[1].replace(b'"seq":4', b'"seq":' + b"9" * 5000),
            good[1].replace(b'"shape":[256,256]', b'"shape":[65536]'),
            good[1].replace(b'"camera_id":"cam0"', b'"camera_id":"camX"'),
        ):
            assert bad_header != good[1]
            to_cam0.send_multipart([good[0], bad_header, good[2]])
        expected = {"camera_id": 2, "header size": 1, "header json": 1, "header field 'shape'": 1}
        deadline = time.monotonic() + STARTUP_S
        while True:
            core = json.loads(stats.read_text())["stats"].get("stage", {}) if stats.exists() else {}
            if sum(core.get("rejected", {}).values()) >= sum(expected.values()):
                break
            assert time.monotonic() < deadline, core
            assert process.poll() is None, process.communicate()[0][-3000:]
            time.sleep(0.2)
        assert core["rejected"] == expected
        to_cam0.send_multipart(good)  # the stage still serves, on the right endpoint
        message = features.receive(WAIT_S)
        assert message is not None and isinstance(message.header, FeaturesHeader)
        assert (message.header.camera_id, message.header.seq, message.header.dropped) == ("cam0", 4, 0)
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(10)
        for closable in (to_cam0, to_cam1, features):
            closable.close()


def test_the_infer_stage_runs_alone_refuses_crashers_and_fails_safe_on_nan_tokens(tmp_path: Path) -> None:
    config, endpoints = write_config(tmp_path, fps=5, defect_rate=1.0)
    card = json.loads((MODEL_DIR / "card.json").read_text())
    block, channels = card["features"]["block"], len(card["features"]["channels"])
    size, grid = 256, 256 // block
    arrays = {
        "aligned": np.full((size, size), 200, np.uint8),
        "tokens": np.zeros((grid, grid, channels), np.float32),
        "open_diff": np.zeros((size, size), np.uint8),
        "diff": np.zeros((size, size), np.uint8),
    }

    def features(seq: int, tokens: np.ndarray | None = None) -> list[bytes]:
        payload = arrays | ({"tokens": tokens} if tokens is not None else {})
        header = FeaturesHeader.model_validate(
            {
                "camera_id": "cam0",
                "seq": seq,
                "capture_ns": time.time_ns(),
                "shape": [size, size],
                "dtype": "uint8",
                "arrays": [{"name": n, "shape": a.shape, "dtype": str(a.dtype)} for n, a in payload.items()],
                "registration": {"dx": 0.0, "dy": 0.0, "confidence": 1.0},
            }
        )
        return [bytes(p) for p in encode("features.cam0", header, list(payload.values()))]

    stats = tmp_path / "infer.json"
    process = subprocess.Popen(
        [*CLI, "infer", "--config", str(config), "--stats", str(stats)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    push = open_socket("push", endpoints["features"], bind=False, hwm=100, linger_ms=0)
    verdicts = FrameReceiver(endpoints["verdicts"], kind="sub", topics=["verdicts."], hwm=100, linger_ms=0)
    try:
        deadline = time.monotonic() + STARTUP_S
        while (first := verdicts.receive(0.5)) is None:  # until the stage is up and the subscription live
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()[0][-3000:]
            push.send_multipart(features(0))
        good = features(1)
        for bad in (
            [good[0], b"[" * 100_000, *good[2:]],
            [good[0], good[1].replace(b'"seq":1', b'"seq":' + b"9" * 5000), *good[2:]],
            [good[0], good[1].replace(b'"dx":0.0', b'"dx":Infinity'), *good[2:]],
            [good[0], good[1].replace(b'"shape":[256,256]', b'"shape":[256]'), *good[2:]],
            [good[0], good[1].replace(b'"camera_id":"cam0"', b'"camera_id":"camX"'), *good[2:]],
        ):
            assert bad[1] != good[1]
            push.send_multipart(bad)
        got: dict[int, Verdict] = {}
        # One at a time: the stage keeps only the newest queued message of a camera (transport.max_drain).
        for seq, tokens in ((5, np.full_like(arrays["tokens"], np.nan)), (6, None)):
            push.send_multipart(features(seq, tokens))
            deadline = time.monotonic() + WAIT_S
            while seq not in got:
                assert time.monotonic() < deadline and process.poll() is None, got
                message = verdicts.receive(0.5)
                if message is not None and isinstance(message.header, Verdict):
                    got[message.header.seq] = message.header
        assert (got[5].verdict, got[5].score) == ("fail", 1.0)
        assert got[5].reason is not None and got[5].reason.startswith("features: expected finite token values")
        assert got[6].reason is None and isinstance(first.header, Verdict)
        deadline = time.monotonic() + WAIT_S
        while True:
            beat = json.loads(stats.read_text())["stats"]
            if sum(beat["stage"]["rejected"].values()) >= 5 and beat.get("unscored"):
                break
            assert time.monotonic() < deadline, beat
            time.sleep(0.2)
        assert beat["stage"]["rejected"] == {
            "header size": 1,
            "header json": 1,
            "header field 'registration'": 1,
            "header field 'shape'": 1,
            "camera_id": 1,
        }
        assert beat["unscored"] == {"features": 1} and process.poll() is None
    finally:
        process.terminate()
        process.wait(10)
        push.close()
        verdicts.close()
