"""The verdict journal: every verdict the infer stage makes, in an embedded SQLite database (WAL mode).

The infer process writes each verdict here before it publishes it (``JournaledSink`` wraps the PUB
sender; the stage itself stays pure), so whatever a subscriber received is in the journal, and a
subscriber that was away can ask for what it missed (``replay_handler``, served on
``transport.journal_rep``; the contract is ``wire.replay``).

One table, ``verdicts``: ``id`` (the publishing order, never reused), ``verdict_id`` (unique),
``camera_id``, ``time_ns`` (the verdict's ``time``) and ``body`` (the verdict's JSON as published).
Each append is one transaction. In WAL mode with ``journal.synchronous: normal`` a committed verdict
survives the death of the process (kill -9: the WAL is in the OS's page cache); ``full`` also syncs
each commit to disk, so it survives the host's. Readers (the replay thread) never block the writer.

Retention, every ``journal.prune_every_s`` and at start: verdicts older than ``journal.max_age_days``
are deleted, then the oldest until the data fit ``journal.max_mb``; freed pages go back to the file
system (incremental vacuum) and the WAL is truncated after checkpoints.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stream_service.errors import JournalError, StreamServiceError
from stream_service.runtime.runner import Sink
from stream_service.settings import JournalSettings
from stream_service.wire.messages import (
    VERDICT_ID_PATTERN,
    Array,
    Header,
    Part,
    Verdict,
    parse_utc_time,
    verdict_time_ns,
)
from stream_service.wire.replay import decode_request, error_text, reply_text

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1  # PRAGMA user_version of a stream-service journal
_NS_PER_DAY = 86_400 * 10**9
_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    verdict_id TEXT NOT NULL UNIQUE,
    camera_id TEXT NOT NULL,
    time_ns INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS verdicts_by_time ON verdicts (time_ns);
CREATE INDEX IF NOT EXISTS verdicts_by_camera ON verdicts (camera_id, id);
"""
_ID = re.compile(VERDICT_ID_PATTERN)


def _connect(path: Path, synchronous: str, busy_timeout_ms: int, *, reader: bool) -> sqlite3.Connection:
    """A connection to the journal at ``path`` in WAL mode, its schema checked (and made, for the writer)."""
    where = f"journal.path {path}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JournalError(f"{where}: expected a writable folder, found {exc}") from exc
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000)
    except sqlite3.Error as exc:
        raise JournalError(f"{where}: expected a SQLite database that can be opened, found {exc}") from exc
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version not in (0, JOURNAL_VERSION) or (tables - {"verdicts", "sqlite_sequence"}):
            found = f"user_version {version}, tables {sorted(tables)}"
            raise JournalError(f"{where}: expected a stream-service journal (user_version 1), found {found}")
        if not reader and version == 0:
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect on a new, empty database only
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise JournalError(f"{where}: expected journal_mode wal, found {mode}")
        db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        if not reader:
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {JOURNAL_VERSION}")
        columns = [row[1] for row in db.execute("PRAGMA table_info(verdicts)")]
        if columns != ["id", "verdict_id", "camera_id", "time_ns", "body"]:
            raise JournalError(f"{where}: expected the verdicts table of a stream-service journal, found {columns}")
    except sqlite3.Error as exc:
        db.close()
        raise JournalError(f"{where}: expected a stream-service journal (SQLite), found {exc}") from exc
    except JournalError:
        db.close()
        raise
    return db


class Journal:
    """The writer's connection: ``append`` each verdict, ``prune`` by age and size (``maybe_prune``)."""

    def __init__(self, settings: JournalSettings, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.settings = settings
        self.path = settings.resolved_path
        self._db = _connect(self.path, settings.synchronous, settings.busy_timeout_ms, reader=False)
        self._clock_ns = clock_ns
        # The WAL is cut back to this size after checkpoints: a sixteenth of the data limit, at most 64 MiB.
        wal_limit = min(64 << 20, int(settings.max_mb * (1 << 20)) // 16)
        self._db.execute(f"PRAGMA journal_size_limit = {wal_limit}")
        self.appended = 0
        self.pruned = 0
        self._next_prune = 0.0
        self.maybe_prune()

    def append(self, verdict: Verdict) -> None:
        """Write ``verdict`` (its JSON as published) in a transaction of its own."""
        if verdict.verdict_id is None:
            raise JournalError(f"verdict of {verdict.camera_id} #{verdict.seq}: expected a verdict_id, found none")
        t_ns = verdict_time_ns(verdict)
        row = (verdict.verdict_id, verdict.camera_id, t_ns if t_ns is not None else self._clock_ns())
        try:
            self._db.execute(
                "INSERT INTO verdicts (verdict_id, camera_id, time_ns, body) VALUES (?, ?, ?, ?)",
                (*row, verdict.model_dump_json()),
            )
        except sqlite3.Error as exc:
            raise JournalError(f"journal.path {self.path}: expected to append {row[0]}, found {exc}") from exc
        self.appended += 1

    def maybe_prune(self) -> int:
        """``prune`` when ``journal.prune_every_s`` has passed since the last time; the rows deleted."""
        now = time.monotonic()
        if now < self._next_prune:
            return 0
        self._next_prune = now + self.settings.prune_every_s
        return self.prune()

    def prune(self) -> int:
        """Delete verdicts older than ``max_age_days``, then the oldest until the data fit ``max_mb``."""
        cutoff = self._clock_ns() - int(self.settings.max_age_days * _NS_PER_DAY)
        limit = int(self.settings.max_mb * (1 << 20))
        try:
            deleted = self._db.execute("DELETE FROM verdicts WHERE time_ns < ?", (cutoff,)).rowcount
            for _ in range(20):  # each round deletes the share of rows the excess is, and a tenth more
                used, rows = self.used_bytes(), self.count()
                if used <= limit or rows == 0:
                    break
                excess = max(1, int(rows * (1 - limit / used) * 1.1) + 1)
                deleted += self._db.execute(
                    "DELETE FROM verdicts WHERE id IN (SELECT id FROM verdicts ORDER BY id LIMIT ?)", (excess,)
                ).rowcount
            if deleted:
                self._db.executescript("PRAGMA incremental_vacuum;")  # stepped to the end: each step frees a page
                # PASSIVE: never waits for a replay in progress (journal_size_limit trims the WAL later)
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            raise JournalError(f"journal.path {self.path}: expected retention to run, found {exc}") from exc
        self.pruned += deleted
        if deleted:
            log.info("journal: %d verdict(s) past journal.max_age_days or journal.max_mb deleted", deleted)
        return deleted

    def used_bytes(self) -> int:
        """Bytes of the database pages in use (the file minus its free pages; the WAL not counted)."""
        pages = (
            self._db.execute("PRAGMA page_count").fetchone()[0]
            - self._db.execute("PRAGMA freelist_count").fetchone()[0]
        )
        return int(pages * self._db.execute("PRAGMA page_size").fetchone()[0])

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class JournalReader:
    """A read-only connection for the replay thread: ``after(since, camera, limit)``."""

    def __init__(self, settings: JournalSettings) -> None:
        self.path = settings.resolved_path
        self._db = _connect(self.path, settings.synchronous, settings.busy_timeout_ms, reader=True)
        self._db.execute("PRAGMA query_only = 1")

    def after(self, since: str | None, camera: str | None, limit: int) -> tuple[list[str], bool]:
        """The JSON of at most ``limit`` verdicts after ``since`` (a verdict_id: strictly after it; an ISO
        8601 time: made at or after it; None: from the oldest), of ``camera`` (None: all), in publishing
        order, and whether more follow. Raises ``JournalError`` for an unknown id or an unreadable ``since``."""
        clauses, args = [], []
        if since is not None:
            if _ID.match(since):
                row = self._query("SELECT id FROM verdicts WHERE verdict_id = ?", (since,)).fetchone()
                if row is None:
                    raise JournalError(
                        f"since: expected the verdict_id of a verdict in the journal, found {since!r} "
                        f"({self._extent()}; ask by time with an ISO 8601 since instead)"
                    )
                clauses.append("id > ?")
                args.append(row[0])
            else:
                try:
                    t_ns = parse_utc_time(since)
                except ValueError as exc:
                    raise JournalError(
                        "since: expected a verdict_id (UUIDv7) or an ISO 8601 time such as 2026-12-02T15:40:00Z, "
                        f"found {since!r}"
                    ) from exc
                clauses.append("time_ns >= ?")
                args.append(t_ns)
        if camera is not None:
            clauses.append("camera_id = ?")
            args.append(camera)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._query(f"SELECT body FROM verdicts {where} ORDER BY id LIMIT ?", (*args, limit + 1)).fetchall()
        return [r[0] for r in rows[:limit]], len(rows) > limit

    def _extent(self) -> str:
        row = self._query("SELECT COUNT(*), MIN(id) FROM verdicts", ()).fetchone()
        if not row[0]:
            return "the journal is empty"
        oldest = self._query("SELECT verdict_id, time_ns FROM verdicts WHERE id = ?", (row[1],)).fetchone()
        return f"it holds {row[0]} verdict(s), the oldest {oldest[0]}"

    def _query(self, sql: str, args: Sequence[Any]) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise JournalError(f"journal.path {self.path}: expected a readable journal, found {exc}") from exc

    def close(self) -> None:
        self._db.close()


def replay_handler(reader: JournalReader | None, max_limit: int, unavailable: str = "") -> Callable[[bytes], bytes]:
    """The replay server's handler: a request (``wire.replay``) in, the reply's bytes out; never raises.

    ``limit`` is capped at ``max_limit`` (``journal.replay_limit``). Without a reader every request
    is answered with ``unavailable`` as the error."""

    def handle(raw: bytes) -> bytes:
        if reader is None:
            return error_text(unavailable)
        try:
            request = decode_request(raw)
            verdicts, more = reader.after(request.since, request.camera, min(request.limit, max_limit))
        except StreamServiceError as exc:
            log.warning("journal replay: %s", exc)
            return error_text(str(exc))
        return reply_text(verdicts, more)

    return handle


class JournaledSink:
    """A ``Sink`` that appends every verdict to ``journal`` before handing it to ``sink`` (the PUB sender).

    A verdict the journal cannot take (disk full, file gone) is still published: the line must go on;
    the failure is counted in ``errors`` and logged."""

    def __init__(self, sink: Sink, journal: Journal) -> None:
        self.sink, self.journal = sink, journal
        self.errors = 0
        self.last_error: str | None = None

    def send(self, topic: str, header: Header, arrays: Sequence[Array | Part] = ()) -> bool:
        if not isinstance(header, Verdict):
            return self.sink.send(topic, header, arrays)
        self._guarded(self.journal.append, header)
        queued = self.sink.send(topic, header, arrays)
        self._guarded(self.journal.maybe_prune)  # after the publish: retention never delays a verdict
        return queued

    def _guarded(self, action: Callable[..., object], *args: Any) -> None:
        try:
            action(*args)
        except JournalError as exc:
            self.errors += 1
            self.last_error = str(exc)
            log.error("journal: %s; verdicts are published anyway", exc)

    def counters(self) -> dict[str, Any]:
        j = self.journal
        return {
            "path": str(j.path),
            "appended": j.appended,
            "pruned": j.pruned,
            "errors": self.errors,
            "last_error": self.last_error,
        }
