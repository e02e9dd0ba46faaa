"""Shared fixtures: the DeepPCB data set, its manifest, real pairs, a tiny exported model, and Prometheus' tools
(promtool, a real Prometheus server on loopback).

The GPU machine runs ``tests/test_soartc*.py`` without pydantic, zmq, torch or onnxruntime, so this
module imports none of them at module level: every such import happens inside the fixture that needs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from stream_service.wire.messages import Verdict

REPO = Path(__file__).resolve().parents[1]

# A few DeepPCB pairs from two boards (groups); enough for every test that needs real data.
PAIR_IDS = ("00041000", "00041001", "00041002", "00041003", "50600000", "50600001")


def dataset_root() -> Path:
    """$STREAM_SERVICE_DATASETS, or <repo>/../shared/datasets."""
    return Path(os.environ.get("STREAM_SERVICE_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session", autouse=True)
def _journal_state_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """$XDG_STATE_HOME in a temporary folder: no test (nor a process it starts) writes the default journal
    (``journal.path`` unset) into the real per-user state folder."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state-home"))


@pytest.fixture(scope="session")
def deeppcb() -> Path:
    """The DeepPCB folder (with manifest.jsonl); the test is skipped when it is absent."""
    root = dataset_root() / "deeppcb"
    if not (root / "manifest.jsonl").is_file():
        pytest.skip(f"DeepPCB data set not found at {root} (set STREAM_SERVICE_DATASETS to its parent folder)")
    return root


@pytest.fixture(scope="session")
def deeppcb_rows(deeppcb: Path) -> dict[str, dict[str, Any]]:
    """id -> raw manifest row (paths relative to the DeepPCB folder)."""
    rows = [json.loads(line) for line in (deeppcb / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return {row["id"]: row for row in rows}


@pytest.fixture(scope="session")
def deeppcb_items(deeppcb: Path, deeppcb_rows: dict[str, dict[str, Any]]) -> list[Any]:
    """The ManifestItems of PAIR_IDS (absolute paths), in that order."""
    from stream_service.quality.manifest import ManifestItem

    out = []
    for pair_id in PAIR_IDS:
        row = deeppcb_rows[pair_id]
        item = ManifestItem.model_validate(row)
        out.append(item.model_copy(update={"reference": deeppcb / row["reference"], "frame": deeppcb / row["frame"]}))
    return out


@pytest.fixture(scope="session")
def scorer() -> ModuleType:
    """The reference scorer (shared/tools/score.py, beside shared/datasets) as a module; skipped when absent."""
    path = dataset_root().parent / "tools" / "score.py"
    if not path.is_file():
        pytest.skip(f"reference scorer not found at {path}")
    spec = importlib.util.spec_from_file_location("reference_score", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_manifest(rows: list[dict[str, Any]], deeppcb: Path, out_dir: Path) -> Path:
    """A manifest at out_dir/manifest.jsonl of DeepPCB rows, paths made relative to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        moved = dict(row)
        for key in ("reference", "frame"):
            moved[key] = os.path.relpath(deeppcb / row[key], out_dir)
        lines.append(json.dumps(moved))
    path = out_dir / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def manifest_writer(deeppcb: Path) -> Callable[[list[dict[str, Any]], Path], Path]:
    """write_manifest bound to the DeepPCB folder: (rows, out_dir) -> out_dir/manifest.jsonl."""
    return lambda rows, out_dir: write_manifest(rows, deeppcb, out_dir)


@pytest.fixture(scope="session")
def real_pair(deeppcb: Path, deeppcb_rows: dict[str, dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """(reference, frame, boxes) of the first pair: (640, 640) float32 in [0, 1], copper = 1 (dark object)."""
    from stream_service.quality.manifest import read_gray
    from stream_service.vision.soartc import to_unit

    row = deeppcb_rows[PAIR_IDS[0]]
    reference = to_unit(read_gray(deeppcb / row["reference"]), dark_object=True)
    frame = to_unit(read_gray(deeppcb / row["frame"]), dark_object=True)
    return reference, frame, [tuple(b) for b in row["boxes"]]


@dataclass(frozen=True)
class TinyModel:
    """A tiny SoartcViT exported to ``directory`` (card.json + model.onnx), and the torch model itself."""

    directory: Path
    torch_model: Any
    card: Any


TINY_SPEC_CONSTANTS = (0.2, 0.5, 0.1)


def build_tiny_model(directory: Path, seed: int, threshold: float = 0.5) -> TinyModel:
    """Export an untrained SoartcViT(dim=16, depth=1, heads=2) and write a valid card next to it."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from stream_service.model.card import CARD_NAME, ONNX_NAME, file_sha256
    from stream_service.training.export import export_onnx
    from stream_service.training.ship import _card
    from stream_service.training.train import TrainConfig, TrainResult
    from stream_service.training.vit import SoartcViT, VitConfig
    from stream_service.vision.baseline import BaselineParams
    from stream_service.vision.soartc import Calibration
    from stream_service.vision.tokens import N_CHANNELS, FeatureSpec

    torch.manual_seed(seed)
    vit = VitConfig(channels=N_CHANNELS, dim=16, depth=1, heads=2)
    model = SoartcViT(vit)
    directory.mkdir(parents=True, exist_ok=True)
    export_onnx(model, directory / ONNX_NAME)
    spec = FeatureSpec(
        calibration=Calibration(TINY_SPEC_CONSTANTS, 2.0, "test"),
        sub_calibration=Calibration(TINY_SPEC_CONSTANTS, 2.0, "test"),
    )
    result = TrainResult(model, spec, TrainConfig(vit=vit), [], {}, 0, 0, 0.0)
    card = _card(
        result,
        "tiny",
        "0",
        file_sha256(directory / ONNX_NAME),
        threshold,
        "test",
        {"attention": 1.0, "magnitude": 0.0, "max_elongation": 1e6, "min_area": 0},
        "test",
        {"baseline": asdict(BaselineParams())},
        {},
        [],
        12,
    )
    (directory / CARD_NAME).write_text(card.model_dump_json(indent=1) + "\n")
    return TinyModel(directory, model, card)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny untrained model folder shared by the model, model card and evaluation tests."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def make_verdict() -> Callable[..., Verdict]:
    """Verdicts for tests: ``make_verdict(camera="cam0", seq=0, **fields)``, a pass of model m 1 against
    reference r 1 unless ``fields`` say otherwise."""

    def make(camera: str = "cam0", seq: int = 0, **fields: Any) -> Verdict:
        neutral: dict[str, Any] = {
            "capture_ns": 0,
            "verdict": "pass",
            "score": 0.1,
            "threshold": 0.5,
            "model_id": "m",
            "model_version": "1",
            "reference_id": "r",
            "reference_version": "1",
        }
        return Verdict(camera_id=camera, seq=seq, **(neutral | fields))

    return make


# -- Prometheus' tools (Debian's `prometheus` package): skipped without them, unless CI requires them -----------
REQUIRE_PROMETHEUS = "STREAM_SERVICE_REQUIRE_PROMETHEUS"


def prometheus_tool(name: str) -> str:
    """The path of ``name`` (``promtool``, ``prometheus``); the test is skipped when it is not on PATH,
    and fails instead when $STREAM_SERVICE_REQUIRE_PROMETHEUS is 1 (as .ci/run sets it)."""
    import shutil

    found = shutil.which(name)
    if found is None:
        if os.environ.get(REQUIRE_PROMETHEUS) == "1":
            pytest.fail(f"{REQUIRE_PROMETHEUS}=1 but no {name} on PATH (apt-get install prometheus)")
        pytest.skip(f"no {name} on PATH: this test needs Debian's prometheus package (apt-get install prometheus)")
    return found


@pytest.fixture
def promtool() -> str:
    return prometheus_tool("promtool")


@dataclass(frozen=True)
class PrometheusServer:
    """A Prometheus server started by a test on loopback: its URL and ``query`` over its HTTP API."""

    url: str
    log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result vector of an instant query (AssertionError when Prometheus refuses the query)."""
        import urllib.parse
        import urllib.request

        address = self.url + "api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(address, timeout=10) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", (promql, body)
        return list(body["data"]["result"])


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[str, float], PrometheusServer]]:
    """``start(target, scrape_interval_s)``: a real Prometheus (Debian's) scraping ``target`` (host:port) on
    a free loopback port, with its config and storage under ``tmp_path``; ready when returned, stopped
    (by its pid) at teardown."""
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    binary = prometheus_tool("prometheus")
    started: list[subprocess.Popen[bytes]] = []

    def start(target: str, scrape_interval_s: float) -> PrometheusServer:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        config = tmp_path / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": f"{round(scrape_interval_s * 1000)}ms", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": "stream-service", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"prometheus exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url + "-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return PrometheusServer(url, log)
            except OSError:
                pass  # not listening, or not ready yet
            assert time.monotonic() < deadline, f"prometheus not ready in 30 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class JournaledLine:
    """An infer stage's outside, in a thread: each verdict journaled, then published; the journal on REP."""

    pub: str
    rep: str
    settings: Any  # JournalSettings

    def journal_ids(self) -> list[str]:
        return journal_ids(self.settings)


def journal_ids(settings: Any) -> list[str]:
    """The verdict_ids in the journal of ``settings`` (JournalSettings), in publishing order."""
    import sqlite3

    with sqlite3.connect(settings.resolved_path) as db:
        return [row[0] for row in db.execute("SELECT verdict_id FROM verdicts ORDER BY id")]


@pytest.fixture
def journaled_line(tmp_path: Path) -> Iterator[Callable[[Callable[[int], Verdict], float], JournaledLine]]:
    """``start(verdict_of_seq, every_s)``: verdicts of cam0 journaled, then published on a free port every
    ``every_s``, the journal served on another (replay_limit 7); stopped at teardown."""
    import socket
    import threading
    import time

    from stream_service.runtime.journal import Journal, JournaledSink, JournalReader, replay_handler
    from stream_service.settings import JournalSettings
    from stream_service.wire.replay import error_text
    from stream_service.wire.transport import FrameSender, ReplyServer

    def free() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"

    started: list[Callable[[], None]] = []

    def start(verdict_of: Callable[[int], Verdict], every_s: float) -> JournaledLine:
        pub, rep = free(), free()
        settings = JournalSettings(path=tmp_path / "journal.sqlite", replay_limit=7)
        journal, reader = Journal(settings), JournalReader(settings)
        server = ReplyServer(
            rep, replay_handler(reader, 7), error_text, max_request_bytes=4096, linger_ms=0, poll_ms=50
        )
        stop, ready = threading.Event(), threading.Event()

        def publish() -> None:
            with FrameSender(pub, kind="pub", hwm=100, linger_ms=0) as sender:
                sink = JournaledSink(sender, journal)
                ready.set()
                seq = 0
                while not stop.is_set():
                    sink.send("verdicts.cam0", verdict_of(seq))
                    seq += 1
                    time.sleep(every_s)

        server.start()
        thread = threading.Thread(target=publish, daemon=True)
        thread.start()
        assert ready.wait(10)

        def close() -> None:
            stop.set()
            thread.join(10)
            server.close()
            reader.close()
            journal.close()

        started.append(close)
        return JournaledLine(pub, rep, settings)

    yield start
    for close in started:
        close()
