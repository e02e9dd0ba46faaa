"""The pipeline commands without a model: `subscribe` against a test publisher, stage and run errors, and a
slow subscriber on the verdict PUB socket (never blocks the publisher; its misses are counted)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import JournaledLine, journal_ids
from typer.testing import CliRunner

from stream_service.cli import app
from stream_service.runtime.summary import PipelineSummary
from stream_service.settings import JournalSettings
from stream_service.wire.messages import Region, Verdict, VerdictIds, highlight_header, utc_time
from stream_service.wire.transport import FrameReceiver, FrameSender

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "stream_service.cli"]
TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LineVerdict = Callable[..., Verdict]


@pytest.fixture(scope="session")
def verdict(make_verdict: Callable[..., Verdict]) -> LineVerdict:
    """``verdict(camera, seq, regions=1)``: every third one a fail, with regions, stage latencies and truth."""

    ids = VerdictIds()

    def make(camera: str, seq: int, regions: int = 1) -> Verdict:
        boxes = tuple(Region(x1=i, y1=i, x2=i + 9, y2=i + 9, score=0.9, area=50) for i in range(regions))
        now_ns = time.time_ns()
        return make_verdict(
            camera,
            seq,
            verdict_id=ids.new(now_ns),
            time=utc_time(now_ns),
            capture_ns=now_ns,
            verdict="fail" if seq % 3 == 0 else "pass",
            score=0.7 if seq % 3 == 0 else 0.2,
            regions=boxes,
            latency_ms={"soartc": 5.0, "infer": 7.0, "end_to_end": 12.0},
            truth={"label": "pass", "boxes": []},
        )

    return make


def jpeg(camera: str, seq: int) -> bytes:
    """The (stand-in) highlight picture of a verdict: JPEG markers around its camera and sequence number."""
    return b"\xff\xd8" + f"{camera}-{seq}".encode() + b"\xff\xd9"


@pytest.fixture
def publisher(verdict: LineVerdict) -> Iterator[str]:
    """A PUB socket publishing verdicts of cam0 and cam1, each followed by its highlight, every 20 ms; yields
    its endpoint."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    stop = threading.Event()
    ready = threading.Event()

    def publish() -> None:
        with FrameSender(endpoint, kind="pub", hwm=100, linger_ms=0) as pub:
            ready.set()
            seq = 0
            while not stop.is_set():
                for camera in ("cam0", "cam1"):
                    v = verdict(camera, seq)
                    pub.send(f"verdicts.{camera}", v)
                    pub.send(f"highlights.{camera}", highlight_header(v, jpeg(camera, seq)), [jpeg(camera, seq)])
                seq += 1
                time.sleep(0.02)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield endpoint
    stop.set()
    thread.join(10)


def subscribe(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "subscribe", *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_subscribe_prints_n_verdicts_as_json_valid_against_the_schema(publisher: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "schemas" / "verdict.v1.json").read_text())
    done = subscribe("--endpoint", publisher, "--count", "6", "--json", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 6
    for line in lines:
        jsonschema.validate(json.loads(line), schema)
        assert Verdict.model_validate_json(line).camera_id in ("cam0", "cam1")


def test_subscribe_filters_one_camera_and_prints_readable_lines(publisher: str) -> None:
    done = subscribe("--endpoint", publisher, "--camera", "cam1", "--count", "3", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("cam1 #") for line in lines), lines
    assert all(("PASS" in line) or ("FAIL" in line) for line in lines)


def test_subscribe_reads_the_endpoint_from_the_config(publisher: str, tmp_path: Path) -> None:
    config = tmp_path / "line.yaml"
    config.write_text(
        f"cameras:\n  - id: cam0\n    source: {{kind: synthetic}}\ntransport:\n  verdicts_pub: {publisher}\n"
    )
    done = subscribe("--config", str(config), "--count", "2", "--json", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2


def test_subscribe_saves_the_highlight_pictures_of_the_fails(publisher: str, tmp_path: Path) -> None:
    out = tmp_path / "pictures"
    args = ["--endpoint", publisher, "--camera", "cam0", "--count", "9", "--json", "--timeout", "30"]
    done = subscribe(*args, "--save-highlights", str(out), "--fails-only")
    assert done.returncode == 0, done.stderr
    fails = [v for v in map(Verdict.model_validate_json, done.stdout.splitlines()) if v.verdict == "fail"]
    assert len(fails) >= 2  # every third verdict of the publisher is a fail
    pictures = sorted((out / "cam0").iterdir())
    assert [p.name for p in pictures] == [f"{v.verdict_id}-fail.jpg" for v in fails]  # the last one too
    assert all(p.read_bytes() == jpeg("cam0", v.seq) for p, v in zip(pictures, fails, strict=True))
    assert f"saved {len(fails)} highlight(s) under {out}" in done.stderr


def test_subscribe_exits_1_with_a_clear_message_when_nothing_arrives() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    done = subscribe("--endpoint", endpoint, "--count", "1", "--timeout", "1")
    assert done.returncode == 1 and done.stdout == ""
    assert f"error: no verdict on {endpoint} for 1 s (nothing arrived)" in done.stderr


@pytest.mark.parametrize("command", ["run", "capture", "soartc", "infer", "subscribe"])
def test_pipeline_commands_have_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "--config" in result.output


def write_config(tmp_path: Path, extra: str = "") -> Path:
    """Two synthetic cameras on free ports (never the defaults: a pipeline someone runs may hold them)."""
    path = tmp_path / "line.yaml"
    cameras = "cameras:\n  - {id: left, source: {kind: synthetic}}\n  - {id: right, source: {kind: synthetic}}\n"
    ports = [free_port() for _ in range(5)]
    transport = (
        f"transport: {{capture_out: ['tcp://127.0.0.1:{ports[0]}', 'tcp://127.0.0.1:{ports[1]}'], "
        f"features_out: 'tcp://127.0.0.1:{ports[2]}', verdicts_pub: 'tcp://127.0.0.1:{ports[3]}', "
        f"journal_rep: 'tcp://127.0.0.1:{ports[4]}'}}\n"
    )
    path.write_text(cameras + ("" if "transport:" in extra else transport) + extra)
    return path


@pytest.mark.parametrize(
    ("args", "extra", "message"),
    [
        (["run"], "inference: {workers: 2}\n", "inference.workers: expected a known key"),
        (["run"], "soartc: {workers: 0}\n", "soartc.workers: expected an integer > 0"),
        (["run"], "inference: {model: /nonexistent/model}\n", "model card: expected /nonexistent/model/card.json"),
        (["capture"], "", "--camera: expected one of ['left', 'right']"),
        (["capture", "--camera", "middle"], "", "found 'middle'"),
        (["infer"], "inference: {workers: 3}\n", "inference.workers"),
        (["soartc"], "inference: {model: /nonexistent/model}\n", "model card: expected /nonexistent/model/card.json"),
    ],
)
def test_commands_refuse_what_they_cannot_run_naming_the_key(
    tmp_path: Path, args: list[str], extra: str, message: str
) -> None:
    done = subprocess.run(
        [*CLI, *args, "--config", str(write_config(tmp_path, extra))],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert message in done.stderr


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_slow_subscriber_never_blocks_the_publisher_and_its_misses_are_counted(verdict: LineVerdict) -> None:
    """20 000 verdicts of 40 regions (about 100 MB) at a subscriber that reads nothing meanwhile."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    count, message = 20_000, verdict("cam0", 0, regions=40)
    with (
        FrameSender(endpoint, kind="pub", hwm=8, linger_ms=0) as pub,
        FrameReceiver(endpoint, kind="sub", topics=["verdicts."], hwm=8, linger_ms=0) as slow,
    ):
        deadline = time.monotonic() + 10
        while slow.receive(0.05) is None:  # PUB drops until the subscription has arrived
            assert time.monotonic() < deadline
            pub.send("verdicts.warm", verdict("warm", 0))
        before = rss_kib()
        started = time.monotonic()
        for seq in range(count):
            assert pub.send("verdicts.cam0", message.model_copy(update={"seq": seq}))
        took = time.monotonic() - started
        grown_mib = (rss_kib() - before) / 1024
        summary, received, first = PipelineSummary(), 0, -1
        while (got := slow.receive(0.5)) is not None:
            if isinstance(got.header, Verdict) and got.header.camera_id == "cam0":
                first = got.header.seq if not received else first
                summary.add(got.header, time.monotonic_ns())
                received += 1
    assert took < 30.0  # a blocking publisher would wait for the subscriber forever
    assert grown_mib < 60, f"publisher memory grew by {grown_mib:.0f} MiB: unbounded queue?"
    tally = summary.cameras["cam0"]
    assert 0 < received < count / 2 and tally.missed > 0 and tally.last_seq is not None
    # Every verdict from the first to the last received was either received or counted as missed.
    assert received + tally.missed == tally.last_seq - first + 1


def test_version_and_help_read_cleanly() -> None:
    from stream_service import __version__

    runner = CliRunner()
    shown = runner.invoke(app, ["--version"])
    assert shown.exit_code == 0 and shown.output.strip() == f"stream-service {__version__}"
    helped = runner.invoke(app, ["run", "--help"])
    assert helped.exit_code == 0 and "--duration" in helped.output and "<bool>" not in helped.output


def synthetic_line(directory: Path, camera: dict[str, object] | None = None) -> Path:
    capture, features, verdicts = free_port(), free_port(), free_port()
    config = {
        "cameras": [camera or {"id": "cam0", "source": {"kind": "synthetic", "width": 256, "height": 256, "fps": 5}}],
        "transport": {
            "capture_out": [f"tcp://127.0.0.1:{capture}"],
            "features_out": f"tcp://127.0.0.1:{features}",
            "verdicts_pub": f"tcp://127.0.0.1:{verdicts}",
        },
        "inference": {"threads": 1},
        "supervisor": {"startup_timeout_s": 200.0},
        "dashboard": {"enabled": False},
    }
    path = directory / "line.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.timeout(300)
def test_a_run_that_ends_well_removes_its_temporary_folder_and_one_that_fails_keeps_it(tmp_path: Path) -> None:
    from stream_service.model.references import build_reference, save_reference
    from stream_service.sources.synthetic import SyntheticCamera

    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    command = [*CLI, "run", "--config"]
    line = str(synthetic_line(tmp_path))
    done = subprocess.run([*command, line, "--duration", "3"], capture_output=True, text=True, env=env, timeout=250)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "logs and heartbeats in " + str(temp) in done.stderr and list(temp.glob("stream-service-run-*")) == []
    board = SyntheticCamera(width=256, height=256, seed=3).reference()
    save_reference(build_reference([board], reference_id="board", polarity="dark-object"), tmp_path / "ref")
    gone = {
        "id": "cam0",
        "source": {"kind": "folder", "path": str(tmp_path / "none")},
        "reference": str(tmp_path / "ref"),
    }
    # Long enough for the capture to start (after the stages warm up) and find its folder missing.
    failing = [*command, str(synthetic_line(tmp_path, gone)), "--duration", "15"]
    failed = subprocess.run(failing, capture_output=True, text=True, env=env, timeout=250)
    assert failed.returncode == 1 and "error: camera cam0: " in failed.stderr, failed.stderr[-3000:]
    (kept,) = temp.glob("stream-service-run-*")
    assert f"logs and heartbeats kept in {kept}" in failed.stderr and (kept / "capture-cam0.log").is_file()


def test_a_camera_without_a_reference_is_refused_with_how_to_make_one(tmp_path: Path) -> None:
    camera = {"id": "cam0", "source": {"kind": "folder", "path": str(tmp_path)}, "reference": str(tmp_path / "no")}
    done = subprocess.run(
        [*CLI, "run", "--config", str(synthetic_line(tmp_path, camera))], capture_output=True, text=True
    )
    assert done.returncode == 1 and "expected the file reference.json, found none" in done.stderr
    assert "stream-service reference grab --config FILE --camera cam0" in done.stderr


@pytest.fixture
def journaled(verdict: LineVerdict, journaled_line: Callable[..., JournaledLine]) -> tuple[str, str, JournalSettings]:
    """(verdicts endpoint, journal endpoint, journal settings) of a journaled line publishing every 20 ms."""
    line = journaled_line(lambda seq: verdict("cam0", seq), 0.02)
    return line.pub, line.rep, line.settings


def test_subscribe_since_an_id_replays_then_goes_on_live_without_gap_or_duplicate(
    journaled: tuple[str, str, JournalSettings],
) -> None:
    pub, rep, settings = journaled
    time.sleep(1.0)  # about 50 verdicts journaled before this subscriber starts
    since = journal_ids(settings)[3]
    done = subscribe("--endpoint", pub, "--journal", rep, "--since", since, "--count", "150", "--json")
    assert done.returncode == 0, done.stderr
    got = [Verdict.model_validate_json(line).verdict_id for line in done.stdout.splitlines()]
    ids = journal_ids(settings)
    start = ids.index(since) + 1
    assert got == ids[start : start + 150]  # replayed in pages of 7, then live: each once, in order
    replayed = int(re.search(r"replayed (\d+) verdict", done.stderr).group(1))  # type: ignore[union-attr]
    assert 40 <= replayed < 150, done.stderr


@pytest.mark.parametrize(
    ("since", "message"),
    [
        ("01a23768-5eba-72a1-8876-7a619778c6d2", "since: expected the verdict_id of a verdict in the journal"),
        ("tuesday", "since: expected a verdict_id (UUIDv7) or an ISO 8601 time"),
    ],
)
def test_subscribe_since_an_unknown_id_or_a_bad_time_exits_1_naming_it(
    journaled: tuple[str, str, JournalSettings], since: str, message: str
) -> None:
    pub, rep, _ = journaled
    done = subscribe("--endpoint", pub, "--journal", rep, "--since", since, "--count", "1", "--timeout", "5")
    assert done.returncode == 1 and done.stdout == ""
    assert f"error: journal at {rep}: {message}" in done.stderr and repr(since) in done.stderr


def test_subscribe_since_without_a_journal_exits_1_naming_the_endpoint(publisher: str) -> None:
    nobody = f"tcp://127.0.0.1:{free_port()}"
    done = subscribe("--endpoint", publisher, "--journal", nobody, "--since", "2026-12-02T00:00:00Z", "--count", "1")
    assert done.returncode == 1 and f"request to {nobody}: expected a reply within" in done.stderr


def test_run_refuses_a_corrupt_journal_naming_journal_path(tmp_path: Path) -> None:
    bad = tmp_path / "journal.sqlite"
    bad.write_bytes(b"not a database " * 200)
    config = write_config(tmp_path, f"journal: {{path: {bad}}}\n")
    done = subprocess.run([*CLI, "run", "--config", str(config)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 1
    assert f"journal.path {bad}: expected a stream-service journal (SQLite), found" in done.stderr
