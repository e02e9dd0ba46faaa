"""The stage loop, driven in memory: outputs stamped, errors and rejections counted, prompt stop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from stream_service.errors import InputError, RateLimitedLog, TransportError
from stream_service.runtime.runner import MemorySink, MemorySource, Outgoing, StageStats, _serve_one, run_stage
from stream_service.wire.messages import Array, FrameHeader, Header, Message, Stamp, encode

pytestmark = pytest.mark.timeout(60)

TIMEOUT_S = 10.0


class Invert:
    """Inverts the frame; fails on seq 2 (an expected, typed error) and on seq 99 (a bug)."""

    name = "invert"

    def process(self, topic: str, header: Header, arrays: list[Array]) -> Sequence[Outgoing]:
        if header.seq == 2:
            raise InputError(f"frame {header.seq}: expected a sharp image, found blur")
        if header.seq == 99:
            raise RuntimeError("bug")
        if header.seq == 5:  # an output that does not match its header: counted, not fatal
            return [(topic, header, [np.zeros((1, 1), np.uint8)])]
        return [(topic.replace("frames", "inverted"), header, [255 - arrays[0]])]


def frame_message(seq: int, camera: str = "cam0", dropped: int = 0) -> Message:
    header = FrameHeader(
        camera_id=camera,
        seq=seq,
        capture_ns=0,
        shape=(2, 3),
        dtype="uint8",
        dropped=dropped,
        stamps=(Stamp(stage="capture", t_ns=time.time_ns()),),
    )
    return Message(f"frames.{camera}", header, [np.full((2, 3), seq, np.uint8)])


def run_in_thread(
    source: MemorySource, sink: MemorySink, **options: object
) -> tuple[threading.Event, threading.Thread, StageStats, list[int]]:
    stop, stats, beats = threading.Event(), StageStats(latency_window=50), [0]

    def heartbeat() -> None:
        beats[0] += 1

    thread = threading.Thread(
        target=run_stage,
        args=(Invert(), source, sink, stop),
        kwargs={"heartbeat": heartbeat, "stats": stats, "poll_timeout_s": 0.02, **options},
        daemon=True,
    )
    thread.start()
    return stop, thread, stats, beats


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_the_loop_serves_counts_and_survives_bad_input() -> None:
    source, sink = MemorySource(), MemorySink()
    stop, thread, stats, beats = run_in_thread(source, sink)
    source.put(frame_message(0))
    source.put([b"frames.cam0", b"{not json"])  # malformed raw parts
    source.put([bytes(p) for p in encode(*frame_message(1, dropped=3))])
    source.put(frame_message(2))  # the stage raises InputError
    source.put(frame_message(5))  # the stage returns arrays that do not match its header
    source.put(frame_message(3, camera="cam1"))
    wait_for(lambda: stats.received == 5 and stats.rejected, "five messages and a rejection")
    wait_for(lambda: len(sink.messages) == 3, "three outputs")
    stop.set()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive()

    assert [m.header.seq for m in sink.messages] == [0, 1, 3]
    assert sink.messages[0].topic == "inverted.cam0"
    np.testing.assert_array_equal(sink.messages[0].arrays[0], np.full((2, 3), 255, np.uint8))
    header = sink.messages[1].header
    assert isinstance(header, FrameHeader)
    assert [s.stage for s in header.stamps] == ["capture", "invert"]
    snapshot = stats.snapshot()
    assert snapshot["received"] == 5 and snapshot["sent"] == 3
    assert snapshot["rejected"] == {"header json": 1}
    assert snapshot["errors"] == {"InputError": 1, "MessageError": 1}
    assert snapshot["dropped"] == {"cam0": 3}
    assert snapshot["latency_ms"]["invert"]["count"] == 3
    assert beats[0] > 0


def test_stop_event_stops_an_idle_loop_promptly() -> None:
    stop, thread, _, _ = run_in_thread(MemorySource(), MemorySink())
    time.sleep(0.05)  # let it block in receive
    start = time.monotonic()
    stop.set()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive()
    assert time.monotonic() - start < 2.0  # one poll timeout (0.02 s) plus scheduling on a loaded machine


def test_sink_drops_are_counted_per_camera() -> None:
    source, sink = MemorySource([frame_message(0), frame_message(1), frame_message(3, camera="cam1")]), MemorySink(1)
    stop, thread, stats, _ = run_in_thread(source, sink)
    wait_for(lambda: stats.received == 3, "three messages")
    stop.set()
    thread.join(TIMEOUT_S)
    assert stats.sent == 1 and stats.send_dropped == {"cam0": 1, "cam1": 1}


def test_a_bug_in_the_stage_is_counted_by_type_logged_with_a_rate_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, sink = MemorySource(), MemorySink()
    stop, thread, stats, _ = run_in_thread(source, sink)
    for _ in range(50):
        source.put(frame_message(99))  # the stage raises RuntimeError: a bug, not a typed error
    source.put(frame_message(0))
    wait_for(lambda: len(sink.messages) == 1, "the good frame after the bugs")
    stop.set()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive()
    assert stats.errors == {"RuntimeError": 50}
    assert [m.header.seq for m in sink.messages] == [0]
    lines = [r for r in caplog.records if "RuntimeError" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is not None  # one line (with its traceback), not 50


def test_a_flood_of_rejections_is_logged_as_a_rate_with_its_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    source, sink = MemorySource(), MemorySink()
    stats = StageStats(log_every_s=10.0)
    stats.warnings = RateLimitedLog(logging.getLogger("stream_service.runtime.runner"), 10.0, clock=lambda: now[0])
    for _ in range(100):
        source.put([b"frames.cam0", b"{not json"])
    for _ in range(100):
        _serve_one(Invert(), source, sink, stats, 0.01)
    now[0] = 11.0
    source.put([b"frames.cam0", b"{not json"])
    _serve_one(Invert(), source, sink, stats, 0.01)
    assert stats.rejected == {"header json": 101}
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "and 99 more like it in the last 11 s" in lines[1]


def test_a_transport_failure_propagates() -> None:
    class BrokenSink:
        def send(self, topic: str, header: Header, arrays: Sequence[object] = ()) -> bool:
            raise TransportError("send to ipc://x: expected the message queued, found Socket closed")

    with pytest.raises(TransportError):
        run_stage(Invert(), MemorySource([frame_message(0)]), BrokenSink(), threading.Event(), poll_timeout_s=0.01)


def test_a_set_stop_event_returns_at_once() -> None:
    stop = threading.Event()
    stop.set()
    stats = run_stage(Invert(), MemorySource([frame_message(0)]), MemorySink(), stop)
    assert stats.received == 0
