"""One stage as an OS process: its sockets, its stop signals, its heartbeats. What ``stream-service
capture|soartc|infer`` run.

Topology (endpoints from ``transport``; every hop bounded by its high-water mark, drop-oldest):

    capture (one per camera)      soartc workers (soartc.workers)        infer (one)
    PUSH bind capture_out[i] ---> PULL connect to capture_out[i], one per camera
                                  PUSH connect features_out ----------> PULL bind features_out
                                                                          PUB bind verdicts_pub --> SUB subscribers
                                                                          REP bind journal_rep  <-> REQ replay clients

The infer process writes every verdict to its journal (``runtime.journal``, SQLite) before publishing
it, and answers replay requests from it in a thread of its own (``wire.replay``).

Several soartc workers pull from the same captures (ZeroMQ load-balances PUSH over connected PULLs)
and push into the one infer process, which owns the features endpoint and the PUB socket. One infer
process per pipeline (it binds ``features_out`` and ``verdicts_pub``); scale the infer stage with the
GPU (``inference.device``) and the soartc stage with workers. Every send is non-blocking:
what a full queue refuses is dropped, counted, and reported downstream in ``dropped``. With
``transport.shared_memory`` the PUSH hops carry pixels through a shared-memory ring (same host only);
stages never see the difference.

Bounds (``settings.limits``): each receiving socket refuses message parts larger than what it can
legitimately get (``receive_bound``: its cameras' frames, the token grid, a header, plus a margin),
headers past the size and depth limits, and cameras it does not serve; a soartc worker has one
receiver per capture endpoint (``transport.ReceiverSet``), so a frame is accepted only on its own
camera's endpoint.

Lifecycle: SIGTERM or SIGINT set the stop event; the loop finishes the message in hand, closes its
sockets (``transport.linger_ms``) and returns. With a heartbeat file the process writes a JSON
snapshot of its counters there every ``supervisor.heartbeat_s`` (atomically: write, then rename); with
``exit_with_parent`` it stops when its parent (the supervisor) is gone.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from stream_service.errors import ConfigError, JournalError, SharedMemoryError
from stream_service.runtime.heartbeat import Heartbeat
from stream_service.runtime.runner import StageStats, run_stage
from stream_service.settings import CameraSettings, Settings
from stream_service.wire.messages import Array, ArraySpec, Header, HeaderLimits, Part

if TYPE_CHECKING:
    from stream_service.runtime.journal import Journal, JournalReader
    from stream_service.wire.transport import FrameSender

log = logging.getLogger(__name__)

# Every ring slot holds a message's payloads, each starting at a 64-byte boundary (transport's layout).
_SLOT_MARGIN = 64


def connectable(endpoint: str) -> str:
    """The endpoint a peer connects to: a wildcard bind address (``*``, ``0.0.0.0``) becomes loopback."""
    return re.sub(r"^tcp://(\*|0\.0\.0\.0):", "tcp://127.0.0.1:", endpoint)


def check_topology(settings: Settings) -> None:
    """Refuse settings the topology cannot run: unbound (``:*``) endpoints."""
    endpoints = {
        "transport.features_out": settings.transport.features_out,
        "transport.verdicts_pub": settings.transport.verdicts_pub,
        "transport.journal_rep": settings.transport.journal_rep,
    }
    for i, camera in enumerate(settings.cameras):
        endpoints[f"transport.capture_out ({camera.id})"] = settings.transport.capture_endpoint(i, camera.id)
    for key, endpoint in endpoints.items():
        if endpoint.endswith(":*"):
            raise ConfigError(f"{key}: expected a fixed port that other stages can connect to, found {endpoint}")


def apply_security(settings: Settings | None, keys: Path | None = None) -> None:
    """CURVE on every tcp socket this process opens, with ``keys`` or ``security.keys`` (none: plaintext)."""
    from stream_service.wire.transport import CurveKeys, use_curve

    folder = keys if keys is not None else (settings.security.keys if settings is not None else None)
    use_curve(CurveKeys.load(folder) if folder is not None else None)


def camera_at(settings: Settings, camera_id: str | None) -> tuple[int, CameraSettings]:
    """The index and settings of ``camera_id`` (None: the only camera)."""
    ids = [c.id for c in settings.cameras]
    if camera_id is None:
        if len(ids) != 1:
            raise ConfigError(f"--camera: expected one of {ids} (the config has {len(ids)} cameras), found none")
        return 0, settings.cameras[0]
    if camera_id not in ids:
        raise ConfigError(f"--camera: expected one of {ids}, found {camera_id!r}")
    index = ids.index(camera_id)
    return index, settings.cameras[index]


def frame_bytes(settings: Settings, camera: CameraSettings) -> int:
    """The largest frame part ``camera`` sends: ``(H, W)`` uint8 of its configured size, or
    ``limits.unsized_frame_bytes`` when the settings do not fix its size (a device without ``frame_size``)."""
    shape = camera.frame_shape
    return shape[0] * shape[1] if shape is not None else settings.limits.unsized_frame_bytes


def receive_bound(settings: Settings, cameras: Sequence[CameraSettings], token_bytes_per_pixel: float = 0.0) -> int:
    """``ZMQ_MAXMSGSIZE`` of a socket receiving from ``cameras``: the largest part it can legitimately get
    (a frame, its token grid at ``token_bytes_per_pixel``, a header) plus ``limits.message_margin_bytes``."""
    limits = settings.limits
    largest = max(frame_bytes(settings, c) for c in cameras)
    return max(largest, int(largest * token_bytes_per_pixel), limits.max_header_bytes) + limits.message_margin_bytes


def header_limits(settings: Settings) -> HeaderLimits:
    """The header bounds of ``settings.limits``."""
    return HeaderLimits(max_bytes=settings.limits.max_header_bytes, max_depth=settings.limits.max_json_depth)


def install_stop_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (main thread only)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class LazySender:
    """A non-blocking ``transport.FrameSender`` (``send_timeout_ms=0``: a full queue drops and counts) whose
    shared-memory ring, when ``transport.shared_memory`` is on for its endpoint, is created at the first
    message that carries payloads and sized to them (frame sizes are not always known before the first
    frame). Messages without payloads (a camera's status) go out before that over ZeroMQ alone."""

    def __init__(self, endpoint: str, *, bind: bool, hwm: int, settings: Settings) -> None:
        from stream_service.wire.transport import FrameSender

        self.endpoint, self.bind, self.hwm = endpoint, bind, hwm
        self.transport = t = settings.transport
        self.shared_memory = t.uses_shared_memory(endpoint)
        self._ring_pending = self.shared_memory
        self._sender = FrameSender(endpoint, bind=bind, hwm=hwm, linger_ms=t.linger_ms, send_timeout_ms=0)

    def reserve_frame(self, shape: tuple[int, int]) -> npt.NDArray[np.uint8] | None:
        """A writable uint8 frame of ``shape`` in a free slot of the ring, for the capture to fill in place.

        None without a ring (shared memory off, or before the first frame sized it), when such a frame
        does not fit a slot, or when every slot is leased (the frame is then made privately and dropped).
        """
        spec = ArraySpec(name="frame", shape=shape, dtype="uint8")
        if self._ring_pending or not self._sender.fits([spec]):
            return None
        arrays = self._sender.reserve([spec])
        return None if arrays is None else cast("npt.NDArray[np.uint8]", arrays[0])  # the slot's own array

    def send(self, topic: str, header: Header, arrays: Sequence[Array | Part] = ()) -> bool:
        if self._ring_pending and arrays:
            self._ring_pending = False
            sizes = [a.nbytes if isinstance(a, np.ndarray) else memoryview(a).nbytes for a in arrays]
            try:
                self._sender.attach_ring(self.transport.shm_slots, max(1, sum(sizes) + _SLOT_MARGIN * len(sizes)))
            except SharedMemoryError as exc:
                if self.transport.shared_memory is True:
                    raise
                log.warning("%s: %s; its pixels go over ZeroMQ instead", self.endpoint, exc)
                self.shared_memory = False
        return self._sender.send(topic, header, arrays)

    def counters(self) -> dict[str, Any]:
        s = self._sender
        return {"sent": s.sent, "sent_in_place": s.sent_in_place, "dropped": dict(s.dropped)}

    def close(self) -> None:
        self._sender.close()


def _receiver_counters(receiver: Any) -> dict[str, Any]:
    return {
        "received": receiver.received,
        "dropped": dict(receiver.dropped),
        "rejected": dict(receiver.rejected),
        "ring": dict(receiver.ring_counts),
    }


def serve_capture(settings: Settings, camera_id: str | None, stop: threading.Event, heartbeat: Heartbeat) -> None:
    """The capture process of one camera: read, stamp, push (``stages.capture``), until ``stop``."""
    from stream_service.stages.capture import (
        CameraHealth,
        CaptureStage,
        CaptureStats,
        open_camera,
        retry_delay_s,
        run_capture,
    )
    from stream_service.wire.transport import terminate_context

    index, camera = camera_at(settings, camera_id)
    endpoint = settings.transport.capture_endpoint(index, camera.id)
    stage, stats = CaptureStage(camera), CaptureStats()
    sender = LazySender(endpoint, bind=True, hwm=settings.transport.capture_hwm, settings=settings)
    health = CameraHealth(camera.id)
    heartbeat.snapshot = lambda: {
        "capture": stats.snapshot(),
        "sender": sender.counters(),
        "camera": camera.id,
        "health": health.snapshot(),
    }
    try:
        heartbeat.running()
        log.info("capture %s: pushing on %s", camera.id, endpoint)
        run_capture(
            stage,
            open_camera(camera),
            sender,
            stop,
            retry_s=retry_delay_s(camera, settings),
            heartbeat=heartbeat,
            stats=stats,
            slots=sender.reserve_frame if sender.shared_memory else None,
            health=health,
            status_every_s=settings.health.status_every_s,
        )
    finally:
        sender.close()
        terminate_context()
    log.info("capture %s: stopped after %d frames (%d dropped)", camera.id, stats.frames, stats.dropped)


def serve_soartc(
    settings: Settings, camera_ids: Sequence[str] | None, stop: threading.Event, heartbeat: Heartbeat
) -> None:
    """A soartc worker: pull frames from the captures, push features to the infer stage, until ``stop``."""
    from stream_service.model.card import load_card, resolve_model_dir
    from stream_service.stages.features import FeaturesStage
    from stream_service.wire.transport import FrameReceiver, ReceiverSet, terminate_context

    t = settings.transport
    check_topology(settings)
    wanted = [camera_at(settings, c)[1].id for c in camera_ids] if camera_ids else [c.id for c in settings.cameras]
    heartbeat.write()
    card = load_card(resolve_model_dir(settings.inference.model))
    stage = FeaturesStage.from_settings(settings, card.features.to_spec(), wanted)
    served = [(i, c) for i, c in enumerate(settings.cameras) if c.id in stage.cameras]
    captures = [connectable(t.capture_endpoint(i, c.id)) for i, c in served]
    stats = StageStats(log_every_s=settings.logging.repeat_every_s)
    receivers: list[FrameReceiver] = []
    try:
        for endpoint, (_, camera) in zip(captures, served, strict=True):
            receivers.append(
                FrameReceiver(
                    endpoint,
                    hwm=t.capture_hwm,
                    linger_ms=t.linger_ms,
                    max_drain=t.max_drain,
                    max_message_bytes=receive_bound(settings, [camera]),
                    limits=header_limits(settings),
                    cameras={camera.id},
                    log_every_s=None,  # the runner logs rejections (rate-limited)
                )
            )
    except BaseException:
        for opened in receivers:
            opened.close()
        raise
    receiver = ReceiverSet(receivers)
    sender = LazySender(connectable(t.features_out), bind=False, hwm=t.features_hwm, settings=settings)
    heartbeat.snapshot = lambda: {
        "stage": stats.snapshot(),
        "receiver": _receiver_counters(receiver),
        "sender": sender.counters(),
        "features": {"unregistered": {cid: c.extractor.unregistered for cid, c in stage.cameras.items()}},
    }
    try:
        with heartbeat.beating():  # kernels compiled, the model run once: start-up, not a hang
            stage.warm_up()
        heartbeat.running()
        log.info("soartc: %s -> %s (cameras %s)", captures, t.features_out, sorted(stage.cameras))
        run_stage(
            stage, receiver, sender, stop, heartbeat=heartbeat, stats=stats, poll_timeout_s=t.recv_timeout_ms / 1e3
        )
    finally:
        receiver.close()
        sender.close()
        terminate_context()


def open_journal(settings: Settings) -> tuple[Journal | None, JournalReader | None, str]:
    """The infer stage's journal writer and reader, or (None, None, why) when it is off or broken.

    A journal that cannot be opened (a corrupt file, no room, no permission) is logged as an error and
    the stage runs on without it: verdicts are still published, replay requests answered with the reason."""
    from stream_service.runtime.journal import Journal, JournalReader

    if not settings.journal.enabled:
        return None, None, "journal.enabled: expected true for replay, found false"
    try:
        journal = Journal(settings.journal)
    except JournalError as exc:
        log.error("%s; running without the journal", exc)
        return None, None, str(exc)
    try:
        return journal, JournalReader(settings.journal), ""
    except JournalError as exc:
        journal.close()
        log.error("%s; running without the journal", exc)
        return None, None, str(exc)


def serve_infer(settings: Settings, stop: threading.Event, heartbeat: Heartbeat) -> None:
    """The infer process: pull features, journal and publish verdicts and highlights, serve the journal
    on ``transport.journal_rep``, until ``stop``."""
    from stream_service.model.card import resolve_model_dir
    from stream_service.model.session import InspectionModel
    from stream_service.runtime.journal import JournaledSink, replay_handler
    from stream_service.stages.inference import InferenceStage
    from stream_service.wire.replay import error_text
    from stream_service.wire.transport import FrameReceiver, FrameSender, ReplyServer, terminate_context

    t = settings.transport
    check_topology(settings)
    heartbeat.write()
    inference = settings.inference
    model = InspectionModel.load(
        resolve_model_dir(inference.model), inference.device, inference.threads, spin=inference.spin_threads
    )
    stage = InferenceStage(
        model,
        settings.inference,
        settings.highlight,
        max_shift_px=settings.soartc.max_shift_px,
        frame_shapes={c.id: c.frame_shape for c in settings.cameras if c.frame_shape is not None},
    )
    stats = StageStats(log_every_s=settings.logging.repeat_every_s)
    block, channels = model.card.features.block, len(model.card.features.channels)
    receiver = FrameReceiver(
        t.features_out,
        bind=True,
        hwm=t.features_hwm,
        linger_ms=t.linger_ms,
        max_drain=t.max_drain,
        max_message_bytes=receive_bound(settings, settings.cameras, channels * 4 / block**2),
        limits=header_limits(settings),
        cameras={c.id for c in settings.cameras},
        log_every_s=None,  # the runner logs rejections (rate-limited)
    )
    journal, reader, why = open_journal(settings)
    try:
        publisher = FrameSender(t.verdicts_pub, kind="pub", bind=True, hwm=t.publish_hwm, linger_ms=t.linger_ms)
        try:
            replay = ReplyServer(
                t.journal_rep,
                replay_handler(reader, settings.journal.replay_limit, why),
                error_text,
                max_request_bytes=settings.journal.max_request_bytes,
                linger_ms=t.linger_ms,
                poll_ms=t.recv_timeout_ms,
            )
        except BaseException:
            publisher.close()
            raise
    except BaseException:
        receiver.close()
        for part in (journal, reader):
            if part is not None:
                part.close()
        raise
    sink: JournaledSink | FrameSender = publisher if journal is None else JournaledSink(publisher, journal)
    heartbeat.snapshot = lambda: {
        "stage": stats.snapshot(),
        "receiver": _receiver_counters(receiver),
        "sender": {"sent": publisher.sent, "dropped": dict(publisher.dropped)},
        "journal": sink.counters() if isinstance(sink, JournaledSink) else {"off": why},
        "unscored": dict(stage.unscored),
        "model": f"{model.card.name} {model.card.version} on {model.providers[0]}",
    }
    try:
        with heartbeat.beating():  # kernels compiled, the model run once: start-up, not a hang
            stage.warm_up()
        replay.start()
        heartbeat.running()
        log.info(
            "infer: %s -> %s (model %s %s); journal %s served on %s",
            t.features_out,
            t.verdicts_pub,
            model.card.name,
            model.card.version,
            journal.path if journal is not None else f"off ({why})",
            t.journal_rep,
        )
        run_stage(stage, receiver, sink, stop, heartbeat=heartbeat, stats=stats, poll_timeout_s=t.recv_timeout_ms / 1e3)
    finally:
        replay.close()
        receiver.close()
        publisher.close()
        for part in (journal, reader):
            if part is not None:
                part.close()
        terminate_context()
