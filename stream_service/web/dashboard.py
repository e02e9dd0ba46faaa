"""The live dashboard: a small HTTP server in the process of ``stream-service run`` (or ``dashboard``).

The run loop (of ``stream-service run``, or of ``stream-service dashboard`` for a pipeline started stage by
stage) hands it, once a second, the pipeline summary (``PipelineSummary.snapshot``: per camera
verdict rate, pass/fail, drops; p50/p99 latency of every stage and end to end; the stage processes), and
the newest highlight JPEG of each camera as it arrives. The server only reads what it was handed last
(under a lock), so a slow or hostile browser never slows the pipeline. Endpoints:

- ``/``: the page (``static/dashboard.html``: plain HTML and JavaScript, no external assets), which polls
  ``/api/status`` every second and draws the end-to-end latency of the last minutes;
- ``/api/status``: the latest snapshot plus ``history`` (one point a second: time, verdicts/s, and the
  end-to-end p50/p99 of that second's verdicts, so the chart shows a spike when it happens);
- ``/api/highlight/<camera>.jpg``: the camera's newest highlight picture (404 before the first one);
- ``/api/verdicts?camera=&since=&limit=``: verdicts replayed from the infer stage's journal (through the
  same request/reply client as ``subscribe --since``, so it works from another host): ``{"verdicts": [...],
  "more": bool, "next": <since for the next page> | null}``, in publishing order, after the verdict_id or
  from the ISO 8601 time ``since`` (none: the oldest kept), at most ``limit`` (default 100, at most
  ``journal.replay_limit``); 400 with ``{"error"}`` for a bad parameter or an unknown id, 503 when the
  journal does not answer;
- ``/metrics``: the same figures in Prometheus' text format, for an existing monitoring stack;
- ``/healthz``: ``ok`` while the run loop keeps publishing (503 when its last snapshot is over 5 s old).

It binds ``dashboard.host:dashboard.port`` (loopback by default: it has no authentication; expose it
through a reverse proxy if the line needs it remotely). A port that is taken is logged as an error
naming ``dashboard.port`` and the pipeline runs on without a dashboard.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import numpy as np

from stream_service.errors import ConfigError, JournalError, StreamServiceError
from stream_service.runtime.latency import END_TO_END
from stream_service.runtime.summary import PipelineSummary
from stream_service.wire.messages import Message, Verdict, highlight_jpeg

if TYPE_CHECKING:
    from stream_service.runtime.replay import JournalClient

log = logging.getLogger(__name__)

HISTORY_S = 600  # seconds of one-a-second history points kept for the chart
DEFAULT_LIMIT = 100  # /api/verdicts without a limit
STALE_S = 5.0  # /healthz turns 503 when the run loop has not published for this long
_HIGHLIGHT = re.compile(r"^/api/highlight/([A-Za-z0-9][A-Za-z0-9_-]*)\.jpg$")


def page() -> bytes:
    """The dashboard's HTML page, as shipped in the package."""
    return importlib.resources.files("stream_service.web").joinpath("static/dashboard.html").read_bytes()


class Dashboard:
    """The HTTP server and what it shows; ``publish``/``highlight`` are called from the run loop."""

    def __init__(self, host: str, port: int, history_s: int = HISTORY_S, journal: JournalClient | None = None) -> None:
        self.journal = journal
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {"verdicts": 0, "cameras": {}, "latency_ms": {}, "processes": []}
        self._published = time.monotonic()
        self._history: deque[dict[str, Any]] = deque(maxlen=history_s)
        self._highlights: dict[str, bytes] = {}
        self._interval: list[float] = []  # end-to-end latencies since the last history point (run loop only)
        self._page = page()
        try:
            self._server = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as exc:
            raise ConfigError(f"dashboard.port: expected a free port on {host}, found {port} taken ({exc})") from exc
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="dashboard", daemon=True)
        self._thread.start()

    def verdict(self, verdict: Verdict) -> None:
        """Count ``verdict``'s end-to-end latency in the current history point (called from the run loop)."""
        e2e = verdict.latency_ms.get(END_TO_END)
        if e2e is not None:
            self._interval.append(e2e)

    def publish(self, snapshot: dict[str, Any], now: float | None = None) -> None:
        """Show ``snapshot`` (``PipelineSummary.snapshot``) and close a history point: the verdicts since the
        previous one, their end-to-end p50/p99 (None without verdicts), and the cameras' verdict rate."""
        now = time.time() if now is None else now
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

    def highlight(self, camera_id: str, jpeg: bytes) -> None:
        """Keep ``jpeg`` as the newest highlight picture of ``camera_id``."""
        with self._lock:
            self._highlights[camera_id] = jpeg

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {**self._snapshot, "highlights": sorted(self._highlights), "history": list(self._history)}

    def picture(self, camera_id: str) -> bytes | None:
        with self._lock:
            return self._highlights.get(camera_id)

    def fresh(self) -> bool:
        with self._lock:
            return time.monotonic() - self._published <= STALE_S

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
    if isinstance(header, Verdict):
        summary.add(header, now_ns)
        if dashboard is not None:
            dashboard.verdict(header)
    elif dashboard is not None and (jpeg := highlight_jpeg(message)) is not None:
        dashboard.highlight(header.camera_id, jpeg)


def metrics(status: dict[str, Any]) -> str:
    """The status in Prometheus' text exposition format."""
    lines = [
        "# HELP stream_service_verdicts_total Verdicts received by the run loop.",
        "# TYPE stream_service_verdicts_total counter",
        f"stream_service_verdicts_total {int(status.get('verdicts', 0))}",
    ]
    per_camera = (
        ("fps", "gauge", "Verdicts per second"),
        ("passed", "counter", "Parts judged pass"),
        ("failed", "counter", "Parts judged fail"),
        ("dropped", "counter", "Frames the pipeline dropped to stay fresh"),
        ("missed", "counter", "Verdicts the run loop missed"),
    )
    for key, kind, text in per_camera:
        name = f"stream_service_camera_{key}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} {text}.", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{camera="{cid}"}} {c.get(key, 0)}' for cid, c in status.get("cameras", {}).items()]
    lines += [
        "# HELP stream_service_latency_ms Latency of each stage and end to end, milliseconds.",
        "# TYPE stream_service_latency_ms gauge",
    ]
    for stage, p in status.get("latency_ms", {}).items():
        for q in ("p50", "p99"):
            lines.append(f'stream_service_latency_ms{{stage="{stage}",quantile="0.{q[1:]}"}} {p[q]}')
    lines += [
        "# HELP stream_service_process_restarts_total Restarts of each stage process.",
        "# TYPE stream_service_process_restarts_total counter",
    ]
    lines += [
        f'stream_service_process_restarts_total{{process="{p["name"]}",state="{p["state"]}"}} {p["restarts"]}'
        for p in status.get("processes", [])
    ]
    return "\n".join(lines) + "\n"


def _handler(dashboard: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "stream-service-dashboard"

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", dashboard._page)
            elif path == "/api/status":
                self._send(200, "application/json", json.dumps(dashboard.status()).encode())
            elif path == "/api/verdicts":
                code, body = replayed(dashboard.journal, query)
                self._send(code, "application/json", json.dumps(body).encode())
            elif path == "/metrics":
                self._send(200, "text/plain; version=0.0.4", metrics(dashboard.status()).encode())
            elif path == "/healthz":
                ok = dashboard.fresh()
                self._send(200 if ok else 503, "text/plain", b"ok\n" if ok else b"stale: no update for 5 s\n")
            elif (match := _HIGHLIGHT.match(path)) is not None:
                jpeg = dashboard.picture(match.group(1))
                if jpeg is None:
                    self._error(404, f"no highlight yet for camera {match.group(1)!r}")
                else:
                    self._send(200, "image/jpeg", jpeg)
            else:
                self._error(404, f"no such page: {path}")

        def _error(self, code: int, message: str) -> None:
            self._send(code, "application/json", json.dumps({"error": message}).encode())

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("dashboard %s: " + format, self.address_string(), *args)

    return Handler
