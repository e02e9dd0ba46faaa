"""The stage loop: receive -> process -> stamp -> send, with the error policy and the counters.

``run_stage`` drives one ``Stage`` between a ``Source`` and a ``Sink``: ``transport.FrameReceiver`` and
``transport.FrameSender`` in a process, ``MemorySource`` and ``MemorySink`` in tests. The policy:

- a malformed message (``MessageError`` from the source) is counted per reason, logged and dropped;
- a ``StreamServiceError`` from the stage (or a message it builds that cannot be encoded) is counted per
  type and logged with the camera and sequence number, and the loop goes on with the next message;
- any other exception from one message (a bug, or a third-party error a stage did not translate) is the
  last resort: counted per type like an error, logged with its traceback, and the loop goes on, since
  no single message may stop a stage; only a ``TransportError`` propagates (a broken socket is not cured
  by the next message), and the supervisor restarts the process;
- logging is rate-limited per reason or type (``RateLimitedLog``, ``log_every_s``): a flood of bad
  messages is a line every few seconds with its count, not a line per message;
- each outgoing frame or features header gets ``Stamp(stage.name, time.time_ns())``;
- frames dropped upstream (``header.dropped``) and sends the sink dropped are counted per camera.

The loop checks ``stop`` at least every ``poll_timeout_s`` and calls ``heartbeat`` at least that often.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from stream_service.errors import MessageError, RateLimitedLog, StreamServiceError, TransportError
from stream_service.runtime.latency import FpsCounter, LatencyTracker, latency_breakdown
from stream_service.wire.messages import (
    Array,
    FeaturesHeader,
    FrameHeader,
    Header,
    Message,
    Part,
    Verdict,
    add_stamp,
    decode,
    encode,
    rejection_reason,
)

log = logging.getLogger(__name__)

Outgoing = tuple[str, Header, Sequence[Array | Part]]


class Stage(Protocol):
    """A pure processing step: one received message in, zero or more ``(topic, header, arrays)`` out."""

    @property
    def name(self) -> str: ...

    def process(self, topic: str, header: Header, arrays: list[Array]) -> Sequence[Outgoing]: ...


class Source(Protocol):
    """Where messages come from; ``receive`` raises ``MessageError`` for a malformed one."""

    def receive(self, timeout_s: float) -> Message | None: ...


class Sink(Protocol):
    """Where messages go; ``send`` returns ``False`` when the message was dropped (queue full)."""

    def send(self, topic: str, header: Header, arrays: Sequence[Array | Part] = ()) -> bool: ...


class StopEvent(Protocol):
    """``threading.Event`` or ``multiprocessing.Event``."""

    def is_set(self) -> bool: ...


@dataclass
class StageStats:
    """Counters of one stage; ``snapshot()`` is what metrics and heartbeats report."""

    latency_window: int = 1000
    fps_window_s: float = 5.0
    received: int = 0
    sent: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    send_dropped: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    log_every_s: float = 10.0
    latency: LatencyTracker = field(init=False)
    fps: FpsCounter = field(init=False)
    warnings: RateLimitedLog = field(init=False)

    def __post_init__(self) -> None:
        self.latency = LatencyTracker(self.latency_window)
        self.fps = FpsCounter(self.fps_window_s)
        self.warnings = RateLimitedLog(log, self.log_every_s)

    def snapshot(self, now_ns: int | None = None) -> dict[str, Any]:
        """Plain-dict copy of the counters, latency percentiles (ms) and the received frame rate."""
        return {
            "received": self.received,
            "sent": self.sent,
            "dropped": dict(self.dropped),
            "send_dropped": dict(self.send_dropped),
            "rejected": dict(self.rejected),
            "errors": dict(self.errors),
            "latency_ms": self.latency.snapshot(),
            "fps": self.fps.fps(time.monotonic_ns() if now_ns is None else now_ns),
        }


def _latency_of(header: Header, now_ns: int) -> dict[str, float]:
    if isinstance(header, Verdict):
        return header.latency_ms
    if isinstance(header, FrameHeader | FeaturesHeader):
        return latency_breakdown(header.stamps, now_ns)
    return {}


def run_stage(
    stage: Stage,
    source: Source,
    sink: Sink,
    stop: StopEvent,
    *,
    heartbeat: Callable[[], None] | None = None,
    stats: StageStats | None = None,
    poll_timeout_s: float = 0.1,
) -> StageStats:
    """Run ``stage`` until ``stop`` is set; return its counters (``stats`` when given)."""
    stats = stats if stats is not None else StageStats()
    while not stop.is_set():
        if heartbeat is not None:
            heartbeat()
        _serve_one(stage, source, sink, stats, poll_timeout_s)
    return stats


def _serve_one(stage: Stage, source: Source, sink: Sink, stats: StageStats, timeout_s: float) -> None:
    # One message per call, so that nothing of it outlives the call: a shared-memory slot is given
    # back to its sender as soon as the stage and the sink are done with it, not when the next arrives.
    try:
        message = source.receive(timeout_s)
    except MessageError as exc:
        reason = rejection_reason(exc)
        stats.rejected[reason] += 1
        stats.warnings.warning(f"rejected {reason}", "%s: rejected a message: %s", stage.name, exc)
        return
    if message is None:
        return
    stats.received += 1
    stats.fps.tick(time.monotonic_ns())
    topic, header, arrays = message
    if isinstance(header, FrameHeader | FeaturesHeader | Verdict) and header.dropped:
        stats.dropped[header.camera_id] += header.dropped
    try:
        # Inside the try: a stage may make a later output only when it is asked for (the infer stage draws
        # its picture after the verdict went out), and that may fail after the first was sent.
        _send_all(stage, sink, stats, header, stage.process(topic, header, arrays))
    except TransportError:
        raise  # the socket itself failed: the stage cannot go on (see the module docstring)
    except StreamServiceError as exc:
        _count_error(stats, stage, header, exc)
    except Exception as exc:  # noqa: BLE001 (the last resort: no single message may stop a stage)
        _count_error(stats, stage, header, exc, traceback=True)


def _send_all(stage: Stage, sink: Sink, stats: StageStats, received: Header, outputs: Sequence[Outgoing]) -> None:
    now_ns = time.time_ns()
    for topic, header, arrays in outputs:
        stamped = add_stamp(header, stage.name, now_ns)
        try:
            queued = sink.send(topic, stamped, arrays)
        except MessageError as exc:  # a TransportError is not caught: see the module docstring
            _count_error(stats, stage, received, exc)
            continue
        if queued:
            stats.sent += 1
            latency = _latency_of(stamped, now_ns)
            if latency:
                stats.latency.add(latency)
        else:
            stats.send_dropped[stamped.camera_id] += 1


def _count_error(stats: StageStats, stage: Stage, header: Header, exc: Exception, traceback: bool = False) -> None:
    kind = type(exc).__name__
    stats.errors[kind] += 1
    stats.warnings.warning(
        f"error {kind}",
        "%s: %s on camera %s seq %d: %s",
        stage.name,
        kind,
        header.camera_id,
        header.seq,
        exc,
        exc_info=exc if traceback else None,
    )


class MemorySource:
    """A ``Source`` fed by ``put``: decoded ``Message`` objects, or raw parts decoded (and checked) on receipt."""

    def __init__(self, items: Iterable[Message | Sequence[Part]] = ()) -> None:
        self._queue: queue.Queue[Message | Sequence[Part]] = queue.Queue()
        for item in items:
            self.put(item)

    def put(self, item: Message | Sequence[Part]) -> None:
        self._queue.put(item)

    def receive(self, timeout_s: float) -> Message | None:
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None
        return item if isinstance(item, Message) else decode(item)


class MemorySink:
    """A ``Sink`` that encodes each message, decodes a private copy of the parts and keeps it in ``messages``.

    ``capacity``: how many messages it holds before ``send`` drops (returns ``False``); ``None``: no limit.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.messages: list[Message] = []

    def send(self, topic: str, header: Header, arrays: Sequence[Array | Part] = ()) -> bool:
        parts = encode(topic, header, arrays)
        if self.capacity is not None and len(self.messages) >= self.capacity:
            return False
        self.messages.append(decode([bytes(part) for part in parts]))
        return True
