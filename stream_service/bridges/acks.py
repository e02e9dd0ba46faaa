"""Which verdicts the broker acknowledged: the bridge's resume point after an outage, kept in a state file.

A bridge sends QoS 1 verdicts in publishing order; the broker answers each with a PUBACK, possibly
before the sender has noted what it sent (the acknowledgement arrives on the network thread). ``AckCursor``
keeps the verdicts sent and not yet acknowledged in sending order, and ``acked`` is the last verdict of
the unbroken acknowledged prefix: every verdict up to it reached the broker. Each advance is written to
``path`` (atomically: a reader sees the old or the new id), so a bridge that restarts, or reconnects, asks
the journal for what follows ``acked`` and sends it once more, and nothing twice that the broker confirmed.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from stream_service.errors import BridgeError
from stream_service.wire.messages import VERDICT_ID_PATTERN

STATE_VERSION = 1


@dataclass
class _Sent:
    verdict_id: str
    sent_t: float
    acked: bool = False


class AckCursor:
    """Sent and acknowledged verdicts of one bridge (see the module docstring); safe across two threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.acked: str | None = read_state(path)
        self._pending: OrderedDict[int, _Sent] = OrderedDict()  # by message id, in sending order
        self._early: set[int] = set()  # acknowledged before ``sent`` noted them
        self._lock = threading.Lock()
        self.writes = 0

    def sent(self, mid: int, verdict_id: str, now: float) -> None:
        """Note verdict ``verdict_id`` sent as MQTT message ``mid``."""
        with self._lock:
            self._pending[mid] = _Sent(verdict_id, now)
            if mid in self._early:
                self._early.discard(mid)
                self._pending[mid].acked = True
                self._advance()

    def ack(self, mid: int) -> None:
        """The broker acknowledged message ``mid`` (called on the network thread)."""
        with self._lock:
            entry = self._pending.get(mid)
            if entry is None:
                self._early.add(mid)
                return
            entry.acked = True
            self._advance()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending)

    def oldest_age_s(self, now: float) -> float:
        """How long the oldest unacknowledged verdict has waited (0 when none waits)."""
        with self._lock:
            first = next(iter(self._pending.values()), None)
            return now - first.sent_t if first is not None else 0.0

    def reset(self) -> None:
        """Forget what was sent on a connection that is gone: it is sent again after ``acked``."""
        with self._lock:
            self._pending.clear()
            self._early.clear()

    def _advance(self) -> None:
        last = None
        while self._pending:
            mid, entry = next(iter(self._pending.items()))
            if not entry.acked:
                break
            del self._pending[mid]
            last = entry.verdict_id
        if last is not None:
            self.acked = last
            write_state(self.path, last)
            self.writes += 1


def read_state(path: Path) -> str | None:
    """The acknowledged verdict id in the state file ``path``; None when there is none yet.

    Raises ``BridgeError`` ``"<path>: expected ..., found ..."`` for a file that is not a bridge state."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BridgeError(f"bridge state {path}: expected a readable file, found {exc.strerror}") from exc
    try:
        state = json.loads(text)
        acked = state["acked"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BridgeError(
            f'bridge state {path}: expected {{"version": {STATE_VERSION}, "acked": "<verdict_id>"}}, '
            f"found {text[:80]!r}"
        ) from exc
    if not isinstance(acked, str) or not re.match(VERDICT_ID_PATTERN, acked):
        raise BridgeError(f"bridge state {path}: expected a verdict_id at 'acked', found {acked!r}")
    return acked


def write_state(path: Path, acked: str) -> None:
    """Write ``acked`` to ``path`` atomically; raises ``BridgeError`` when the folder is not writable."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": STATE_VERSION, "acked": acked}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise BridgeError(f"bridge state {path}: expected a writable file, found {exc.strerror}") from exc
