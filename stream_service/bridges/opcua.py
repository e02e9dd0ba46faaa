"""The OPC UA server: one object per camera whose variables follow the verdict stream (asyncua).

``serve_opcua_bridge`` subscribes to the infer stage's PUB socket and serves, in the namespace
``bridges.opcua.namespace_uri``, under Objects, one object per configured camera with string node ids that
never change (``ns=<index of the URI>;s=<camera>.<Name>``; resolve the index from the URI):

=================  ==========  ==================================================================
Name               Type        Value
=================  ==========  ==================================================================
``Verdict``        String      ``pass`` or ``fail`` of the newest verdict ("" before the first)
``Fail``           Boolean     the newest verdict is a fail
``Score``          Double      its model score
``Threshold``      Double      the threshold it was judged by (fail when score >= threshold)
``Regions``        String      its defect regions, JSON: [{"x1", "y1", "x2", "y2", "score", "area"}]
``VerdictTime``    DateTime    when it was made (UTC)
``VerdictId``      String      its verdict_id (UUIDv7)
``Seq``            Int64       the camera's frame sequence number
``PassCount``      UInt64      passes since the bridge started
``FailCount``      UInt64      fails since the bridge started
``Online``         Boolean     the camera's status is ``online`` and it was heard of within
                               ``health.camera_stale_s``
``State``          String      the camera's status word (``starting``, ``online``, ``reconnecting``,
                               ``failed``), ``stale`` when unheard of, ``offline`` before any
=================  ==========  ==================================================================

The variables of one verdict are written together, ``VerdictId`` last: a client that subscribes to
``VerdictId`` reads the rest of the same verdict when it is notified. Every variable is read-only.
Access: anonymous only with ``allow_anonymous``, else a ``users`` name and password; the endpoints are
``None`` (with ``allow_unencrypted``) and, with ``certificate`` and ``private_key``, Basic256Sha256 Sign
and SignAndEncrypt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server

from stream_service.errors import BridgeError, ConfigError, MessageError
from stream_service.runtime.heartbeat import Health, Heartbeat, HeartbeatStats
from stream_service.settings import OpcuaBridgeSettings, Settings
from stream_service.wire.messages import CameraStatus, Message, Verdict, verdict_time_ns

if TYPE_CHECKING:
    from asyncua.common.node import Node

    from stream_service.wire.transport import FrameReceiver

log = logging.getLogger(__name__)

POLL_S = 0.2  # how long one receive waits, so that a stop, a heartbeat or a stale camera is never late
VARIABLES: dict[str, tuple[Any, ua.VariantType]] = {
    "Verdict": ("", ua.VariantType.String),
    "Fail": (False, ua.VariantType.Boolean),
    "Score": (0.0, ua.VariantType.Double),
    "Threshold": (0.0, ua.VariantType.Double),
    "Regions": ("[]", ua.VariantType.String),
    "VerdictTime": (datetime(1970, 1, 1, tzinfo=UTC), ua.VariantType.DateTime),
    "Seq": (0, ua.VariantType.Int64),
    "PassCount": (0, ua.VariantType.UInt64),
    "FailCount": (0, ua.VariantType.UInt64),
    "Online": (False, ua.VariantType.Boolean),
    "State": ("offline", ua.VariantType.String),
    "VerdictId": ("", ua.VariantType.String),  # last: written after the rest of its verdict
}


class _Users:
    """asyncua's user manager: the configured users (read-only role), anonymous when allowed."""

    def __init__(self, settings: OpcuaBridgeSettings) -> None:
        self.settings = settings

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        if username is None:
            return User(role=UserRole.User) if self.settings.allow_anonymous else None
        if self.settings.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        log.warning("OPC UA login refused for user %r", username)
        return None


@dataclass
class CameraNode:
    """One camera's object and variables, and what is known of it."""

    nodes: dict[str, Node]
    passes: int = 0
    fails: int = 0
    state: str = "offline"
    heard: float | None = None  # time.monotonic() of its last verdict or status

    async def write(self, name: str, value: Any) -> None:
        await self.nodes[name].write_value(ua.Variant(value, VARIABLES[name][1]))

    async def verdict(self, v: Verdict) -> None:
        self.passes, self.fails = self.passes + (v.verdict == "pass"), self.fails + (v.verdict == "fail")
        made = verdict_time_ns(v) or v.capture_ns
        regions = json.dumps([r.model_dump() for r in v.regions])
        values: dict[str, Any] = {
            "Verdict": v.verdict,
            "Fail": v.verdict == "fail",
            "Score": v.score,
            "Threshold": v.threshold,
        }
        values |= {"Regions": regions, "VerdictTime": datetime.fromtimestamp(made / 1e9, UTC), "Seq": v.seq}
        values |= {"PassCount": self.passes, "FailCount": self.fails, "VerdictId": v.verdict_id or ""}
        for name in VARIABLES:  # in the table's order: VerdictId last
            if name in values:
                await self.write(name, values[name])

    async def status(self, state: str, online: bool) -> None:
        await self.write("State", state)
        await self.write("Online", online)


def _node_id(name: str, idx: int) -> ua.NodeId:
    """A string node id (``ns=idx;s=name``): the same on every start, unlike a numeric one asyncua would pick."""
    return ua.NodeId(ua.String(name), ua.Int16(idx), ua.NodeIdType.String)


async def build_server(settings: OpcuaBridgeSettings, cameras: list[str]) -> tuple[Server, dict[str, CameraNode]]:
    """The server with its endpoints, security and one object per camera (not started)."""
    server = Server(user_manager=_Users(settings))  # type: ignore[arg-type]  # asyncua's protocol, duck-typed
    await server.init()
    server.set_endpoint(f"opc.tcp://{settings.host}:{settings.port}/stream-service/")
    server.set_server_name("stream-service")
    policies = [ua.SecurityPolicyType.NoSecurity] if settings.allow_unencrypted else []
    if settings.certificate is not None and settings.private_key is not None:
        try:
            await server.load_certificate(str(settings.certificate))
            await server.load_private_key(str(settings.private_key))
        except (OSError, ValueError) as exc:
            raise BridgeError(
                f"bridges.opcua.certificate {settings.certificate}: expected a certificate and its key, found {exc}"
            ) from exc
        policies += [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt, ua.SecurityPolicyType.Basic256Sha256_Sign]
    server.set_security_policy(policies)
    tokens: list[type] = [ua.AnonymousIdentityToken] if settings.allow_anonymous else []
    server.set_identity_tokens([*tokens, *([ua.UserNameIdentityToken] if settings.users else [])])
    idx = await server.register_namespace(settings.namespace_uri)
    objects = server.nodes.objects
    nodes: dict[str, CameraNode] = {}
    for camera in cameras:
        obj = await objects.add_object(_node_id(camera, idx), ua.QualifiedName(camera, idx))
        variables = {}
        for name, (initial, kind) in VARIABLES.items():
            nodeid, browse = _node_id(f"{camera}.{name}", idx), ua.QualifiedName(name, idx)
            variables[name] = await obj.add_variable(nodeid, browse, ua.Variant(initial, kind))
        nodes[camera] = CameraNode(variables)
    return server, nodes


class OpcuaBridge:
    """Messages from ``receiver`` into the camera objects of a server (see the module docstring)."""

    def __init__(
        self, settings: OpcuaBridgeSettings, cameras: list[str], receiver: FrameReceiver, stale_s: float
    ) -> None:
        self.settings, self.cameras, self.receiver, self.stale_s = settings, cameras, receiver, stale_s
        self.health = Health(state="starting", since=time.time())
        self.verdicts = 0

    def stats(self) -> HeartbeatStats:
        return HeartbeatStats(health=self.health)

    async def run(self, stop: threading.Event, beat: Callable[[], None]) -> None:
        server, nodes = await build_server(self.settings, self.cameras)
        # One thread for the SUB socket: a ZeroMQ socket stays with one thread.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="opcua-sub") as pool:
            try:
                await server.start()
            except OSError as exc:
                where = f"{self.settings.host}:{self.settings.port}"
                raise BridgeError(f"bridges.opcua.port: expected a free port on {where}, found {exc}") from exc
            self.health = Health(state="online", since=time.time())
            log.info("OPC UA server on %s, namespace %s", server.endpoint.geturl(), self.settings.namespace_uri)
            try:
                loop = asyncio.get_running_loop()
                while not stop.is_set():
                    beat()
                    message = await loop.run_in_executor(pool, self._receive)
                    if message is not None:
                        await self._take(message, nodes)
                    await self._stale(nodes)
            finally:
                await server.stop()

    def _receive(self) -> Message | None:
        try:
            return self.receiver.receive(POLL_S)
        except MessageError:
            return None  # counted and logged by the receiver

    async def _take(self, message: Message, nodes: dict[str, CameraNode]) -> None:
        header = message.header
        camera = nodes.get(header.camera_id)
        if camera is None:
            return
        camera.heard = time.monotonic()
        if isinstance(header, Verdict):
            await camera.verdict(header)
            self.verdicts += 1
            if camera.state in ("offline", "stale"):
                camera.state = "online"  # verdicts come only from a camera delivering frames
                await camera.status(camera.state, True)
        elif isinstance(header, CameraStatus):
            camera.state = header.state
            await camera.status(header.state, header.state == "online")

    async def _stale(self, nodes: dict[str, CameraNode]) -> None:
        now = time.monotonic()
        for camera in nodes.values():
            if camera.heard is not None and camera.state != "stale" and now - camera.heard > self.stale_s:
                camera.state = "stale"
                await camera.status("stale", False)


def serve_opcua_bridge(settings: Settings, stop: threading.Event, heartbeat: Heartbeat) -> None:
    """The ``stream-service bridge opcua`` process: a SUB socket on the verdicts and status, the server."""
    from stream_service.runtime.service import connectable
    from stream_service.wire.transport import FrameReceiver, terminate_context

    opc = settings.bridges.opcua
    if opc is None:
        raise ConfigError("bridges.opcua: expected the OPC UA server's settings (port, users...), found none")
    # asyncua logs each of the thousands of standard nodes it loads at INFO: only its warnings are news here.
    logging.getLogger("asyncua").setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
    endpoint = connectable(settings.transport.verdicts_pub)
    topics = ["verdicts.", "status."]
    receiver = FrameReceiver(endpoint, kind="sub", topics=topics, hwm=settings.transport.publish_hwm, linger_ms=0)
    try:
        bridge = OpcuaBridge(opc, [c.id for c in settings.cameras], receiver, settings.health.camera_stale_s)
        heartbeat.snapshot = bridge.stats
        heartbeat.running()
        asyncio.run(bridge.run(stop, heartbeat))
    finally:
        receiver.close()
        terminate_context()
