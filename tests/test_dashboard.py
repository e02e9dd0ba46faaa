"""The dashboard's HTTP server: real sockets on loopback, what each endpoint answers; and
`stream-service dashboard` as a process fed by a real verdict PUB socket.

The page itself is checked in a real browser against a real pipeline in tests/test_pipeline_e2e.py.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_service.errors import ConfigError
from stream_service.runtime.journal import Journal, JournalReader, replay_handler
from stream_service.settings import JournalSettings
from stream_service.web.dashboard import Dashboard
from stream_service.web.prometheus import CONTENT_TYPE
from stream_service.wire.messages import Verdict, VerdictIds, highlight_header, topic_of, utc_time
from stream_service.wire.replay import error_text
from stream_service.wire.transport import FrameSender, ReplyServer

pytestmark = pytest.mark.timeout(60)

SNAPSHOT: dict[str, Any] = {
    "elapsed_s": 12.0,
    "verdicts": 40,
    "model": "soartc-vit 3",
    "cameras": {"cam0": {"fps": 9.5, "passed": 25, "failed": 15, "dropped": 2, "missed": 0, "last_seq": 41}},
    "latency_ms": {
        "infer": {"p50": 22.0, "p99": 40.5, "count": 40},
        "end_to_end": {"p50": 41.0, "p99": 80.25, "count": 40},
    },
    "processes": [
        {
            "name": "infer",
            "state": "running",
            "pid": 10,
            "restarts": 1,
            "in_per_s": 9.5,
            "dropped": 0,
            "rejected": 0,
            "errors": 0,
        },
    ],
}


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.fixture
def dashboard() -> Iterator[Dashboard]:
    served = Dashboard("127.0.0.1", 0)
    yield served
    served.close()


def test_status_is_the_latest_snapshot_with_one_history_point_a_publish(
    dashboard: Dashboard, make_verdict: Callable[..., Verdict]
) -> None:
    code, kind, body = get(dashboard.url + "api/status")
    assert (code, kind, json.loads(body)["verdicts"]) == (200, "application/json", 0)  # before the first publish
    for i, e2e in enumerate([30.0, 40.0, 50.0, 400.0]):  # one slow frame in this second
        dashboard.verdict(make_verdict(seq=i, latency_ms={"end_to_end": e2e}))
    dashboard.publish(SNAPSHOT, now=1000.0)
    dashboard.publish(SNAPSHOT | {"verdicts": 50}, now=1001.0)  # no verdict in that second
    status = json.loads(get(dashboard.url + "api/status")[2])
    assert status["verdicts"] == 50 and status["cameras"]["cam0"]["failed"] == 15
    first, second = status["history"]
    assert (first["t"], first["fps"], first["verdicts"], first["e2e_p50"]) == (1000.0, 9.5, 4, 45.0)
    assert 300.0 < first["e2e_p99"] < 400.0  # the spike shows in its own second, not smoothed over minutes
    assert second == {"t": 1001.0, "fps": 9.5, "verdicts": 0, "e2e_p50": None, "e2e_p99": None}


def test_history_is_bounded() -> None:
    served = Dashboard("127.0.0.1", 0, history_s=3)
    try:
        for t in range(10):
            served.publish(SNAPSHOT, now=float(t))
        assert [p["t"] for p in served.status()["history"]] == [7.0, 8.0, 9.0]
    finally:
        served.close()


def test_highlights_are_served_per_camera(dashboard: Dashboard) -> None:
    code, _, body = get(dashboard.url + "api/highlight/cam0.jpg")
    assert code == 404 and "no highlight yet for camera 'cam0'" in json.loads(body)["error"]
    dashboard.highlight("cam0", b"\xff\xd8jpeg bytes\xff\xd9")
    assert get(dashboard.url + "api/highlight/cam0.jpg") == (200, "image/jpeg", b"\xff\xd8jpeg bytes\xff\xd9")
    assert json.loads(get(dashboard.url + "api/status")[2])["highlights"] == ["cam0"]
    assert get(dashboard.url + "api/highlight/../../etc/passwd.jpg")[0] == 404


def test_page_metrics_health_and_unknown_paths(dashboard: Dashboard, make_verdict: Callable[..., Verdict]) -> None:
    code, kind, page = get(dashboard.url)
    assert (code, kind) == (200, "text/html; charset=utf-8") and b"/api/status" in page
    dashboard.verdict(make_verdict(seq=1, verdict="fail", latency_ms={"end_to_end": 80.25}), missed=2)
    dashboard.publish(SNAPSHOT)
    code, kind, text = get(dashboard.url + "metrics")
    assert code == 200 and kind == CONTENT_TYPE and kind.startswith("text/plain")
    lines = text.decode().splitlines()
    assert 'stream_service_verdicts_total{camera="cam0",verdict="fail"} 1.0' in lines
    assert 'stream_service_latency_seconds_sum{camera="cam0",stage="end_to_end"} 0.08025' in lines
    assert 'stream_service_subscriber_missed_verdicts_total{camera="cam0"} 2.0' in lines
    assert get(dashboard.url + "healthz")[:1] == (200,)
    dashboard._published = time.monotonic() - 60  # the run loop stopped publishing
    assert get(dashboard.url + "healthz")[0] == 503
    code, _, body = get(dashboard.url + "nothing-here")
    assert code == 404 and json.loads(body) == {"error": "no such page: /nothing-here"}


def test_a_taken_port_is_a_config_error_naming_the_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ConfigError, match=rf"dashboard.port: expected a free port on 127.0.0.1, found {port} taken"
        ):
            Dashboard("127.0.0.1", port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_dashboard_command_serves_verdicts_published_by_a_pipeline_elsewhere(
    tmp_path: Path, make_verdict: Callable[..., Verdict]
) -> None:
    pub, http = free_port(), free_port()
    config = tmp_path / "line.yaml"
    config.write_text(
        json.dumps(
            {
                "cameras": [{"id": "left", "source": {"kind": "synthetic"}}],
                "transport": {"verdicts_pub": f"tcp://127.0.0.1:{pub}"},
                "dashboard": {"enabled": True, "host": "127.0.0.1", "port": http},
            }
        )
    )
    url = f"http://127.0.0.1:{http}/"
    publisher = FrameSender(f"tcp://127.0.0.1:{pub}", kind="pub", bind=True, hwm=100, linger_ms=0)
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_service.cli", "dashboard", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, seq, status = time.monotonic() + 30, 0, {}
        while time.monotonic() < deadline:
            verdict = make_verdict(
                "left",
                seq,
                capture_ns=time.time_ns(),
                verdict="fail" if seq % 2 else "pass",
                score=0.9 if seq % 2 else 0.1,
                model_id="soartc-vit",
                model_version="3",
                latency_ms={"end_to_end": 20.0 + seq % 5},
            )
            jpeg = b"\xff\xd8" + bytes([seq % 256]) + b"\xff\xd9"
            publisher.send(topic_of(verdict), verdict)
            header = highlight_header(verdict, jpeg)
            publisher.send(topic_of(header), header, [jpeg])
            seq += 1
            time.sleep(0.05)
            try:
                status = json.loads(get(url + "api/status")[2])
            except OSError:
                continue  # not listening yet
            if status.get("verdicts", 0) >= 10 and status.get("highlights") == ["left"]:
                break
        assert status.get("verdicts", 0) >= 10, status
        left = status["cameras"]["left"]
        assert left["passed"] + left["failed"] == status["verdicts"] and status["model"] == "soartc-vit 3"
        assert 20.0 <= status["latency_ms"]["end_to_end"]["p50"] <= 24.0 and status["processes"] == []
        code, kind, picture = get(url + "api/highlight/left.jpg")
        assert (code, kind, picture[:2]) == (200, "image/jpeg", b"\xff\xd8")
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=15)[0]
        publisher.close()
    assert process.returncode == 0, output
    assert f"dashboard on {url}" in output


# -- on a line network ------------------------------------------------------------------------------------------
def request(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    """GET ``url`` with ``headers`` (no redirects followed); (status, headers, body)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


TOKEN = "line-7-secret-token-0123"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def guarded() -> Iterator[Dashboard]:
    from stream_service.web.access import AccessPolicy

    token = "line-7-secret-token-0123"
    board = Dashboard(
        "127.0.0.1", 0, access=AccessPolicy("127.0.0.1", ["inspect.line7.local"], token), request_timeout_s=0.5
    )
    board.publish(SNAPSHOT)
    try:
        yield board
    finally:
        board.close()


@pytest.mark.parametrize(
    ("host", "code"),
    [("127.0.0.1", 200), ("localhost:8080", 200), ("inspect.line7.local", 200), ("evil.example", 421), ("", 421)],
)
def test_only_this_dashboards_names_are_answered(guarded: Dashboard, host: str, code: int) -> None:
    status, _, body = request(
        guarded.url + "api/status", {"Host": host, "Authorization": "Bearer line-7-secret-token-0123"}
    )
    assert status == code, body
    if code == 421:
        assert b"dashboard.allowed_hosts" in body


def test_the_token_is_needed_and_a_first_visit_keeps_it_in_a_cookie(guarded: Dashboard) -> None:
    assert request(guarded.url + "api/status")[0] == 401
    assert request(guarded.url + "api/status", {"Authorization": "Bearer wrong-token-of-some-length"})[0] == 401
    assert request(guarded.url + "metrics", BEARER)[0] == 200
    status, headers, _ = request(guarded.url + f"?token={TOKEN}")
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    assert request(guarded.url + "api/status", {"Cookie": cookie})[0] == 200
    code, _, body = request(guarded.url + "healthz")  # open to probes, but says only whether all is well
    assert code in (200, 503) and set(json.loads(body)) == {"ok"}


def test_answers_carry_security_headers_and_no_version_banner(guarded: Dashboard) -> None:
    _, headers, _ = request(guarded.url, BEARER)
    assert headers["Server"] == "stream-service" and "Python" not in headers["Server"]
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


def test_a_silent_client_is_disconnected_and_a_vanished_one_is_not_an_error(
    guarded: Dashboard, caplog: pytest.LogCaptureFixture
) -> None:
    port = int(guarded.url.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
        started = time.monotonic()
        assert silent.recv(1024) == b""  # closed by the server after request_timeout_s
        assert time.monotonic() - started < 4
    for _ in range(20):  # ask and hang up at once
        with socket.create_connection(("127.0.0.1", port), timeout=5) as rude:
            rude.sendall(
                b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer line-7-secret-token-0123\r\n\r\n"
            )
    time.sleep(0.5)
    assert request(guarded.url + "metrics", BEARER)[0] == 200
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelname == "ERROR"]


def test_api_verdicts_replays_the_journal_of_an_infer_stage_on_another_host(
    tmp_path: Path, make_verdict: Callable[..., Verdict]
) -> None:
    """`stream-service dashboard` asks the journal over transport.journal_rep, as from another host: here the
    journal and its replay server run in this process, the dashboard in its own."""
    pub, rep, http = free_port(), free_port(), free_port()
    settings = JournalSettings(path=tmp_path / "journal.sqlite", replay_limit=50)
    journal, reader, ids = Journal(settings), JournalReader(settings), VerdictIds()
    made = []
    for seq in range(30):
        t_ns = time.time_ns() + seq * 1_000_000
        made.append(make_verdict(f"cam{seq % 2}", seq, verdict_id=ids.new(t_ns), time=utc_time(t_ns)))
        journal.append(made[-1])
    server = ReplyServer(
        f"tcp://127.0.0.1:{rep}",
        replay_handler(reader, 50),
        error_text,
        max_request_bytes=4096,
        linger_ms=0,
        poll_ms=50,
    )
    server.start()
    config = tmp_path / "line.yaml"
    config.write_text(
        json.dumps(
            {
                "cameras": [{"id": "cam0", "source": {"kind": "synthetic"}}],
                "transport": {"verdicts_pub": f"tcp://127.0.0.1:{pub}", "journal_rep": f"tcp://127.0.0.1:{rep}"},
                "journal": {"replay_limit": 50, "replay_timeout_ms": 3000},
                "dashboard": {"enabled": True, "host": "127.0.0.1", "port": http},
            }
        )
    )
    url = f"http://127.0.0.1:{http}/api/verdicts"
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_service.cli", "dashboard", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                code, kind, body = get(url + "?limit=10")
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "the dashboard did not start"
                time.sleep(0.2)
        page = json.loads(body)
        assert (code, kind) == (200, "application/json") and page["more"] is True
        assert [v["verdict_id"] for v in page["verdicts"]] == [v.verdict_id for v in made[:10]]
        assert page["next"] == made[9].verdict_id
        code, _, body = get(f"{url}?camera=cam1&since={page['next']}&limit=50")
        rest = json.loads(body)
        assert code == 200 and rest["more"] is False and rest["next"] is None
        assert [Verdict.model_validate(v) for v in rest["verdicts"]] == made[11::2]
        code, _, body = get(f"{url}?since={made[20].time}")
        assert [v["verdict_id"] for v in json.loads(body)["verdicts"]][:1] == [made[20].verdict_id]
        for query, status, message in [
            ("since=01a23768-5eba-72a1-8876-7a619778c6d2", 400, "since: expected the verdict_id of a verdict"),
            ("since=yesterday", 400, "since: expected a verdict_id (UUIDv7) or an ISO 8601 time"),
            ("limit=0", 400, "limit: expected an integer from 1 to 50, found '0'"),
            ("limit=500", 400, "limit: expected an integer from 1 to 50, found '500'"),
            ("cam=cam0", 400, "query parameters: expected camera, since and limit, found ['cam']"),
        ]:
            code, _, body = get(f"{url}?{query}")
            assert code == status and message in json.loads(body)["error"], body
        server.close()  # the infer stage is gone: 503, naming the endpoint
        code, _, body = get(url)
        assert code == 503 and f"request to tcp://127.0.0.1:{rep}" in json.loads(body)["error"]
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=15)[0]
        server.close()
        reader.close()
        journal.close()
    assert process.returncode == 0, output
