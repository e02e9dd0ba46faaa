"""The MQTT bridge: the pipeline's verdicts, camera status and highlights on an MQTT broker (paho-mqtt).

``MqttBridge.run`` subscribes to the infer stage's PUB socket and publishes, under ``bridges.mqtt.prefix``:

- ``{prefix}/{camera}/verdict``: every verdict, its JSON as published (schemas/verdict.v1.json), QoS 1;
- ``{prefix}/{camera}/status``: the camera's state word (``online``, ``reconnecting``, ``failed``,
  ``offline``), retained, QoS 1. Each camera's status goes out on a connection of its own whose last will
  is ``offline`` on that topic: a bridge that dies (or loses the broker) leaves ``offline`` behind;
- ``{prefix}/{camera}/highlight``: with ``highlights``, the newest highlight JPEG, retained, QoS 0.

Nothing is lost while the broker is down. ``AckCursor`` keeps the last verdict the broker acknowledged
(PUBACK) in a state file. Each connection is a fresh client (clean session): what the previous one sent
without an acknowledgement is forgotten with it, and the bridge asks the journal (``JournalClient``) for
every verdict after the acknowledged one and sends those first, in order, then goes on live. As in
``runtime.subscriber``, live verdicts already sent are skipped (ids are time-ordered), and the first live
verdict of a connection, or one after a sequence gap that ``dropped`` does not explain, first catches up
from the journal (which holds every verdict before the infer stage publishes it). A verdict the broker
received but whose PUBACK was lost is sent again: QoS 1 is at least once, and only then twice.

Connects are retried after ``reconnect_backoff_s``, doubled after each failure up to
``reconnect_backoff_max_s``; a verdict unacknowledged for ``ack_timeout_s`` drops the connection.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from stream_service.bridges.acks import AckCursor
from stream_service.errors import BridgeError, ConfigError, JournalError, MessageError, TransportError
from stream_service.runtime.heartbeat import Health, Heartbeat, HeartbeatStats
from stream_service.runtime.summary import missed_between
from stream_service.settings import MqttBridgeSettings, Settings, default_journal_path
from stream_service.wire.messages import CameraStatus, Verdict, highlight_jpeg

if TYPE_CHECKING:
    from stream_service.runtime.replay import JournalClient
    from stream_service.wire.transport import FrameReceiver

log = logging.getLogger(__name__)

POLL_S = 0.2  # how long one receive waits, so that a stop, a lost broker or a heartbeat is never late
OFFLINE = "offline"


def state_path(settings: Settings, bridge: MqttBridgeSettings) -> Path:
    """Where the bridge keeps its acknowledged verdict: ``state_path``, or next to the journal."""
    if bridge.state_path is not None:
        return bridge.state_path
    journal = settings.journal.path or default_journal_path()
    return journal.with_name(f"mqtt-{bridge.client_id}.state.json")


def topic(prefix: str, camera: str, what: str) -> str:
    return f"{prefix}/{camera}/{what}"


@dataclass
class _Link:
    """One paho client and what its callbacks saw (set on paho's network thread)."""

    client: paho.Client
    connected: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    refused: str | None = None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class MqttBridge:
    """Verdicts from ``receiver`` (a SUB socket on the verdicts) to the broker of ``bridge`` (module docstring)."""

    def __init__(
        self,
        bridge: MqttBridgeSettings,
        cameras: list[str],
        receiver: FrameReceiver,
        journal: JournalClient,
        state: Path,
    ) -> None:
        self.settings, self.cameras, self.receiver, self.journal = bridge, cameras, receiver, journal
        self.cursor = AckCursor(state)
        self.sent = 0  # verdicts handed to the broker (live and replayed)
        self.replayed = 0  # of them, from the journal
        self.health = Health(state="starting", since=time.time())
        self._failure: BridgeError | None = None  # raised on the network thread, re-raised on the bridge's
        self._published: str | None = self.cursor.acked  # the last verdict sent on this connection
        # No state yet: start live (the first verdict sent is the resume point), or from the journal's start.
        self._from_start = bridge.replay_first_start and self.cursor.acked is None
        self._seq: dict[str, int] = {}
        self._caught_up = False
        self._beat: Callable[[], None] = lambda: None

    def stats(self) -> HeartbeatStats:
        return HeartbeatStats(health=self.health)

    # -- connections ------------------------------------------------------------------------------------
    def _client(self, client_id: str, will: str | None) -> _Link:
        s = self.settings
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        link = _Link(client)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.ca_file is not None:
            try:
                client.tls_set(
                    ca_certs=str(s.ca_file),
                    certfile=str(s.cert_file) if s.cert_file else None,
                    keyfile=str(s.key_file) if s.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError) as exc:
                raise BridgeError(f"bridges.mqtt.ca_file {s.ca_file}: expected TLS certificates, found {exc}") from exc
        if will is not None:
            client.will_set(will, OFFLINE, qos=1, retain=True)
        client.max_inflight_messages_set(s.max_inflight)

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                link.refused = str(reason)
            else:
                link.connected.set()

        def on_disconnect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            link.lost.set()

        client.on_connect, client.on_disconnect = on_connect, on_disconnect
        return link

    def _connect(self, link: _Link) -> str | None:
        """Connect ``link``; None when connected, else why not."""
        s = self.settings
        link.client.connect_timeout = s.connect_timeout_s
        try:
            link.client.connect(s.host, s.port, keepalive=s.keepalive_s)  # TCP (and TLS), then CONNECT sent
        except (OSError, ValueError) as exc:
            return str(exc) or type(exc).__name__
        link.client.loop_start()
        deadline = time.monotonic() + s.connect_timeout_s
        while time.monotonic() < deadline and not link.connected.is_set() and link.refused is None:
            self._beat()
            time.sleep(0.02)
        if link.connected.is_set():
            return None
        link.close()
        return link.refused or f"no CONNACK from {s.host}:{s.port} within {s.connect_timeout_s} s"

    def _open(self, stop: threading.Event, beat: Callable[[], None]) -> tuple[_Link, dict[str, _Link]] | None:
        """A main connection and one per camera (its status, with its will), after capped backoff; None: stopped."""
        s, wait = self.settings, self.settings.reconnect_backoff_s
        while not stop.is_set():
            main = self._client(s.client_id, None)
            main.client.on_publish = self._on_publish
            why = self._connect(main)
            holders: dict[str, _Link] = {}
            for camera in self.cameras if why is None else ():
                holders[camera] = self._client(f"{s.client_id}-{camera}", topic(s.prefix, camera, "status"))
                why = self._connect(holders[camera])
                if why is not None:
                    break
            if why is None:
                return main, holders
            for link in (main, *holders.values()):
                link.close()
            self._set_health("reconnecting", f"MQTT broker {s.host}:{s.port}: {why}")
            log.warning("MQTT broker %s:%d: %s; retrying in %.1f s", s.host, s.port, why, wait)
            until = time.monotonic() + wait
            while time.monotonic() < until and not stop.is_set():
                beat()
                self._drain_while_away()
            wait = min(wait * 2, s.reconnect_backoff_max_s)
        return None

    def _on_publish(self, _c: Any, _u: Any, mid: int, _reason: Any, _p: Any) -> None:
        try:
            self.cursor.ack(mid)
        except BridgeError as exc:
            self._failure = exc

    def _set_health(self, state: str, reason: str | None) -> None:
        if self.health.state != state:
            self.health = Health.model_validate({"state": state, "reason": reason, "since": time.time()})

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, stop: threading.Event, beat: Callable[[], None]) -> None:
        """Bridge until ``stop``; raises ``BridgeError`` when the state file cannot be written."""
        self._beat = beat
        while not stop.is_set():
            opened = self._open(stop, beat)
            if opened is None:
                return
            main, holders = opened
            self._set_health("online", None)
            try:
                self._serve(main, holders, stop, beat)
            finally:
                if stop.is_set():
                    self._goodbye(main, holders)
                for link in (main, *holders.values()):
                    link.close()
                self.cursor.reset()
                self._published, self._caught_up = self.cursor.acked, False

    def _serve(self, main: _Link, holders: dict[str, _Link], stop: threading.Event, beat: Callable[[], None]) -> None:
        while not stop.is_set():
            beat()
            if self._failure is not None:
                raise self._failure
            lost = [name for name, link in (("main", main), *holders.items()) if link.lost.is_set()]
            if lost or self.cursor.oldest_age_s(time.monotonic()) > self.settings.ack_timeout_s:
                why = f"connection lost ({', '.join(lost)})" if lost else "no PUBACK within ack_timeout_s"
                self._set_health("reconnecting", why)
                log.warning("MQTT broker %s:%d: %s", self.settings.host, self.settings.port, why)
                return
            try:
                message = self.receiver.receive(POLL_S)
            except MessageError:
                continue  # counted and logged by the receiver
            if message is None:
                continue
            header = message.header
            if isinstance(header, Verdict):
                self._live(main, header)
            elif isinstance(header, CameraStatus) and header.camera_id in holders:
                holders[header.camera_id].client.publish(
                    topic(self.settings.prefix, header.camera_id, "status"), header.state, qos=1, retain=True
                )
            elif self.settings.highlights and (jpeg := highlight_jpeg(message)) is not None:
                main.client.publish(topic(self.settings.prefix, header.camera_id, "highlight"), jpeg, retain=True)

    def _live(self, main: _Link, verdict: Verdict) -> None:
        gap = missed_between(self._seq.get(verdict.camera_id), verdict.seq, verdict.dropped)
        if (self._published is not None or self._from_start) and (not self._caught_up or gap):
            self._caught_up = self._catch_up(main)
            self._from_start = self._from_start and not self._caught_up
        if self._already(verdict):
            return
        self._send(main, verdict)

    def _already(self, verdict: Verdict) -> bool:
        # UUIDv7 strings sort in time order: a live verdict up to the last one sent was sent.
        return verdict.verdict_id is not None and self._published is not None and verdict.verdict_id <= self._published

    def _catch_up(self, main: _Link) -> bool:
        """Send what the journal holds after the last verdict sent; False when the journal did not answer."""
        try:
            for verdict in self.journal.after(self._published):
                if main.lost.is_set():
                    return False
                self._beat()
                self._send(main, verdict)
                self.replayed += 1
        except (TransportError, JournalError) as exc:
            log.warning("catching up from the journal after %s: %s", self._published, exc)
            return False
        return True

    def _send(self, main: _Link, verdict: Verdict) -> None:
        s = self.settings
        while self.cursor.in_flight >= s.max_inflight and not main.lost.is_set():
            if self.cursor.oldest_age_s(time.monotonic()) > s.ack_timeout_s:
                break  # the broker stopped acknowledging: _serve drops this connection next
            self._beat()
            time.sleep(0.005)  # the broker acknowledges in order; a full window waits for it
        info = main.client.publish(
            topic(self.settings.prefix, verdict.camera_id, "verdict"), verdict.model_dump_json(), qos=1
        )
        if verdict.verdict_id is not None:
            self.cursor.sent(info.mid, verdict.verdict_id, time.monotonic())
            self._published = verdict.verdict_id
        self._seq[verdict.camera_id] = verdict.seq
        self.sent += 1

    def _drain_while_away(self) -> None:
        """Empty the SUB queue while the broker is away: those verdicts come from the journal afterwards."""
        try:
            message = self.receiver.receive(0.05)
        except MessageError:
            return
        if message is not None:
            log.debug("broker away: %s left to the journal", message.topic)

    def _goodbye(self, main: _Link, holders: dict[str, _Link]) -> None:
        """A clean stop: wait (briefly) for the last acknowledgements and leave each status ``offline``."""
        deadline = time.monotonic() + min(self.settings.ack_timeout_s, 2.0)
        while self.cursor.in_flight and time.monotonic() < deadline and not main.lost.is_set():
            time.sleep(0.01)
        for camera, link in holders.items():
            info = link.client.publish(topic(self.settings.prefix, camera, "status"), OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(1.0)
            except (RuntimeError, ValueError) as exc:  # paho: not queued (the connection went meanwhile)
                log.warning("camera %s: could not leave its status offline: %s", camera, exc)


def serve_mqtt_bridge(settings: Settings, stop: threading.Event, heartbeat: Heartbeat) -> None:
    """The ``stream-service bridge mqtt`` process: a SUB socket on the verdicts, the journal, the bridge."""
    from stream_service.runtime.replay import JournalClient
    from stream_service.runtime.service import connectable
    from stream_service.wire.transport import FrameReceiver, terminate_context

    bridge = settings.bridges.mqtt
    if bridge is None:
        raise ConfigError("bridges.mqtt: expected the MQTT bridge's settings (host, port, prefix...), found none")
    topics = ["verdicts.", "status.", *(["highlights."] if bridge.highlights else [])]
    endpoint = connectable(settings.transport.verdicts_pub)
    receiver = FrameReceiver(endpoint, kind="sub", topics=topics, hwm=settings.transport.publish_hwm, linger_ms=0)
    try:
        cameras = [c.id for c in settings.cameras]
        journal = JournalClient.from_settings(settings)
        mqtt = MqttBridge(bridge, cameras, receiver, journal, state_path(settings, bridge))
        heartbeat.snapshot = mqtt.stats
        heartbeat.running()
        log.info(
            "MQTT bridge: verdicts from %s to %s:%d under %s/, resuming after %s",
            endpoint,
            bridge.host,
            bridge.port,
            bridge.prefix,
            mqtt.cursor.acked or "(live: no state yet)",
        )
        mqtt.run(stop, heartbeat)
    finally:
        receiver.close()
        terminate_context()
