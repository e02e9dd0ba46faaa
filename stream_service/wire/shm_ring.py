"""The shared-memory frame ring: same-host payloads without a copy through ZeroMQ. No ``zmq`` here.

The sender (``ShmRing``) owns a ring of ``slots`` slots of ``slot_bytes`` bytes in a file under
``/dev/shm``, copies each message's payloads into a free slot (or lets the capture fill a reserved slot
in place) and sends only a ``ShmDescriptor`` (ring name, slot, generation, offsets); the receiver
(``RingReader``) maps the ring by name and turns a descriptor back into payload views.
``stream_service.wire.transport`` carries the descriptors over ZeroMQ. Ownership and reuse:

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

File layout: magic, slot count, slot size, data offset; at byte 64 one generation per slot, then one
release word per slot; the slots from the next page on, each a whole number of pages. Payloads within a
slot start at 64-byte boundaries. The file is named ``stream-service-ring-<pid>-<hex>``, so that
``remove_stale_rings`` can unlink the rings of senders killed before they could clean up.

Arrays from the ring are read-only zero-copy views of the slot, like those of an inline message. The
store order the checks rely on is guaranteed on x86-64 (TSO); on weakly ordered CPUs they are best
effort.
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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from stream_service.errors import ConfigError, MessageError, SharedMemoryError

log = logging.getLogger(__name__)

_RING_MAGIC = b"SSRING01"
RING_NAME = re.compile(r"^stream-service-ring-[0-9]+-[0-9a-f]+$")
_GENERATIONS_AT = 64
_PAGE = 4096
_ALIGN = 64
# Map every page up front: a first write or read of a slot must not pay thousands of page faults.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def ring_directory() -> Path:
    """Where rings live: ``/dev/shm`` (RAM) where it exists, else the temporary directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


class ShmDescriptor(BaseModel):
    """Where a message's payloads lie: ring file name, slot index, the slot's generation, payload offsets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ring: str = Field(max_length=255)
    slot: NonNegativeInt
    generation: NonNegativeInt
    offsets: tuple[NonNegativeInt, ...] = Field(max_length=8)  # one per payload part (at most 8)


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
            raise SharedMemoryError(f"create shm ring {path}: expected {size} bytes of RAM, found {exc}") from exc
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

    def acquire(self, sizes: Sequence[int]) -> Reservation | None:
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
        return Reservation(slot, offsets, views)

    def commit(self, reservation: Reservation) -> ShmDescriptor:
        """Mark the slot complete and leased from now on; its descriptor."""
        m, slot = self._map, reservation.slot
        m.generations[slot] += np.uint64(1)  # even: complete, leased until released
        self._sent_ns[slot] = time.monotonic_ns()
        return ShmDescriptor(
            ring=self.name, slot=slot, generation=int(m.generations[slot]), offsets=reservation.offsets
        )

    def abandon(self, reservation: Reservation) -> None:
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
class Reservation:
    slot: int
    offsets: tuple[int, ...]
    views: list[npt.NDArray[np.uint8]]


def _release(generations: np.ndarray, released: np.ndarray, slot: int, generation: int, counts: Counter[str]) -> None:
    if int(generations[slot]) != generation:
        counts["overwritten_in_use"] += 1
        log.warning("shm slot %d was reclaimed while its arrays were in use (lease timeout too short?)", slot)
        return
    released[slot] = generation


class RingReader:
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
        if not RING_NAME.match(path.name):
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
