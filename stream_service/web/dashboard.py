"""The live dashboard: a small HTTP server in the process of ``stream-service run`` (or ``dashboard``).

The run loop (of ``stream-service run``, or of ``stream-service dashboard`` for a pipeline started stage by
stage) hands it, once a second, the pipeline summary (``PipelineSummary.snapshot``: per camera
verdict rate, pass/fail, drops; p50/p99 latency of every stage and end to end; the stage processes), and
the newest highlight JPEG of each camera as it arrives. The server only reads what it was handed last
(under a lock), so a slow or hostile browser never slows the pipeline. Endpoints:

- ``/``: the page (``static/dashboard.html``: plain HTML and JavaScript, no external assets), which polls
  ``/api/status`` every second and draws the end-to-end latency of the last minutes;
- ``/api/status``: the latest snapshot plus ``history`` (one point a second: time, verdicts/s, and the
  end-to-end p50/p99 of that second's verdicts, so the chart shows a spike when it happens). It also
  holds ``captions`` (per camera, what its newest highlight shows: frame, verdict, score, time) and
  ``recent_fails`` (the last fails, newest first, each with a caption);
- ``/api/highlight/<camera>.jpg``: the camera's newest highlight picture (404 before the first one);
- ``/api/verdicts?camera=&since=&limit=``: verdicts replayed from the infer stage's journal (through the
  same request/reply client as ``subscribe --since``, so it works from another host): ``{"verdicts": [...],
  "more": bool, "next": <since for the next page> | null}``, in publishing order, after the verdict_id or
  from the ISO 8601 time ``since`` (none: the oldest kept), at most ``limit`` (default 100, at most
  ``journal.replay_limit``); 400 with ``{"error"}`` for a bad parameter or an unknown id, 503 when the
  journal does not answer;
- ``/api/fails/<id>.jpg``: the highlight picture of one of the recent fails;
- ``/metrics``: the pipeline's Prometheus metrics (``web.prometheus``: verdicts, latency histograms, what
  the stages count from their heartbeats, camera up, restarts), for an existing monitoring stack;
- ``/healthz``: JSON ``{ok, problems, cameras}``: 200 when every camera is online and delivering and every
  process runs, 503 naming what is not (or when the run loop has published nothing for 5 s).

It binds ``dashboard.host:dashboard.port`` (loopback by default; on a line network see ``web.access``: the
Host allowlist and the optional token). A port that is taken is logged as an error
naming ``dashboard.port`` and the pipeline runs on without a dashboard.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import re
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from stream_service.errors import ConfigError, JournalError, StreamServiceError
from stream_service.runtime.latency import END_TO_END
from stream_service.runtime.summary import PipelineSummary
from stream_service.settings import Settings
from stream_service.web.access import AccessPolicy
from stream_service.web.prometheus import CONTENT_TYPE, PipelineMetrics
from stream_service.wire.messages import CameraStatus, Message, Verdict, highlight_jpeg

if TYPE_CHECKING:
    from stream_service.runtime.supervisor import StageState

if TYPE_CHECKING:
    from stream_service.runtime.replay import JournalClient

log = logging.getLogger(__name__)

HISTORY_S = 600  # seconds of one-a-second history points kept for the chart
DEFAULT_LIMIT = 100  # /api/verdicts without a limit
STALE_S = 5.0  # /healthz turns 503 when the run loop has not published for this long
_HIGHLIGHT = re.compile(r"^/api/highlight/([A-Za-z0-9][A-Za-z0-9_-]*)\.jpg$")
_FAIL_PICTURE = re.compile(r"^/api/fails/([A-Za-z0-9][A-Za-z0-9_-]*)\.jpg$")
RECENT_FAILS = 12  # the dashboard's list of recent fails, each with its highlight picture
PICTURES_KEPT = 8  # per camera, the newest highlight pictures by frame number
RECENT_CAPTIONS = 256
REQUEST_TIMEOUT_S = 10.0  # verdicts remembered until their highlight (published after them) arrives


def page() -> bytes:
    """The dashboard's HTML page, as shipped in the package."""
    return importlib.resources.files("stream_service.web").joinpath("static/dashboard.html").read_bytes()


class Dashboard:
    """The HTTP server and what it shows; ``publish``/``highlight`` are called from the run loop."""

    def __init__(
        self,
        host: str,
        port: int,
        history_s: int = HISTORY_S,
        metrics: PipelineMetrics | None = None,
        access: AccessPolicy | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        journal: JournalClient | None = None,
    ) -> None:
        self.journal = journal
        self.metrics = metrics if metrics is not None else PipelineMetrics()
        self.access = access if access is not None else AccessPolicy(host)
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {"verdicts": 0, "cameras": {}, "latency_ms": {}, "processes": []}
        self._published = time.monotonic()
        self._history: deque[dict[str, Any]] = deque(maxlen=history_s)
        self._highlights: dict[str, bytes] = {}
        # The last few pictures per camera by frame: the page asks for the one its caption describes.
        self._by_seq: dict[str, OrderedDict[int, bytes]] = {}
        self._captions: dict[str, dict[str, Any]] = {}  # each camera's newest highlight: what it shows
        self._recent: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()  # captions of recent verdicts
        self._fails: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILS)
        self._fail_pictures: dict[str, bytes] = {}
        self._interval: list[float] = []  # end-to-end latencies since the last history point (run loop only)
        self._page = page()
        try:
            self._server = _Server((host, port), _handler(self, request_timeout_s))
        except OSError as exc:
            raise ConfigError(f"dashboard.port: expected a free port on {host}, found {port} taken ({exc})") from exc
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="dashboard", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings, journal: JournalClient | None = None) -> Dashboard:
        """The dashboard of ``settings`` (``dashboard.*``; ``health.camera_stale_s`` for its camera metrics),
        answering ``/api/verdicts`` from ``journal``."""
        d = settings.dashboard
        metrics = PipelineMetrics(d.latency_buckets_s, settings.health.camera_stale_s)
        access = AccessPolicy(d.host, d.allowed_hosts, d.token)
        return cls(
            d.host, d.port, metrics=metrics, access=access, request_timeout_s=d.request_timeout_s, journal=journal
        )

    def verdict(self, verdict: Verdict, missed: int = 0) -> None:
        """Count ``verdict`` in the metrics (with the ``missed`` verdicts just before it) and its end-to-end
        latency in the current history point, keep its caption for its highlight, and a fail in the list of
        recent fails (called from the run loop)."""
        self.metrics.verdict(verdict, missed)
        e2e = verdict.latency_ms.get(END_TO_END)
        if e2e is not None:
            self._interval.append(e2e)
        caption = caption_of(verdict)
        with self._lock:
            self._recent[(verdict.camera_id, verdict.seq)] = caption
            while len(self._recent) > RECENT_CAPTIONS:
                self._recent.popitem(last=False)
            if verdict.verdict == "fail":
                if len(self._fails) == self._fails.maxlen:
                    self._fail_pictures.pop(self._fails[0]["id"], None)
                self._fails.append(caption)

    def publish(self, snapshot: dict[str, Any], now: float | None = None, stages: Sequence[StageState] = ()) -> None:
        """Show ``snapshot`` (``PipelineSummary.snapshot``) and close a history point: the verdicts since the
        previous one, their end-to-end p50/p99 (None without verdicts), and the cameras' verdict rate.
        The metrics take ``stages`` (the supervisor's: each process and its heartbeat's counters) and the
        snapshot's camera health (whether each camera is up)."""
        now = time.time() if now is None else now
        self.metrics.update(stages, snapshot.get("health", {}).get("cameras", {}))
        latencies, self._interval = self._interval, []
        p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (None, None)
        point = {
            "t": round(now, 3),
            "fps": round(sum(c.get("fps", 0.0) for c in snapshot.get("cameras", {}).values()), 2),
            "verdicts": len(latencies),
            "e2e_p50": None if p50 is None else round(float(p50), 2),
            "e2e_p99": None if p99 is None else round(float(p99), 2),
        }
        with self._lock:
            self._snapshot = snapshot
            self._history.append(point)
            self._published = time.monotonic()

    def highlight(self, camera_id: str, jpeg: bytes, seq: int | None = None) -> None:
        """Keep ``jpeg`` as the newest highlight picture of ``camera_id`` (with its verdict's caption when
        the verdict of frame ``seq`` was seen), and as the picture of that verdict when it is a recent fail."""
        with self._lock:
            self._highlights[camera_id] = jpeg
            if seq is not None:
                kept = self._by_seq.setdefault(camera_id, OrderedDict())
                kept[seq] = jpeg
                while len(kept) > PICTURES_KEPT:
                    kept.popitem(last=False)
            caption = self._recent.get((camera_id, seq)) if seq is not None else None
            if caption is not None:
                self._captions[camera_id] = caption
                if caption["verdict"] == "fail" and any(f["id"] == caption["id"] for f in self._fails):
                    self._fail_pictures[caption["id"]] = jpeg

    def fail_picture(self, fail_id: str) -> bytes | None:
        with self._lock:
            return self._fail_pictures.get(fail_id)

    def status(self) -> dict[str, Any]:
        with self._lock:
            fails = [{**f, "picture": f["id"] in self._fail_pictures} for f in reversed(self._fails)]
            return {
                **self._snapshot,
                "highlights": sorted(self._highlights),
                "captions": dict(self._captions),
                "recent_fails": fails,
                "history": list(self._history),
            }

    def picture(self, camera_id: str, seq: int | None = None) -> bytes | None:
        """The highlight of frame ``seq`` of ``camera_id`` while it is kept, else the camera's newest."""
        with self._lock:
            kept: Mapping[int, bytes] = self._by_seq.get(camera_id, {})
            return kept[seq] if seq is not None and seq in kept else self._highlights.get(camera_id)

    def fresh(self) -> bool:
        with self._lock:
            return time.monotonic() - self._published <= STALE_S

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` answers: ``ok`` and the ``problems`` in words (cameras, processes, a stalled run loop)."""
        health = self.status().get("health") or {"ok": True, "problems": []}
        problems = list(health["problems"])
        if not self.fresh():
            problems.insert(0, f"the run loop has published nothing for over {STALE_S:g} s")
        return {"ok": not problems, "problems": problems, "cameras": health.get("cameras", {})}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def replayed(journal: JournalClient | None, query: str) -> tuple[int, dict[str, Any]]:
    """The answer to ``/api/verdicts?<query>``: (HTTP status, JSON body); see the module docstring."""
    if journal is None:
        return 503, {"error": "journal: expected a journal replay endpoint (transport.journal_rep), found none"}
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(params) - {"camera", "since", "limit"})
    if unknown:
        return 400, {"error": f"query parameters: expected camera, since and limit, found {unknown}"}
    limit_text = params.get("limit") or str(min(DEFAULT_LIMIT, journal.page_size))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= journal.page_size:
        return 400, {"error": f"limit: expected an integer from 1 to {journal.page_size}, found {limit_text!r}"}
    try:
        reply = journal.page(params.get("since") or None, params.get("camera") or None, int(limit_text))
    except JournalError as exc:  # an unknown id, an unreadable time: what the journal said
        return 400, {"error": str(exc)}
    except StreamServiceError as exc:  # the journal did not answer
        return 503, {"error": str(exc)}
    verdicts = [json.loads(v.model_dump_json()) for v in reply.verdicts]
    following = reply.verdicts[-1].verdict_id if reply.more and reply.verdicts else None
    return 200, {"verdicts": verdicts, "more": reply.more, "next": following}


def take(message: Message, summary: PipelineSummary, dashboard: Dashboard | None, now_ns: int) -> None:
    """A message from the verdicts PUB: a verdict is counted in ``summary``, a highlight's JPEG is kept
    as its camera's newest picture by ``dashboard``."""
    header = message.header
    if isinstance(header, CameraStatus):
        summary.status(header)
    elif isinstance(header, Verdict):
        missed = summary.add(header, now_ns)
        if dashboard is not None:
            dashboard.verdict(header, missed)
    elif dashboard is not None and (jpeg := highlight_jpeg(message)) is not None:
        dashboard.highlight(header.camera_id, jpeg, header.seq)


def caption_of(verdict: Verdict) -> dict[str, Any]:
    """What a highlight picture's caption says: camera, frame, verdict, score and threshold, regions, time (UTC)."""
    when = datetime.fromtimestamp(verdict.capture_ns / 1e9, tz=UTC).isoformat(timespec="milliseconds")
    return {
        "id": f"{verdict.camera_id}-{verdict.seq}-{verdict.capture_ns}",
        "camera": verdict.camera_id,
        "seq": verdict.seq,
        "verdict": verdict.verdict,
        "score": round(verdict.score, 4),
        "threshold": round(verdict.threshold, 4),
        "regions": len(verdict.regions),
        "time": when.replace("+00:00", "Z"),
    }


# Sent with every answer: no sniffing, no framing, no referrer, scripts and pictures from this origin only.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}
# A client that drops its connection is no error of the dashboard's.
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, _GONE):
            log.debug("dashboard %s: connection closed (%s)", client_address, exc)
        else:  # logged in one line: a hostile client must not fill the log with tracebacks
            log.warning("dashboard %s: %s: %s", client_address, type(exc).__name__, exc)


def _handler(dashboard: Dashboard, request_timeout_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "stream-service"
        sys_version = ""  # no Python version in the Server header

        def version_string(self) -> str:
            return self.server_version

        timeout = request_timeout_s  # a client that sends nothing for this long is disconnected

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            token = parse_qs(url.query).get("token", [None])[0]
            decision = dashboard.access.check(url.path, self.headers, token)
            if decision.code != 200:
                self._error(decision.code, decision.reason)
            elif token is not None and dashboard.access.token is not None:
                # The token leaves the address bar (and the history) at once, kept in an HttpOnly cookie.
                self.send_response(303)
                self.send_header("Location", url.path or "/")
                self.send_header("Set-Cookie", dashboard.access.cookie_header())
                self.send_header("Content-Length", "0")
                self._common_headers()
                self.end_headers()
            else:
                self._route(url.path, url.query, decision.authenticated)

        def _route(self, path: str, query: str, authenticated: bool) -> None:
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", dashboard._page)
            elif path == "/api/status":
                self._send(200, "application/json", json.dumps(dashboard.status()).encode())
            elif path == "/api/verdicts":
                code, body = replayed(dashboard.journal, query)
                self._send(code, "application/json", json.dumps(body).encode())
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE, dashboard.metrics.exposition())
            elif path == "/healthz":
                health = dashboard.health()
                body = health if authenticated else {"ok": health["ok"]}
                self._send(200 if health["ok"] else 503, "application/json", json.dumps(body).encode())
            elif (match := _FAIL_PICTURE.match(path)) is not None:
                picture = dashboard.fail_picture(match.group(1))
                if picture is None:
                    self._error(404, f"no picture kept for fail {match.group(1)!r}")
                else:
                    self._send(200, "image/jpeg", picture)
            elif (match := _HIGHLIGHT.match(path)) is not None:
                asked = parse_qs(query).get("seq", [""])[0]
                jpeg = dashboard.picture(match.group(1), int(asked) if asked.isdigit() else None)
                if jpeg is None:
                    self._error(404, f"no highlight yet for camera {match.group(1)!r}")
                else:
                    self._send(200, "image/jpeg", jpeg)
            else:
                self._error(404, f"no such page: {path}")

        def handle(self) -> None:
            try:
                super().handle()
            except _GONE as exc:
                log.debug("dashboard %s: connection closed (%s)", self.client_address, exc)

        def _error(self, code: int, message: str) -> None:
            self._send(code, "application/json", json.dumps({"error": message}).encode())

        def _common_headers(self) -> None:
            self.send_header("Cache-Control", "no-store")
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self._common_headers()
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("dashboard %s: " + format, self.address_string(), *args)

    return Handler
