"""ZeroMQ sockets and endpoints, and the shared-memory frame ring. The only module that imports ``zmq``.

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

Shared-memory ring (same-host PUSH/PULL hops, ``shm_slots > 0``): the sender owns a ring of
``shm_slots`` slots of ``shm_slot_bytes`` bytes in a file under ``/dev/shm``, copies each message's
payloads into a free slot and sends only a descriptor (ring name, slot, generation, offsets) over
ZeroMQ. Ownership and reuse:

- each slot has a generation (written by the sender only: odd while it writes, even when complete; the
  descriptor carries the even value) and a release word (written by the receiver holding the slot);
- a slot is the receiver's from the moment its descriptor is sent until the receiver writes the
  descriptor's generation into the release word: when the last array viewing the slot is freed (CPython
  frees it as soon as the stage and ZeroMQ, for a ``copy=False`` send of a view, are done with it), or
  at once for a descriptor the drain skipped;
- the sender only writes free slots; with none free the frame is dropped and counted (capture never
  blocks) or, with a send timeout, waits for one. A receiver that died holding slots cannot stall the
  ring: a slot leased for longer than ``shm_lease_timeout_s`` is reclaimed (counted and logged);
- the receiver checks the generation when it takes the slot, and again when it releases it: a moved
  generation means the slot was reclaimed, so the frame is dropped as overwritten (before use) or
  counted as overwritten in use (after). With ``shm_copy=True`` it instead copies the payloads out,
  releases the slot at once and re-checks the generation after the copy.

Arrays from the ring are read-only zero-copy views of the slot, like those of an inline message. The
store order the checks rely on is guaranteed on x86-64 (TSO); on weakly ordered CPUs they are best
effort. A message larger than a slot goes inline. PUB sockets do not take a ring: several subscribers
would share one lease. On the wire an shm message is ``[topic + SHM_MARKER, header, descriptor]``;
topics never contain NUL, so the marker cannot collide, and SUB prefix filters still match.

Sockets are not thread-safe: use a sender or receiver from one thread.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import tempfile
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self, TypeVar

import numpy as np
import numpy.typing as npt
import zmq
from pydantic import BaseModel, ConfigDict, NonNegativeInt, ValidationError

from stream_service.errors import ConfigError, MessageError, TransportError
from stream_service.messages import (
    Array,
    ArraySpec,
    FeaturesHeader,
    FrameHeader,
    Header,
    Message,
    Part,
    Verdict,
    decode,
    decode_header,
    encode,
    payload_views,
    rejection_reason,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SocketKind = Literal["push", "pull", "pub", "sub"]
_ZMQ_TYPES = {"push": zmq.PUSH, "pull": zmq.PULL, "pub": zmq.PUB, "sub": zmq.SUB}
Socket = zmq.Socket[bytes]

SHM_MARKER = b"\x00shm1"
_RING_MAGIC = b"SSRING01"
_RING_NAME = re.compile(r"^stream-service-ring-[0-9]+-[0-9a-f]+$")
_GENERATIONS_AT = 64
_PAGE = 4096
_ALIGN = 64
_MAX_OPEN_RINGS = 8
# Map every page up front: a first write or read of a slot must not pay thousands of page faults.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
# How long a sender with a send timeout sleeps between looks for a free slot.
_RING_WAIT_S = 100e-6


def context() -> zmq.Context[Socket]:
    """The process-wide ZeroMQ context (one I/O thread; pyzmq makes a fresh one after fork)."""
    return zmq.Context.instance()


def terminate_context() -> None:
    """Close the process-wide context: blocks until every closed socket has sent what it queued (its linger).

    Call it last in a process that sent with ``copy=False``: ZeroMQ reads the arrays' memory until the
    messages are out, so the interpreter must not tear the arrays down before.
    """
    zmq.Context.instance().term()


def open_socket(
    kind: SocketKind,
    endpoint: str,
    *,
    bind: bool,
    hwm: int,
    linger_ms: int,
    topics: Sequence[str] = (),
    ctx: zmq.Context[Socket] | None = None,
) -> Socket:
    """A socket of ``kind`` bound or connected to ``endpoint`` with high-water mark ``hwm`` (messages).

    ``tcp://127.0.0.1:*`` binds a free port (see ``endpoint_of``). A SUB socket subscribes to each topic
    prefix in ``topics`` (``verdicts.cam0``), or to everything when there are none.
    """
    op = "bind" if bind else "connect"
    sock = (ctx or context()).socket(_ZMQ_TYPES[kind])
    try:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, linger_ms)
        if kind == "sub":
            for topic in topics or ("",):
                sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
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


def endpoint_of(sock: Socket) -> str:
    """The endpoint the socket last bound or connected to, with the real port of a ``:*`` bind."""
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    return value.decode() if isinstance(value, bytes) else str(value)


def _with_dropped(header: Header, extra: int) -> Header:
    if extra and isinstance(header, FrameHeader | FeaturesHeader | Verdict):
        return header.model_copy(update={"dropped": header.dropped + extra})
    return header


def _dropped_in(header: Header) -> int:
    return header.dropped if isinstance(header, FrameHeader | FeaturesHeader | Verdict) else 0


def ring_directory() -> Path:
    """Where rings live: ``/dev/shm`` (RAM) where it exists, else the temporary directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


class ShmDescriptor(BaseModel):
    """Where a message's payloads lie: ring file name, slot index, the slot's generation, payload offsets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ring: str
    slot: NonNegativeInt
    generation: NonNegativeInt
    offsets: tuple[NonNegativeInt, ...]


class _Mapping:
    """A ring file mapped read-write, with its control words as uint64 views.

    Layout: magic, slot count, slot size, data offset; at byte 64 one generation per slot, then one
    release word per slot; the slots from the next page on, each a whole number of pages.
    """

    def __init__(self, mm: mmap.mmap, path: Path) -> None:
        self.mm, self.path = mm, path
        slots, self.slot_bytes, self.data_at = (int(v) for v in np.frombuffer(mm, np.uint64, 3, len(_RING_MAGIC)))
        self.slots = slots
        self.generations = np.frombuffer(mm, np.uint64, count=slots, offset=_GENERATIONS_AT)
        self.released = np.frombuffer(mm, np.uint64, count=slots, offset=_GENERATIONS_AT + 8 * slots)
        self.data = np.frombuffer(mm, np.uint8, count=slots * self.slot_bytes, offset=self.data_at)

    def close(self) -> None:
        del self.generations, self.released, self.data
        try:
            self.mm.close()
        except BufferError:
            # Arrays of messages still in use view the mapping; it is unmapped when the last one is freed.
            log.debug("ring %s still viewed by live arrays; unmapped when they are freed", self.path.name)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


class ShmRing:
    """The sender's ring of ``slots`` slots of at least ``slot_bytes`` bytes (see the module docstring)."""

    def __init__(self, slots: int, slot_bytes: int, lease_timeout_s: float, directory: Path | None = None) -> None:
        if slots < 2 or slot_bytes < 1 or lease_timeout_s < 0:
            raise ConfigError(
                f"shm ring: expected >= 2 slots of >= 1 byte and a lease timeout >= 0 s, "
                f"found {slots} x {slot_bytes} bytes, {lease_timeout_s} s"
            )
        slot_bytes = -(-slot_bytes // _PAGE) * _PAGE
        data_at = -(-(_GENERATIONS_AT + 16 * slots) // _PAGE) * _PAGE
        self.name = f"stream-service-ring-{os.getpid()}-{secrets.token_hex(6)}"
        path = (directory or ring_directory()) / self.name
        size = data_at + slots * slot_bytes
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size, flags=_MAP_FLAGS)
            finally:
                os.close(fd)
        except OSError as exc:
            raise TransportError(f"create shm ring {path}: expected {size} bytes of RAM, found {exc}") from exc
        # The file is unlinked on close, and also when the sender is garbage-collected or Python exits.
        self._unlinker = weakref.finalize(self, _unlink, path)
        np.frombuffer(mm, np.uint64, 3, len(_RING_MAGIC))[:] = (slots, slot_bytes, data_at)
        mm[: len(_RING_MAGIC)] = _RING_MAGIC
        self._map = _Mapping(mm, path)
        self._lease_ns = int(lease_timeout_s * 1e9)
        self._sent_ns = [0] * slots
        self._next = 0
        self.reclaimed = 0

    def fits(self, sizes: Sequence[int]) -> bool:
        """Whether payloads of ``sizes`` bytes fit in one slot."""
        return _layout(sizes)[1] <= self._map.slot_bytes

    def acquire(self, sizes: Sequence[int]) -> _Reservation | None:
        """A free slot, marked as being written, with writable byte views for payloads of ``sizes`` bytes.

        ``None`` when every slot is leased. ``sizes`` must ``fit``.
        """
        m = self._map
        slot = self._free_slot(time.monotonic_ns())
        if slot is None:
            return None
        offsets, _ = _layout(sizes)
        m.generations[slot] += np.uint64(1)  # odd: being written
        base = slot * m.slot_bytes
        views = [m.data[base + o : base + o + n] for o, n in zip(offsets, sizes, strict=True)]
        return _Reservation(slot, offsets, views)

    def commit(self, reservation: _Reservation) -> ShmDescriptor:
        """Mark the slot complete and leased from now on; its descriptor."""
        m, slot = self._map, reservation.slot
        m.generations[slot] += np.uint64(1)  # even: complete, leased until released
        self._sent_ns[slot] = time.monotonic_ns()
        return ShmDescriptor(
            ring=self.name, slot=slot, generation=int(m.generations[slot]), offsets=reservation.offsets
        )

    def abandon(self, reservation: _Reservation) -> None:
        """Free an acquired slot that will not be sent."""
        m, slot = self._map, reservation.slot
        m.generations[slot] += np.uint64(1)
        m.released[slot] = m.generations[slot]

    def write(self, payloads: Sequence[memoryview]) -> ShmDescriptor | None:
        """Copy ``payloads`` (byte views that fit) into a free slot; ``None`` when every slot is leased."""
        reservation = self.acquire([p.nbytes for p in payloads])
        if reservation is None:
            return None
        for view, payload in zip(reservation.views, payloads, strict=True):
            view[:] = np.frombuffer(payload, np.uint8)
        return self.commit(reservation)

    def cancel(self, desc: ShmDescriptor) -> None:
        """Free the slot of a committed descriptor that was never sent."""
        self._map.released[desc.slot] = desc.generation

    def _free_slot(self, now_ns: int) -> int | None:
        m = self._map
        for k in range(m.slots):
            slot = (self._next + k) % m.slots
            if m.released[slot] == m.generations[slot]:
                self._next = (slot + 1) % m.slots
                return slot
        # Every slot is leased: reclaim the oldest expired lease (its receiver is presumably dead). A slot
        # being written (odd generation, a pending reservation) is never reclaimed.
        leased = [slot for slot in range(m.slots) if int(m.generations[slot]) % 2 == 0]
        oldest = min(leased, key=self._sent_ns.__getitem__, default=None)
        if oldest is not None and now_ns - self._sent_ns[oldest] >= self._lease_ns:
            self.reclaimed += 1
            log.warning("ring %s: reclaimed slot %d, leased for over %.3f s", self.name, oldest, self._lease_ns / 1e9)
            self._next = (oldest + 1) % m.slots
            return oldest
        return None

    def close(self) -> None:
        """Unlink the ring; receivers keep their mappings until they drop them."""
        self._map.close()
        self._unlinker()


def _layout(sizes: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """Offsets of payloads of ``sizes`` bytes packed at ``_ALIGN``-byte boundaries, and the bytes they span."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end = -(-(end + size) // _ALIGN) * _ALIGN
    return tuple(offsets), end


@dataclass(frozen=True)
class _Reservation:
    slot: int
    offsets: tuple[int, ...]
    views: list[npt.NDArray[np.uint8]]


def _release(generations: np.ndarray, released: np.ndarray, slot: int, generation: int, counts: Counter[str]) -> None:
    if int(generations[slot]) != generation:
        counts["overwritten_in_use"] += 1
        log.warning("shm slot %d was reclaimed while its arrays were in use (lease timeout too short?)", slot)
        return
    released[slot] = generation


class _RingReader:
    """A receiver's mapping of one sender's ring: leases slots as zero-copy views, or copies them out."""

    def __init__(self, name: str, counts: Counter[str]) -> None:
        path = ring_directory() / name
        try:
            with path.open("r+b") as file:
                mm = mmap.mmap(file.fileno(), 0, flags=_MAP_FLAGS)
        except (OSError, ValueError) as exc:
            raise MessageError(f"shm ring: expected a ring at {path}, found {type(exc).__name__}: {exc}") from exc
        if len(mm) < _PAGE or mm[: len(_RING_MAGIC)] != _RING_MAGIC:
            mm.close()
            raise MessageError(f"shm ring: expected magic {_RING_MAGIC!r} in {path}, found another file")
        try:
            self._map = _Mapping(mm, path)
        except ValueError as exc:  # control words that do not fit the file
            mm.close()
            raise MessageError(f"shm ring: expected a consistent ring header in {path}, found {exc}") from exc
        self._counts = counts

    def _check(self, desc: ShmDescriptor, sizes: Sequence[int]) -> int:
        m = self._map
        end = max((o + n for o, n in zip(desc.offsets, sizes, strict=False)), default=0)
        if desc.slot >= m.slots or len(desc.offsets) != len(sizes) or end > m.slot_bytes:
            raise MessageError(
                f"shm descriptor: expected slot < {m.slots} and {len(sizes)} offsets within {m.slot_bytes} bytes, "
                f"found slot {desc.slot} and {len(desc.offsets)} offsets ending at {end}"
            )
        return end

    def lease(self, desc: ShmDescriptor, sizes: Sequence[int]) -> list[memoryview] | None:
        """Read-only views of the payloads, the slot released when they are freed; ``None`` if overwritten."""
        end = self._check(desc, sizes)
        m = self._map
        if int(m.generations[desc.slot]) != desc.generation:
            return None
        # A fresh array over the mmap (not a view of ``m.data``): NumPy then makes every view of it keep
        # *it* alive, so its finalizer runs only when the last array viewing the slot is gone.
        root = np.frombuffer(m.mm, np.uint8, count=end, offset=m.data_at + desc.slot * m.slot_bytes)
        root.flags.writeable = False
        weakref.finalize(root, _release, m.generations, m.released, desc.slot, desc.generation, self._counts)
        return [root[o : o + n].data for o, n in zip(desc.offsets, sizes, strict=True)]

    def copy(self, desc: ShmDescriptor, sizes: Sequence[int]) -> list[memoryview] | None:
        """Private copies of the payloads, the slot released at once; ``None`` if it was overwritten."""
        end = self._check(desc, sizes)
        m = self._map
        base = desc.slot * m.slot_bytes
        if int(m.generations[desc.slot]) != desc.generation:
            return None
        copy = m.data[base : base + end].copy()
        if int(m.generations[desc.slot]) != desc.generation:
            return None
        m.released[desc.slot] = desc.generation
        return [copy[o : o + n].data for o, n in zip(desc.offsets, sizes, strict=True)]

    def release(self, desc: ShmDescriptor) -> None:
        """Give back the slot of a descriptor that will not be used (skipped by the drain)."""
        m = self._map
        if desc.slot < m.slots and int(m.generations[desc.slot]) == desc.generation:
            m.released[desc.slot] = desc.generation

    def close(self) -> None:
        self._map.close()


def remove_stale_rings(directory: Path | None = None) -> list[Path]:
    """Unlink ring files whose creating process is gone (a sender killed before it could clean up)."""
    removed = []
    for path in (directory or ring_directory()).glob("stream-service-ring-*"):
        if not _RING_NAME.match(path.name):
            continue
        pid = int(path.name.split("-")[3])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path)
        except PermissionError:
            continue  # alive, another user's
    return removed


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
        self._reservation: tuple[_Reservation, list[Array]] | None = None
        self._carry: Counter[str] = Counter()
        self.sent = 0
        self.dropped: Counter[str] = Counter()

    @property
    def ring_reclaimed(self) -> int:
        """Slots taken back from receivers that held them past the lease timeout."""
        return self._ring.reclaimed if self._ring is not None else 0

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
        carry = self._carry.pop(camera, 0)
        parts = encode(topic, _with_dropped(header, carry), arrays)
        desc = None
        if self._reservation is not None and _same_arrays(arrays, self._reservation[1]):
            reservation, reserved = self._reservation
            self._reservation = None
            desc = self._ring_or_fail().commit(reservation)
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
    ) -> None:
        endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        if not endpoints or (bind and len(endpoints) > 1):
            raise ConfigError(f"receiver endpoints: expected one to bind or >= 1 to connect, found {endpoints}")
        self._sock = open_socket(kind, endpoints[0], bind=bind, hwm=hwm, linger_ms=linger_ms, topics=topics, ctx=ctx)
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
        # camera -> (topic, header, arrays or shm descriptor): the newest message per camera, oldest camera first.
        self._ready: dict[str, tuple[str, Header, list[Array] | ShmDescriptor]] = {}
        self._errors: deque[MessageError] = deque()
        self._rings: dict[str, _RingReader] = {}
        self._carry: Counter[str] = Counter()
        self.received = 0
        self.dropped: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.ring_counts: Counter[str] = Counter()

    def receive(self, timeout_s: float) -> Message | None:
        """The next message, or ``None`` when none arrived within ``timeout_s``.

        Raises ``MessageError`` for a malformed message (already counted in ``rejected``); the next call
        goes on with the following messages.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            # Read first and poll only when nothing is queued: a busy stream costs no poll call.
            self._drain()
            if self._errors:
                raise self._errors.popleft()
            while self._ready:
                camera = next(iter(self._ready))
                try:
                    message = self._materialize(*self._ready.pop(camera))
                except MessageError as exc:
                    self._count_rejection(exc)
                    raise
                if message is not None:
                    self.received += 1
                    return message
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
                topic, header, body = self._parse([f.buffer for f in frames])
            except MessageError as exc:
                self._count_rejection(exc)
                self._errors.append(exc)
                continue
            camera = header.camera_id
            skipped = self._ready.get(camera)
            if skipped is not None:
                self.dropped[camera] += 1
                header = _with_dropped(header, 1 + _dropped_in(skipped[1]))
                if isinstance(skipped[2], ShmDescriptor):
                    self._give_back(skipped[2])
            self._ready[camera] = (topic, header, body)

    def _give_back(self, desc: ShmDescriptor) -> None:
        try:
            self._ring(desc.ring).release(desc)
        except MessageError as exc:
            log.debug("skipped shm message of a ring that is gone: %s", exc)

    def _count_rejection(self, exc: MessageError) -> None:
        self.rejected[rejection_reason(exc)] += 1
        log.warning("rejected a message on %s: %s", self.endpoint, exc)

    @staticmethod
    def _parse(parts: list[memoryview]) -> tuple[str, Header, list[Array] | ShmDescriptor]:
        if len(parts) >= 1 and bytes(parts[0][-len(SHM_MARKER) :]) == SHM_MARKER:
            if len(parts) != 3:
                raise MessageError(f"part count: expected 3 for an shm message, found {len(parts)}")
            try:
                topic = bytes(parts[0][: -len(SHM_MARKER)]).decode()
                desc = ShmDescriptor.model_validate_json(bytes(parts[2]))
            except (UnicodeDecodeError, ValidationError) as exc:
                raise MessageError(f"shm descriptor: expected a valid descriptor, found {exc}") from exc
            if not _RING_NAME.match(desc.ring):
                raise MessageError(f"shm descriptor: expected a ring name {_RING_NAME.pattern}, found {desc.ring!r}")
            return topic, decode_header(parts[1]), desc
        return decode(parts)

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
        return Message(topic, _with_dropped(header, self._carry.pop(camera, 0)), body)

    def _ring(self, name: str) -> _RingReader:
        reader = self._rings.get(name)
        if reader is None:
            if len(self._rings) >= _MAX_OPEN_RINGS:
                self._rings.pop(next(iter(self._rings))).close()
            reader = self._rings[name] = _RingReader(name, self.ring_counts)
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
