"""ZeroMQ sockets and endpoints. The only module that imports ``zmq``.

``FrameSender`` and ``FrameReceiver`` move ``messages`` over PUSH/PULL or PUB/SUB, on ``tcp://`` or
``ipc://`` endpoints, with ``copy=False`` both ways: the arrays' buffers go to ZeroMQ without a copy and
arrive as views of ZeroMQ's buffers. Whatever the path, ``FrameReceiver.receive`` returns the same
``Message(topic, header, arrays)``, so stages never know how pixels travelled.

Real-time policy:

- bounds are parameters (the settings' high-water marks, linger, drain size), never defaults buried here;
- the capture sends with ``send_timeout_ms=0``: a full queue (``zmq.Again``) drops the frame, counts it
  per camera and adds it to the ``dropped`` field of that camera's next message: capture never blocks;
- with ``max_drain > 0`` the receiver drops the oldest: it takes up to ``1 + max_drain`` queued messages
  at once, keeps the newest per camera and adds the skipped ones to its ``dropped`` field.

Shared-memory ring (same-host PUSH/PULL hops, ``shm_slots > 0``; design in ``stream_service.wire.shm_ring``):
the sender copies each message's payloads into a free slot of its ring and sends only a descriptor
(ring name, slot, generation, offsets) over ZeroMQ; the receiver maps the ring and leases the slot (or,
with ``shm_copy=True``, copies the payloads out). A message larger than a slot goes inline. PUB sockets
do not take a ring: several subscribers would share one lease. On the wire an shm message is
``[topic + SHM_MARKER, header, descriptor]``; topics never contain NUL, so the marker cannot collide,
and SUB prefix filters still match.

Request/reply (the journal replay): ``ReplyServer`` answers each request on a REP socket with a
handler's bytes, in a thread of its own; ``request`` sends one request on a fresh REQ socket and waits
at most a timeout for the reply (a REQ socket that missed a reply cannot be reused, so each request
gets its own; on loopback a connect costs a fraction of a millisecond).

Bounds on what a peer sends (``settings.LimitsSettings``): a receiver's socket refuses message parts
over ``max_message_bytes`` inside ZeroMQ (``ZMQ_MAXMSGSIZE``: the peer is disconnected, nothing is
allocated); headers are checked against ``HeaderLimits`` before they are parsed; a receiver given
``cameras`` rejects a message of any other camera (reason ``camera_id``, one counter however many ids
are invented), so no table here grows with what a peer chooses to send. ``ReceiverSet`` reads one
receiver per sender, so that a camera's frames are accepted only on that camera's endpoint.

Sockets are not thread-safe: use a sender or receiver from one thread.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import zmq
from pydantic import ValidationError

from stream_service.errors import ConfigError, MessageError, RateLimitedLog, TransportError
from stream_service.wire.messages import (
    Array,
    ArraySpec,
    CameraStatus,
    FeaturesHeader,
    FrameHeader,
    Header,
    HeaderLimits,
    Message,
    Part,
    Verdict,
    decode,
    decode_header,
    encode,
    payload_views,
    rejection_reason,
)
from stream_service.wire.shm_ring import RING_NAME, Reservation, RingReader, ShmDescriptor, ShmRing

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SocketKind = Literal["push", "pull", "pub", "sub", "req", "rep"]
_ZMQ_TYPES = {"push": zmq.PUSH, "pull": zmq.PULL, "pub": zmq.PUB, "sub": zmq.SUB, "req": zmq.REQ, "rep": zmq.REP}
Socket = zmq.Socket[bytes]

SHM_MARKER = b"\x00shm1"
_MAX_OPEN_RINGS = 8
# How long a sender with a send timeout sleeps between looks for a free slot.
_RING_WAIT_S = 100e-6
# A descriptor is a ring name, three numbers and a few offsets: a few hundred bytes at most.
_MAX_DESCRIPTOR_BYTES = 4096


def context() -> zmq.Context[Socket]:
    """The process-wide ZeroMQ context (one I/O thread; pyzmq makes a fresh one after fork)."""
    return zmq.Context.instance()


def terminate_context() -> None:
    """Close the process-wide context: blocks until every closed socket has sent what it queued (its linger).

    Call it last in a process that sent with ``copy=False``: ZeroMQ reads the arrays' memory until the
    messages are out, so the interpreter must not tear the arrays down before.
    """
    stop_authenticator()
    zmq.Context.instance().term()


# -- CURVE: every tcp hop authenticated and encrypted ------------------------------------------------------
SERVER_KEY, CLIENT_KEY, AUTHORIZED = "server", "client", "authorized"


@dataclass(frozen=True)
class CurveKeys:
    """A pipeline's CURVE keys, from a folder that ``generate_keys`` made.

    Every socket that binds a tcp endpoint is a CURVE server with the pipeline's server key pair and admits
    only the client public keys in ``authorized/`` (ZAP); every socket that connects pins the server's
    public key and presents a client key pair. ``server.key_secret`` may be absent on a host that only
    connects (a subscriber's machine).
    """

    server_public: bytes
    server_secret: bytes | None
    client_public: bytes
    client_secret: bytes
    authorized: Path

    @classmethod
    def load(cls, directory: Path) -> CurveKeys:
        """Read the keys of ``directory``; ``ConfigError`` naming the file that is missing or unreadable."""
        import zmq.auth

        def pair(name: str, secret: bool) -> tuple[bytes, bytes | None]:
            path = directory / (f"{name}.key_secret" if secret else f"{name}.key")
            if not path.is_file():
                if secret and name == SERVER_KEY:
                    return cls._public(directory / f"{name}.key"), None
                raise ConfigError(
                    f"security.keys: expected {path} (stream-service keys generate {directory}), found none"
                )
            try:
                public, secret_key = zmq.auth.load_certificate(str(path))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"security.keys: expected a CURVE key in {path}, found {exc}") from exc
            return public, secret_key

        server_public, server_secret = pair(SERVER_KEY, True)
        client_public, client_secret = pair(CLIENT_KEY, True)
        if client_secret is None:
            raise ConfigError(f"security.keys: expected a secret key in {directory / 'client.key_secret'}, found none")
        authorized = directory / AUTHORIZED
        if not authorized.is_dir():
            raise ConfigError(f"security.keys: expected the folder {authorized} of admitted public keys, found none")
        return cls(server_public, server_secret, client_public, client_secret, authorized)

    @staticmethod
    def _public(path: Path) -> bytes:
        import zmq.auth

        if not path.is_file():
            raise ConfigError(f"security.keys: expected {path} (the server's public key), found none")
        public, _ = zmq.auth.load_certificate(str(path))
        return public


def generate_keys(directory: Path) -> list[Path]:
    """A new key folder: the server and the client key pairs (secret files 0600), and ``authorized/`` with
    the client's public key; the folder is 0700. Refuses to overwrite existing keys."""
    import zmq.auth

    if (directory / f"{SERVER_KEY}.key_secret").exists():
        raise ConfigError(f"keys folder: expected one without keys, found {directory / 'server.key_secret'}")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    made = []
    for name in (SERVER_KEY, CLIENT_KEY):
        public, secret = zmq.auth.create_certificates(str(directory), name)
        os.chmod(secret, 0o600)
        made += [Path(public), Path(secret)]
    authorized = directory / AUTHORIZED
    authorized.mkdir(mode=0o700, exist_ok=True)
    shutil.copyfile(directory / f"{CLIENT_KEY}.key", authorized / f"{CLIENT_KEY}.key")
    return [*made, authorized / f"{CLIENT_KEY}.key"]


_curve: CurveKeys | None = None
_authenticator: Any = None
_admitting: Path | None = None  # the authorized/ folder the authenticator reads


def use_curve(keys: CurveKeys | None) -> None:
    """CURVE for every tcp socket this process opens from now on (None: plaintext)."""
    global _curve
    _curve = keys


def _secure(sock: Socket, endpoint: str, bind: bool, ctx: zmq.Context[Socket]) -> None:
    if _curve is None or not endpoint.startswith("tcp://"):
        return  # ipc:// stays on this host: its socket file is owner-only
    if bind:
        if _curve.server_secret is None:
            raise ConfigError(
                f"security.keys: expected server.key_secret to bind {endpoint} as a CURVE server, found none"
            )
        _start_authenticator(ctx, _curve.authorized)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, _curve.server_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, _curve.server_secret)
    else:
        sock.setsockopt(zmq.CURVE_SERVERKEY, _curve.server_public)  # pinned: an impostor cannot answer
        sock.setsockopt(zmq.CURVE_PUBLICKEY, _curve.client_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, _curve.client_secret)


def _start_authenticator(ctx: zmq.Context[Socket], authorized: Path) -> None:
    """The ZAP handler of this process (one thread): admits the CURVE clients whose public key is in ``authorized``."""
    global _authenticator, _admitting
    if _authenticator is None:
        from zmq.auth.thread import ThreadAuthenticator

        _authenticator = ThreadAuthenticator(ctx, log=logging.getLogger("stream_service.wire.zap"))
        _authenticator.start()
    if _admitting != authorized:
        _authenticator.configure_curve(domain="*", location=str(authorized))
        _admitting = authorized


def stop_authenticator() -> None:
    global _authenticator, _admitting
    if _authenticator is not None:
        _authenticator.stop()
        _authenticator, _admitting = None, None


def open_socket(
    kind: SocketKind,
    endpoint: str,
    *,
    bind: bool,
    hwm: int,
    linger_ms: int,
    topics: Sequence[str] = (),
    max_message_bytes: int = -1,
    ctx: zmq.Context[Socket] | None = None,
) -> Socket:
    """A socket of ``kind`` bound or connected to ``endpoint`` with high-water mark ``hwm`` (messages).

    ``tcp://127.0.0.1:*`` binds a free port (see ``endpoint_of``). A SUB socket subscribes to each topic
    prefix in ``topics`` (``verdicts.cam0``), or to everything when there are none. ``max_message_bytes``
    (``ZMQ_MAXMSGSIZE``, -1: none): a peer that sends a larger message part is disconnected by ZeroMQ
    before the part is taken into memory (set before the bind: a listener copies the options it has then).
    """
    op = "bind" if bind else "connect"
    sock = (ctx or context()).socket(_ZMQ_TYPES[kind])
    try:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        if kind == "sub":
            for topic in topics or ("",):
                sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        _secure(sock, endpoint, bind, ctx or context())
        (sock.bind if bind else sock.connect)(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise TransportError(f"{op} {kind} socket to {endpoint}: expected success, found {exc}") from exc
    return sock


def bind(kind: SocketKind, endpoint: str, *, hwm: int, linger_ms: int, topics: Sequence[str] = ()) -> Socket:
    """``open_socket(..., bind=True)``."""
    return open_socket(kind, endpoint, bind=True, hwm=hwm, linger_ms=linger_ms, topics=topics)


def connect(kind: SocketKind, endpoint: str, *, hwm: int, linger_ms: int, topics: Sequence[str] = ()) -> Socket:
    """``open_socket(..., bind=False)``."""
    return open_socket(kind, endpoint, bind=False, hwm=hwm, linger_ms=linger_ms, topics=topics)


def endpoint_in_use(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be bound on this host because something already listens there (another
    pipeline), or None. Probed with a plain OS socket that is closed at once: a listener there is not
    disturbed. Addresses of other hosts, and ports only in TIME_WAIT, are not "in use"."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if not os.path.exists(path):
            return None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                return None  # a stale file: ZeroMQ binds over it
        return f"something listens on {path}"
    match = re.match(r"^tcp://(\[[^\]]+\]|[^:]+):(\d+)$", endpoint)
    if match is None:
        return None
    host, port = match.group(1).strip("[]"), int(match.group(2))
    host = "0.0.0.0" if host == "*" else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds: TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as exc:
            return f"port {port} is taken ({exc.strerror})" if exc.errno == errno.EADDRINUSE else None
    return None


def endpoint_of(sock: Socket) -> str:
    """The endpoint the socket last bound or connected to, with the real port of a ``:*`` bind."""
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    return value.decode() if isinstance(value, bytes) else str(value)


def _with_dropped(header: Header, extra: int) -> Header:
    if extra and isinstance(header, FrameHeader | FeaturesHeader | Verdict):
        return header.model_copy(update={"dropped": header.dropped + extra})
    return header


def _carries_drops(header: Header) -> bool:
    """Whether ``header`` has a ``dropped`` count that earlier losses of its camera can be added to (a
    status or a highlight has none: the count waits for the camera's next frame, features or verdict)."""
    return isinstance(header, FrameHeader | FeaturesHeader | Verdict)


def _dropped_in(header: Header) -> int:
    return header.dropped if isinstance(header, FrameHeader | FeaturesHeader | Verdict) else 0


def _same_arrays(arrays: Sequence[Array | Part], reserved: list[Array]) -> bool:
    return len(arrays) == len(reserved) and all(a is r for a, r in zip(arrays, reserved, strict=True))


class FrameSender:
    """Sends messages on a PUSH (default) or PUB socket; see the module docstring for the drop policy.

    ``send_timeout_ms``: 0 never blocks (capture), -1 blocks until queued, > 0 waits that long; a message
    that cannot be queued in time is dropped and counted. ``shm_slots > 0`` (PUSH only) sends payloads
    through a shared-memory ring of that many slots of ``shm_slot_bytes`` (same host only).
    ZeroMQ reads the arrays after ``send`` returns: do not modify them afterwards.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        hwm: int,
        linger_ms: int,
        kind: Literal["push", "pub"] = "push",
        bind: bool = True,
        send_timeout_ms: int = 0,
        shm_slots: int = 0,
        shm_slot_bytes: int = 0,
        shm_lease_timeout_s: float = 10.0,
        ctx: zmq.Context[Socket] | None = None,
    ) -> None:
        if shm_slots and kind != "push":
            raise ConfigError(f"shm_slots: expected 0 for a {kind} socket (one lease per slot), found {shm_slots}")
        self._ring = ShmRing(shm_slots, shm_slot_bytes, shm_lease_timeout_s) if shm_slots else None
        self._sock = open_socket(kind, endpoint, bind=bind, hwm=hwm, linger_ms=linger_ms, ctx=ctx)
        self._timeout_ms = send_timeout_ms
        if send_timeout_ms != 0:
            self._sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        self.endpoint = endpoint_of(self._sock)
        self._reservation: tuple[Reservation, list[Array]] | None = None
        self._carry: Counter[str] = Counter()
        self.sent = 0
        self.sent_in_place = 0  # messages whose payloads were written into a reserved slot, never copied
        self.dropped: Counter[str] = Counter()

    def attach_ring(self, shm_slots: int, shm_slot_bytes: int, shm_lease_timeout_s: float = 10.0) -> None:
        """Give an open push sender its shared-memory ring now, sized once the first payloads are known
        (messages sent before went over ZeroMQ alone; they had no payload to carry)."""
        if self._ring is not None:
            raise ConfigError("shm_slots: expected a sender without a ring to attach one to, found one attached")
        self._ring = ShmRing(shm_slots, shm_slot_bytes, shm_lease_timeout_s)

    @property
    def ring_reclaimed(self) -> int:
        """Slots taken back from receivers that held them past the lease timeout."""
        return self._ring.reclaimed if self._ring is not None else 0

    def fits(self, specs: Sequence[ArraySpec]) -> bool:
        """Whether payloads shaped as ``specs`` fit one slot of this sender's ring (False without a ring)."""
        return self._ring is not None and self._ring.fits([spec.nbytes for spec in specs])

    def reserve(self, specs: Sequence[ArraySpec]) -> list[Array] | None:
        """Writable arrays in a free ring slot, shaped as ``specs``, for the capture to fill in place.

        The capture writes the pixels once, straight into shared memory (``cv2.VideoCapture.read(image=
        arrays[0])``), and ``send`` with these very arrays moves only the descriptor; after ``send`` they
        are read-only. ``None`` when no slot frees up within the send timeout: capture into a private
        array and ``send`` that (copied into a slot, or dropped and counted). Another ``reserve`` gives
        back a reservation that was not sent.
        """
        if self._ring is None:
            raise ConfigError("shm_slots: expected > 0 for reserve(), found 0")
        self._abandon_reservation()
        sizes = [spec.nbytes for spec in specs]
        if not self._ring.fits(sizes):
            raise ConfigError(f"shm_slot_bytes: expected room for {sum(sizes)} payload bytes, found less")
        reservation = self._wait_for_slot(lambda ring: ring.acquire(sizes))
        if reservation is None:
            return None
        arrays = [v.view(spec.dtype).reshape(spec.shape) for v, spec in zip(reservation.views, specs, strict=True)]
        self._reservation = (reservation, arrays)
        return arrays

    def send(self, topic: str, header: Header, arrays: Sequence[Array | Part] = ()) -> bool:
        """Queue one message; ``False`` when it was dropped (queue or ring full past the send timeout)."""
        camera = header.camera_id
        carry = self._carry.pop(camera, 0) if _carries_drops(header) else 0
        parts = encode(topic, _with_dropped(header, carry), arrays)
        desc, in_place = None, False
        if self._reservation is not None and _same_arrays(arrays, self._reservation[1]):
            reservation, reserved = self._reservation
            self._reservation = None
            desc, in_place = self._ring_or_fail().commit(reservation), True
            for array in reserved:
                array.flags.writeable = False
        elif self._ring is not None and len(parts) > 2:
            payloads = [p if isinstance(p, memoryview) else memoryview(p) for p in parts[2:]]
            if self._ring.fits([p.nbytes for p in payloads]):
                desc = self._wait_for_slot(lambda ring: ring.write(payloads))
                if desc is None:
                    return self._drop(camera, carry, header)
        if desc is not None:
            parts = [topic.encode() + SHM_MARKER, parts[1], desc.model_dump_json().encode()]
        try:
            self._sock.send_multipart(parts, flags=zmq.NOBLOCK if self._timeout_ms == 0 else 0, copy=False)
        except zmq.Again:
            if desc is not None:
                self._ring_or_fail().cancel(desc)
            return self._drop(camera, carry, header)
        except zmq.ZMQError as exc:
            raise TransportError(f"send to {self.endpoint}: expected the message queued, found {exc}") from exc
        self.sent += 1
        self.sent_in_place += in_place
        return True

    def _ring_or_fail(self) -> ShmRing:
        if self._ring is None:
            raise ConfigError("shm_slots: expected > 0, found 0")
        return self._ring

    def _wait_for_slot(self, attempt: Callable[[ShmRing], _T | None]) -> _T | None:
        ring = self._ring_or_fail()
        deadline = None if self._timeout_ms < 0 else time.monotonic() + self._timeout_ms / 1000
        while (result := attempt(ring)) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(_RING_WAIT_S)
        return result

    def _abandon_reservation(self) -> None:
        if self._reservation is not None:
            self._ring_or_fail().abandon(self._reservation[0])
            self._reservation = None

    def _drop(self, camera: str, carry: int, header: Header) -> bool:
        if _carries_drops(header):  # a lost status or highlight is no lost frame: nothing to report downstream
            self._carry[camera] = carry + 1 + _dropped_in(header)
        self.dropped[camera] += 1
        return False

    def close(self) -> None:
        """Close the socket (lingering ``linger_ms`` for queued messages) and unlink the ring."""
        self._abandon_reservation()
        self._sock.close()
        if self._ring is not None:
            self._ring.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FrameReceiver:
    """Receives messages on a PULL (default) or SUB socket, inline or through a shared-memory ring.

    ``endpoint``: one endpoint, or several to connect to (messages from all of them, fair-queued).

    ``max_drain``: how many extra queued messages one ``receive`` may take to keep only the newest per
    camera (0: deliver every message in order). ``shm_copy``: copy ring payloads out instead of leasing
    the slot (for stages that keep frames longer than the sender's lease timeout).

    Bounds (see the module docstring): ``max_message_bytes`` per message part (-1: none), ``limits`` on
    headers, ``cameras`` the only camera ids accepted (None: any). Rejections are logged at most once
    per reason every ``log_every_s`` (None: not logged here, the caller logs what ``receive`` raises).
    """

    def __init__(
        self,
        endpoint: str | Sequence[str],
        *,
        hwm: int,
        linger_ms: int,
        kind: Literal["pull", "sub"] = "pull",
        bind: bool = False,
        topics: Sequence[str] = (),
        max_drain: int = 0,
        shm_copy: bool = False,
        ctx: zmq.Context[Socket] | None = None,
        max_message_bytes: int = -1,
        limits: HeaderLimits = HeaderLimits(),  # noqa: B008 (frozen)
        cameras: Collection[str] | None = None,
        log_every_s: float | None = 10.0,
    ) -> None:
        endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        if not endpoints or (bind and len(endpoints) > 1):
            raise ConfigError(f"receiver endpoints: expected one to bind or >= 1 to connect, found {endpoints}")
        self._sock = open_socket(
            kind,
            endpoints[0],
            bind=bind,
            hwm=hwm,
            linger_ms=linger_ms,
            topics=topics,
            ctx=ctx,
            max_message_bytes=max_message_bytes,
        )
        # One socket connected to several senders (a soartc worker to every capture): ZeroMQ fair-queues them.
        for extra in endpoints[1:]:
            try:
                self._sock.connect(extra)
            except zmq.ZMQError as exc:
                self._sock.close(linger=0)
                raise TransportError(f"connect {kind} socket to {extra}: expected success, found {exc}") from exc
        self.endpoint = endpoint_of(self._sock)
        self._max_drain = max_drain
        self._shm_copy = shm_copy
        self._limits = limits
        self._cameras = frozenset(cameras) if cameras is not None else None
        self._log = RateLimitedLog(log, log_every_s) if log_every_s is not None else None
        # camera -> (topic, header, arrays or shm descriptor): the newest message per camera, oldest camera first.
        # The newest message per (camera, is-a-status): a camera's status never stands in for its frames.
        self._ready: dict[tuple[str, bool], tuple[str, Header, list[Array] | ShmDescriptor]] = {}
        self._errors: deque[MessageError] = deque()
        self._rings: dict[str, RingReader] = {}
        self._carry: Counter[str] = Counter()
        self.received = 0
        self.dropped: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.ring_counts: Counter[str] = Counter()

    def receive(self, timeout_s: float) -> Message | None:
        """The next message, or ``None`` when none arrived within ``timeout_s``.

        Raises ``MessageError`` for a malformed message (already counted in ``rejected``); the next call
        goes on with the following messages. A flood of malformed messages does not hold back the good
        ones between them: a drain stops at the first malformed message, and messages drained before it
        are delivered before it is raised.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            # Read first and poll only when nothing is queued: a busy stream costs no poll call.
            if not self._errors:
                self._drain()
            while self._ready:
                key = next(iter(self._ready))
                try:
                    message = self._materialize(*self._ready.pop(key))
                except MessageError as exc:
                    self._count_rejection(exc)
                    raise
                if message is not None:
                    self.received += 1
                    return message
            if self._errors:
                raise self._errors.popleft()
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._poll(remaining_ms):
                return None

    def _poll(self, timeout_ms: int) -> bool:
        try:
            return bool(self._sock.poll(timeout_ms, zmq.POLLIN))
        except zmq.ZMQError as exc:
            raise TransportError(f"poll {self.endpoint}: expected a readable socket, found {exc}") from exc

    def _drain(self) -> None:
        for _ in range(1 + self._max_drain):
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                raise TransportError(f"receive from {self.endpoint}: expected a message, found {exc}") from exc
            try:
                topic, header, body = self._parse([f.buffer for f in frames], self._limits)
                camera = header.camera_id
                if self._cameras is not None and camera not in self._cameras:
                    if isinstance(body, ShmDescriptor):
                        self._give_back(body)
                    raise MessageError(
                        f"camera_id: expected one of {sorted(self._cameras)} on {self.endpoint}, found {camera!r}"
                    )
            except MessageError as exc:
                self._count_rejection(exc)
                self._errors.append(exc)
                return  # one at a time: a flood of bad messages never piles up here
            key = (camera, isinstance(header, CameraStatus))
            skipped = self._ready.get(key)
            if skipped is not None:
                if not key[1]:  # a newer status replaces an older one: no frame was lost
                    self.dropped[camera] += 1
                    header = _with_dropped(header, 1 + _dropped_in(skipped[1]))
                if isinstance(skipped[2], ShmDescriptor):
                    self._give_back(skipped[2])
            self._ready[key] = (topic, header, body)

    def _give_back(self, desc: ShmDescriptor) -> None:
        try:
            self._ring(desc.ring).release(desc)
        except MessageError as exc:
            log.debug("skipped shm message of a ring that is gone: %s", exc)

    def _count_rejection(self, exc: MessageError) -> None:
        reason = rejection_reason(exc)
        self.rejected[reason] += 1
        if self._log is not None:
            self._log.warning(reason, "rejected a message on %s: %s", self.endpoint, exc)

    @staticmethod
    def _parse(
        parts: Sequence[Part],
        limits: HeaderLimits = HeaderLimits(),  # noqa: B008 (frozen)
    ) -> tuple[str, Header, list[Array] | ShmDescriptor]:
        """Decode received parts (inline or an shm descriptor); raises ``MessageError`` only."""
        if len(parts) >= 1 and bytes(memoryview(parts[0])[-len(SHM_MARKER) :]) == SHM_MARKER:
            if len(parts) != 3:
                raise MessageError(f"part count: expected 3 for an shm message, found {len(parts)}")
            raw = bytes(parts[2])
            if len(raw) > _MAX_DESCRIPTOR_BYTES:
                raise MessageError(f"shm descriptor: expected at most {_MAX_DESCRIPTOR_BYTES} bytes, found {len(raw)}")
            try:
                topic = bytes(memoryview(parts[0])[: -len(SHM_MARKER)]).decode()
                desc = ShmDescriptor.model_validate_json(raw)
            except (UnicodeDecodeError, ValidationError) as exc:
                raise MessageError(f"shm descriptor: expected a valid descriptor, found {str(exc)[:200]}") from exc
            if not RING_NAME.match(desc.ring):
                raise MessageError(f"shm descriptor: expected a ring name {RING_NAME.pattern}, found {desc.ring!r}")
            return topic, decode_header(parts[1], limits), desc
        return decode(parts, limits)

    def _materialize(self, topic: str, header: Header, body: list[Array] | ShmDescriptor) -> Message | None:
        camera = header.camera_id
        if isinstance(body, ShmDescriptor):
            ring = self._ring(body.ring)
            sizes = [spec.nbytes for spec in header.array_specs()]
            payloads = ring.copy(body, sizes) if self._shm_copy else ring.lease(body, sizes)
            if payloads is None:
                self.ring_counts["overwritten"] += 1
                self.dropped[camera] += 1
                self._carry[camera] += 1 + _dropped_in(header)
                return None
            body = payload_views(header, payloads)
        carry = self._carry.pop(camera, 0) if _carries_drops(header) else 0
        return Message(topic, _with_dropped(header, carry), body)

    def _ring(self, name: str) -> RingReader:
        reader = self._rings.get(name)
        if reader is None:
            if len(self._rings) >= _MAX_OPEN_RINGS:
                self._rings.pop(next(iter(self._rings))).close()
            reader = self._rings[name] = RingReader(name, self.ring_counts)
        return reader

    def close(self) -> None:
        """Close the socket and the ring mappings (those still viewed by live arrays stay until freed)."""
        self._sock.close()
        for reader in self._rings.values():
            reader.close()
        self._rings.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReplyServer:
    """A REP socket bound to ``endpoint`` that answers every request with ``handler(request_bytes)``.

    A request of more than ``max_request_bytes`` is refused unread (ZeroMQ drops the peer); a request of
    several parts gets ``malformed(text)`` as its answer. ``handler`` must not raise: it turns its errors
    into a reply. ``start`` serves in a daemon thread until ``stop``; ``close`` joins it.
    """

    def __init__(
        self,
        endpoint: str,
        handler: Callable[[bytes], bytes],
        malformed: Callable[[str], bytes],
        *,
        max_request_bytes: int,
        linger_ms: int,
        poll_ms: int,
        ctx: zmq.Context[Socket] | None = None,
    ) -> None:
        self._sock = open_socket(
            "rep", endpoint, bind=True, hwm=1, linger_ms=linger_ms, max_message_bytes=max_request_bytes, ctx=ctx
        )
        self.endpoint = endpoint_of(self._sock)
        self._handler, self._malformed, self._poll_ms = handler, malformed, poll_ms
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.served = 0

    def start(self) -> None:
        """Serve in a thread of its own (the socket is used by that thread only from now on)."""
        self._thread = threading.Thread(target=self._serve, name=f"reply {self.endpoint}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._sock.poll(self._poll_ms, zmq.POLLIN):
                    continue
                parts = self._sock.recv_multipart()
                if len(parts) != 1:
                    reply = self._malformed(f"replay request: expected 1 part, found {len(parts)}")
                else:
                    reply = self._handler(parts[0])
                self._sock.send(reply)
                self.served += 1
        except zmq.ZMQError as exc:
            log.error("reply socket %s stopped: %s", self.endpoint, exc)
        finally:
            self._sock.close()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving and close the socket (waits up to ``timeout_s`` for the thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        else:
            self._sock.close()


def request(endpoint: str, body: bytes, *, timeout_ms: int, ctx: zmq.Context[Socket] | None = None) -> bytes:
    """Send ``body`` to the REP socket at ``endpoint`` and return its reply.

    Raises ``TransportError`` naming the endpoint when no reply comes within ``timeout_ms``.
    """
    sock = open_socket("req", endpoint, bind=False, hwm=1, linger_ms=0, ctx=ctx)
    try:
        sock.send(body)
        if not sock.poll(timeout_ms, zmq.POLLIN):
            raise TransportError(
                f"request to {endpoint}: expected a reply within {timeout_ms} ms, found none "
                "(is the infer stage running, and is the endpoint right?)"
            )
        return bytes(sock.recv())
    except zmq.ZMQError as exc:
        raise TransportError(f"request to {endpoint}: expected a reply, found {exc}") from exc
    finally:
        sock.close(linger=0)


class ReceiverSet:
    """Several ``FrameReceiver``s read as one ``Source``, taking turns.

    One receiver per sender: ZeroMQ does not say which of the peers of a socket sent a message, so a
    soartc worker has one PULL socket per capture endpoint, each accepting only its camera's id, and a
    frame for ``cam0`` arriving on ``cam1``'s endpoint is rejected (``camera_id``). The turn moves on at
    every call, so a flood on one endpoint (good or bad) never starves another.
    """

    def __init__(self, receivers: Sequence[FrameReceiver]) -> None:
        if not receivers:
            raise ConfigError("receiver set: expected at least one receiver, found none")
        self.receivers = list(receivers)
        self.endpoint = ",".join(r.endpoint for r in self.receivers)
        self._turn = 0
        self._poller = zmq.Poller()
        for receiver in self.receivers:
            self._poller.register(receiver._sock, zmq.POLLIN)

    def receive(self, timeout_s: float) -> Message | None:
        """The next message of any receiver, or ``None`` when none arrived within ``timeout_s``; raises the
        ``MessageError`` of a malformed one (counted by its receiver) like ``FrameReceiver.receive``."""
        deadline = time.monotonic() + timeout_s
        count = len(self.receivers)
        while True:
            for _ in range(count):
                receiver = self.receivers[self._turn]
                self._turn = (self._turn + 1) % count
                message = receiver.receive(0.0)
                if message is not None:
                    return message
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return None
            try:
                if not self._poller.poll(remaining_ms):
                    return None
            except zmq.ZMQError as exc:
                raise TransportError(f"poll {self.endpoint}: expected readable sockets, found {exc}") from exc

    @property
    def received(self) -> int:
        return sum(r.received for r in self.receivers)

    @property
    def dropped(self) -> Counter[str]:
        return sum((r.dropped for r in self.receivers), Counter())

    @property
    def rejected(self) -> Counter[str]:
        return sum((r.rejected for r in self.receivers), Counter())

    @property
    def ring_counts(self) -> Counter[str]:
        return sum((r.ring_counts for r in self.receivers), Counter())

    def close(self) -> None:
        for receiver in self.receivers:
            receiver.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
