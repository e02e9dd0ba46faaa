"""A slim subscriber of a pipeline's verdicts: pyzmq and pydantic only (no NumPy, OpenCV or Numba).

For a process off the inspection host (a line controller, an MES adapter) that only reads verdicts::

    from stream_service.client import verdicts

    for v in verdicts("tcp://inspect-1:57300", camera="cam0", since="2026-12-02T15:40:00Z",
                      journal="tcp://inspect-1:57301"):
        print(v.camera_id, v.seq, v.verdict, v.score, [r.model_dump() for r in v.regions])

``verdicts`` connects a SUB socket first (ZeroMQ reconnects it by itself), then with ``since`` (a
``verdict_id``, or an ISO 8601 time) asks the journal for every verdict after it, page by page, speaking
the replay protocol of ``stream_service.wire.replay`` (one JSON request, one JSON reply on a REQ socket),
and goes on live. As ``stream-service subscribe --since`` does, a live verdict already handed on is
skipped (ids are time-ordered), and the first live verdict, or one after a sequence gap that ``dropped``
does not explain (a reconnect, a full queue), first catches up from the journal: no gap, no duplicate.
``keys``: the pipeline's CURVE key folder (``stream-service keys generate``), for a tcp endpoint off loopback.

The models here are the published JSON (schemas/verdict.v1.json), not the pipeline's internal ones, so
this module imports nothing of the pipeline but ``errors``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream_service.errors import JournalError, MessageError, TransportError

__all__ = ["CameraStatus", "Region", "Verdict", "verdicts"]

log = logging.getLogger(__name__)

POLL_MS = 200  # how long one live receive waits before the iterator looks again
RECONNECT_IVL_MS, RECONNECT_IVL_MAX_MS = 100, 5000  # ZeroMQ's reconnect backoff of the SUB socket


class _Published(BaseModel):
    # extra="ignore": a newer minor version (1.x) adds fields, and an older client still reads it.
    model_config = ConfigDict(frozen=True, extra="ignore")


class Region(_Published):
    """A defect region, in frame pixels."""

    x1: int
    y1: int
    x2: int
    y2: int
    score: float
    area: int = Field(ge=0)


class Verdict(_Published):
    """One verdict as published on ``verdicts.<camera>`` (schemas/verdict.v1.json)."""

    schema_version: str = Field(pattern=r"^1\.\d+$")
    kind: Literal["verdict"] = "verdict"
    camera_id: str
    seq: int = Field(ge=0)
    capture_ns: int
    verdict_id: str | None = None
    time: str | None = None
    verdict: Literal["pass", "fail"]
    score: float
    threshold: float
    model_id: str
    model_version: str
    reference_id: str
    reference_version: str
    regions: tuple[Region, ...] = ()
    latency_ms: dict[str, float] = Field(default_factory=dict)
    dropped: int = Field(0, ge=0)
    truth: dict[str, Any] | None = None
    reason: str | None = None  # set on a fail the model could not score (non-finite data, failed registration)


class CameraStatus(_Published):
    """A camera's health as published on ``status.<camera>``."""

    schema_version: str = Field(pattern=r"^1\.\d+$")
    kind: Literal["status"] = "status"
    camera_id: str
    seq: int = Field(ge=0)
    capture_ns: int
    state: Literal["starting", "online", "reconnecting", "failed"]
    reason: str | None = None
    since_ns: int
    last_frame_ns: int | None = None
    frames: int = Field(0, ge=0)


def _parse(raw: bytes) -> Verdict:
    try:
        return Verdict.model_validate_json(raw)
    except ValidationError as exc:
        raise MessageError(f"verdict: expected schemas/verdict.v1.json, found {exc.errors()[0]['msg']}") from exc


def _secure(sock: zmq.Socket[bytes], keys: Path | None) -> None:
    if keys is None:
        return
    import zmq.auth

    try:
        server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))
        public, secret = zmq.auth.load_certificate(str(keys / "client.key_secret"))
    except (OSError, ValueError) as exc:
        raise TransportError(f"keys {keys}: expected server.key and client.key_secret, found {exc}") from exc
    if secret is None:
        raise TransportError(f"keys {keys}: expected a secret key in client.key_secret, found none")
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret


class JournalPages:
    """The replay protocol (``stream_service.wire.replay``) on the journal's REP socket at ``endpoint``."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, keys: Path | None, timeout_ms: int) -> None:
        self.ctx, self.endpoint, self.keys, self.timeout_ms = ctx, endpoint, keys, timeout_ms

    def page(self, since: str | None, camera: str | None, limit: int) -> tuple[list[Verdict], bool]:
        """At most ``limit`` verdicts after ``since``, and whether more follow."""
        sock = self.ctx.socket(zmq.REQ)
        sock.linger = 0
        try:
            _secure(sock, self.keys)
            sock.connect(self.endpoint)
            sock.send(json.dumps({"since": since, "camera": camera, "limit": limit}).encode())
            if not sock.poll(self.timeout_ms, zmq.POLLIN):
                raise TransportError(
                    f"journal at {self.endpoint}: expected a reply within {self.timeout_ms} ms, found none"
                )
            reply = json.loads(sock.recv())
        except zmq.ZMQError as exc:
            raise TransportError(f"journal at {self.endpoint}: expected a reply, found {exc}") from exc
        finally:
            sock.close(linger=0)
        if reply.get("error"):
            raise JournalError(f"journal at {self.endpoint}: {reply['error']}")
        return [Verdict.model_validate(v) for v in reply.get("verdicts", [])], bool(reply.get("more"))

    def after(self, since: str | None, camera: str | None, limit: int) -> Iterator[Verdict]:
        while True:
            page, more = self.page(since, camera, limit)
            yield from page
            if not more or not page:
                return
            since = page[-1].verdict_id


def verdicts(
    endpoint: str,
    camera: str | None = None,
    since: str | None = None,
    keys: Path | None = None,
    journal: str | None = None,
    timeout_ms: int = 5000,
    page_size: int = 1000,
) -> Iterator[Verdict]:
    """Every verdict (of ``camera``, or all) published at ``endpoint``, forever; with ``since``, those after it
    in the ``journal`` first (see the module docstring). Raises ``JournalError`` for an unknown ``since`` and
    ``TransportError`` when the journal does not answer within ``timeout_ms``."""
    if since is not None and journal is None:
        raise JournalError("since: expected a journal endpoint (journal=tcp://host:57301) to replay from, found none")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger, sub.reconnect_ivl, sub.reconnect_ivl_max = 0, RECONNECT_IVL_MS, RECONNECT_IVL_MAX_MS
    try:
        _secure(sub, keys)
        sub.setsockopt(zmq.SUBSCRIBE, f"verdicts.{camera}".encode() if camera else b"verdicts.")
        sub.connect(endpoint)  # first: live verdicts published during the replay wait in its queue
        pages = JournalPages(ctx, journal, keys, timeout_ms) if journal is not None else None
        last, seqs, caught_up = since, dict[str, int](), pages is None
        if pages is not None and since is not None:
            for v in pages.after(since, camera, page_size):
                last, seqs[v.camera_id] = v.verdict_id or last, v.seq
                yield v
        while True:
            if not sub.poll(POLL_MS, zmq.POLLIN):
                continue
            parts = sub.recv_multipart()
            if len(parts) < 2:
                continue
            v = _parse(parts[1])
            seen = seqs.get(v.camera_id)
            gap = seen is not None and v.seq > seen + 1 + v.dropped
            if pages is not None and last is not None and (not caught_up or gap):
                try:
                    for old in pages.after(last, camera, page_size):
                        last, seqs[old.camera_id] = old.verdict_id or last, old.seq
                        yield old
                    caught_up = True
                except TransportError as exc:  # the journal is away (a restart): live goes on, asked again later
                    log.warning("catching up from the journal after %s: %s", last, exc)
            if v.verdict_id is not None and last is not None and v.verdict_id <= last:
                continue  # handed on from the journal already (UUIDv7 ids sort in time order)
            last, seqs[v.camera_id] = v.verdict_id or last, v.seq
            yield v
    finally:
        sub.close(linger=0)
        ctx.term()
