"""The supervisor with fake stage processes: restarts with backoff, hung and silent stages, giving up, stopping.

The fake stage is a tiny Python script that behaves like ``stream-service <stage> --stats FILE``: it
writes heartbeats and stops on SIGTERM, or crashes, hangs, never starts, or ignores SIGTERM.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stream_service.errors import ConfigError
from stream_service.runtime.supervisor import StageSpec, Supervisor, plan
from stream_service.settings import Settings, SupervisorSettings, load_settings

pytestmark = pytest.mark.timeout(120)

FAKE_STAGE = """
import json, os, signal, sys, time
mode, stats = sys.argv[1], sys.argv[sys.argv.index("--stats") + 1]
stopping = []
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else lambda *_: stopping.append(1))

def beat(state):
    with open(stats + ".tmp", "w") as fh:
        record = {"schema_version": "1.0", "name": "fake", "stage": "soartc", "pid": os.getpid(), "state": state,
                  "t": time.time()}
        json.dump({**record, "stats": {}}, fh)
    os.replace(stats + ".tmp", stats)

beat("starting")
flag = os.path.join(os.path.dirname(os.path.dirname(stats)), "broken.flag")
if mode == "crash" or (mode == "flaky" and os.path.exists(flag)):
    time.sleep(0.1)
    sys.exit(3)
if mode == "silent":
    time.sleep(60)
beat("running")
while not stopping:
    if mode != "hang":
        beat("running")
    time.sleep(0.05)
"""

FAST = SupervisorSettings(
    heartbeat_s=0.05,
    heartbeat_timeout_s=1.0,
    restart_backoff_s=0.2,
    max_restarts=2,
    shutdown_deadline_s=1.5,
    startup_timeout_s=2.0,
)
TIMEOUT_S = 30.0


@pytest.fixture
def make_supervisor(tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE_STAGE)
    made: list[Supervisor] = []

    def make(*modes: str, settings: SupervisorSettings = FAST) -> Supervisor:
        specs = [StageSpec(f"{mode}-{i}", "soartc", (mode,)) for i, mode in enumerate(modes)]
        supervisor = Supervisor(specs, settings, tmp_path / "run", command=(sys.executable, str(script)))
        made.append(supervisor)
        return supervisor

    yield make
    for supervisor in made:
        supervisor.stop()


def poll_until(supervisor: Supervisor, done: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, [(s.name, s.state, s.exit_codes) for s in supervisor.stages]
        supervisor.poll()
        time.sleep(0.02)


# -- plan -------------------------------------------------------------------------------------------------
def two_cameras(**sections: object) -> Settings:
    cameras = [{"id": c, "source": {"kind": "synthetic"}} for c in ("left", "right")]
    return Settings.model_validate({"cameras": cameras, **sections})


def test_the_plan_is_one_infer_the_soartc_workers_and_a_capture_per_camera(tmp_path: Path) -> None:
    config = tmp_path / "line.yaml"
    specs = plan(two_cameras(soartc={"workers": 2}), config)
    assert [(s.name, s.kind) for s in specs] == [
        ("infer", "infer"),
        ("soartc-0", "soartc"),
        ("soartc-1", "soartc"),
        ("capture-left", "capture"),
        ("capture-right", "capture"),
    ]
    assert specs[-1].args == ("capture", "--config", str(config), "--camera", "right")
    bridged = plan(two_cameras(bridges={"mqtt": {"port": 1884}, "opcua": {"allow_anonymous": True}}), config)
    assert [(s.name, s.kind) for s in bridged[-2:]] == [("bridge-mqtt", "bridge"), ("bridge-opcua", "bridge")]
    assert [s.args for s in bridged[-2:]] == [("bridge", m, "--config", str(config)) for m in ("mqtt", "opcua")]
    assert [s.args for s in plan(load_settings(None, {}), None)] == [
        ("infer",),
        ("soartc",),
        ("capture", "--camera", "cam0"),
    ]


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"transport": {"verdicts_pub": "tcp://127.0.0.1:*"}}, "transport.verdicts_pub: expected a fixed port"),
        ({"transport": {"capture_out": ["tcp://127.0.0.1:5000", "tcp://*:*"]}}, r"capture_out \(right\)"),
    ],
)
def test_the_plan_refuses_a_topology_it_cannot_run(sections: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        plan(two_cameras(**sections), None)


# -- watching and restarting -----------------------------------------------------------------------------
def test_a_killed_stage_is_restarted(make_supervisor: Callable[..., Supervisor]) -> None:
    supervisor = make_supervisor("ok")
    supervisor.start()
    (stage,) = supervisor.stages
    poll_until(supervisor, lambda: stage.state == "running")
    first = stage.pid
    assert first is not None and stage.heartbeat is not None and stage.heartbeat.pid == first
    os.kill(first, signal.SIGKILL)
    poll_until(supervisor, lambda: stage.state == "running" and stage.pid != first)
    assert stage.restarts == 1 and stage.exit_codes == [-signal.SIGKILL]


def test_a_crashing_stage_backs_off_then_is_failed_and_retried_at_the_capped_backoff(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor("crash")
    supervisor.start()
    (stage,) = supervisor.stages
    starts = [time.monotonic()]
    pids = {stage.pid}

    def watch() -> bool:
        if stage.pid is not None and stage.pid not in pids:
            pids.add(stage.pid)
            starts.append(time.monotonic())
        return stage.state == "failed"

    poll_until(supervisor, watch)
    assert stage.exit_codes == [3, 3, 3] and stage.restarts == 2 and stage.process is None
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 2 and gaps[0] >= 0.2 and gaps[1] >= 0.4  # restart_backoff_s, doubled
    assert stage.reason is not None and "crash-0 failed 3 times in a row" in stage.reason
    assert "supervisor.max_restarts = 2" in stage.reason and str(supervisor.log_path("crash-0")) in stage.reason
    failed_at = time.monotonic()
    poll_until(supervisor, lambda: stage.restarts == 3)  # still retried, at restart_backoff_s x 16
    assert time.monotonic() - failed_at >= 0.2 * 16 - 0.5
    poll_until(supervisor, lambda: len(stage.exit_codes) == 4)
    assert stage.state == "failed"  # failed until it runs again


def test_a_failed_stage_that_comes_back_is_running_again_without_a_manual_step(
    make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.flag"
    broken.touch()  # the stage crashes while this exists (a camera unplugged, a disk full...)
    fast = FAST.model_copy(update={"restart_backoff_s": 0.05})
    supervisor = make_supervisor("flaky", settings=fast)
    supervisor.start()
    (stage,) = supervisor.stages
    poll_until(supervisor, lambda: stage.state == "failed")
    broken.unlink()
    poll_until(supervisor, lambda: stage.state == "running")
    assert stage.reason is None and len(stage.exit_codes) >= 3


@pytest.mark.parametrize(("mode", "why"), [("hang", "last heartbeat"), ("silent", "startup_timeout_s")])
def test_a_hung_or_silent_stage_is_killed_and_restarted(
    make_supervisor: Callable[..., Supervisor], mode: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = make_supervisor(mode)
    supervisor.start()
    (stage,) = supervisor.stages
    poll_until(supervisor, lambda: stage.restarts == 1)
    assert stage.exit_codes == [-signal.SIGKILL]
    assert any(why in r.getMessage() for r in caplog.records)


def test_stop_terminates_every_stage_and_kills_the_stubborn_after_the_deadline(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor("ok", "stubborn")
    supervisor.start()
    poll_until(supervisor, lambda: all(s.state == "running" for s in supervisor.stages))
    processes = [s.process for s in supervisor.stages]
    started = time.monotonic()
    supervisor.stop()
    took = time.monotonic() - started
    assert FAST.shutdown_deadline_s <= took < FAST.shutdown_deadline_s + 2.0
    assert [p.returncode for p in processes if p is not None] == [0, -signal.SIGKILL]
    assert [s.state for s in supervisor.stages] == ["stopped", "stopped"]


def test_stop_is_prompt_when_stages_comply(make_supervisor: Callable[..., Supervisor]) -> None:
    supervisor = make_supervisor("ok", "ok")
    supervisor.start()
    poll_until(supervisor, lambda: all(s.state == "running" for s in supervisor.stages))
    started = time.monotonic()
    supervisor.stop()
    assert time.monotonic() - started < 1.0
    assert all(s.process is not None and s.process.returncode == 0 for s in supervisor.stages)


def test_a_big_log_is_rotated_in_place_and_the_writer_goes_on_appending(tmp_path: Path) -> None:
    from stream_service.runtime.supervisor import rotate_log

    log = tmp_path / "soartc-0.log"
    with log.open("ab") as writer:  # as the supervisor hands it to a stage: O_APPEND
        writer.write(b"x" * 100 + b"\n")
        writer.flush()
        assert not rotate_log(log, 200, 2)
        writer.write(b"y" * 150 + b"\n")
        writer.flush()
        assert rotate_log(log, 200, 2)
        assert log.stat().st_size == 0 and (tmp_path / "soartc-0.log.1").stat().st_size == 252
        writer.write(b"after\n")
        writer.flush()
        assert log.read_bytes() == b"after\n"  # at the start of the emptied file, no hole before it
        writer.write(b"z" * 300 + b"\n")
        writer.flush()
        assert rotate_log(log, 200, 2)
    assert (tmp_path / "soartc-0.log.2").stat().st_size == 252  # the older one moved up
    assert (tmp_path / "soartc-0.log.1").read_bytes().startswith(b"after\n")
