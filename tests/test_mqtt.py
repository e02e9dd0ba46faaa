"""The MQTT bridge end to end: Debian's mosquitto on a free loopback port, the pipeline under `stream-service run`
with `bridges.mqtt` configured (real processes), a paho subscriber with a persistent session.

Every verdict arrives on ``{prefix}/{camera}/verdict``, valid against schemas/verdict.v1.json, highlight JPEGs on
``{prefix}/{camera}/highlight``; the broker is
stopped for 20 s and started again: every verdict the journal holds from the first received to the last
arrives, once (the outage's verdicts replayed from the journal); the retained status is ``offline`` once the
bridge is killed. Against a journaled publisher: a SIGKILLed bridge resumes after its acknowledged verdict, logs
in with a password (a wrong one sends nothing), and speaks TLS with a client certificate. Skipped when mosquitto is
not installed, unless STREAM_SERVICE_REQUIRE_MQTT=1 (.ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "stream_service.cli"]
STARTUP_S = 240.0  # imports, model load and JIT on a loaded 2-core machine
OUTAGE_S = 20.0
PREFIX = "line1"

paho = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is missing: pip install 'stream-service[mqtt]'")
# Debian installs the broker as /usr/sbin/mosquitto, outside a plain user's PATH.
MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "mosquitto_passwd"
_MISSING = MOSQUITTO is None or shutil.which("mosquitto_sub") is None
if _MISSING and os.environ.get("STREAM_SERVICE_REQUIRE_MQTT") == "1":
    raise RuntimeError("STREAM_SERVICE_REQUIRE_MQTT=1 but mosquitto or mosquitto_sub is not installed (apt: mosquitto)")
pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.slow,
    pytest.mark.skipif(
        _MISSING, reason="mosquitto and mosquitto_sub are not installed (apt: mosquitto mosquitto-clients)"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """A mosquitto process on loopback ``port``, persistent (sessions and retained messages survive a restart)."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    users: dict[str, str] = field(default_factory=dict)  # set: only these users may connect
    tls: dict[str, Path] | None = None  # set: TLS only, a client certificate signed by tls["ca"] required

    def start(self) -> None:
        conf = self.directory / "mosquitto.conf"
        access = ["allow_anonymous true"]
        if self.users:
            passwords = self.directory / "passwords"
            passwords.write_text("")
            for user, password in self.users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwords), user, password], check=True)
            access = ["allow_anonymous false", f"password_file {passwords}"]
        if self.tls is not None:
            access += [
                f"cafile {self.tls['ca']}",
                f"certfile {self.tls['server']}",
                f"keyfile {self.tls['server_key']}",
            ]
            access.append("require_certificate true")
        lines = [f"listener {self.port} 127.0.0.1", *access, "persistence true"]
        lines += [f"persistence_location {self.directory}/", f"log_dest file {self.directory}/mosquitto.log"]
        if os.geteuid() == 0:
            lines.append("user root")  # as root mosquitto would switch to the user 'mosquitto', who cannot write here
        conf.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            [str(MOSQUITTO), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert self.process.poll() is None, (self.directory / "mosquitto.log").read_text()
                assert time.monotonic() < deadline, "mosquitto did not listen within 10 s"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # mosquitto saves its database on SIGTERM
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    directory = tmp_path / "mosquitto"
    directory.mkdir()
    b = Broker(directory, free_port())
    b.start()
    try:
        yield b
    finally:
        b.stop()


@dataclass
class Listener:
    """A paho subscriber with a persistent session (clean_session=False): what arrives while it reconnects waits."""

    port: int
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # first deliveries (DUP flag clear)
    redelivered: list[str] = field(default_factory=list)  # the broker's retransmissions (DUP set) to this listener
    statuses: list[str] = field(default_factory=list)
    highlights: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    client: Any = None
    login: tuple[str, str] | None = None
    tls: dict[str, Path] | None = None

    def start(self) -> None:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="test-listener", clean_session=False)
        client.reconnect_delay_set(0.2, 1.0)
        if self.login is not None:
            client.username_pw_set(*self.login)
        if self.tls is not None:
            client.tls_set(str(self.tls["ca"]), str(self.tls["client"]), str(self.tls["client_key"]))

        def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if not reason.is_failure:
                c.subscribe([(f"{PREFIX}/+/verdict", 1), (f"{PREFIX}/+/status", 1), (f"{PREFIX}/+/highlight", 0)])

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            with self.lock:
                if msg.topic.endswith("/verdict") and msg.dup:
                    self.redelivered.append(json.loads(msg.payload)["verdict_id"])
                elif msg.topic.endswith("/verdict"):
                    self.verdicts.append(json.loads(msg.payload))
                elif msg.topic.endswith("/highlight"):
                    self.highlights.append(bytes(msg.payload))
                else:
                    self.statuses.append(msg.payload.decode())

        client.on_connect, client.on_message = on_connect, on_message
        client.connect_async("127.0.0.1", self.port, keepalive=5)
        client.loop_start()
        self.client = client

    def ids(self) -> list[str]:
        with self.lock:
            return [v["verdict_id"] for v in self.verdicts]

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


def wait_for(what: str, test: Callable[[], bool], timeout_s: float, alive: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout_s
    while not test():
        assert alive.poll() is None, f"{alive.args} exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(0.2)


def journal_ids(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT verdict_id FROM verdicts ORDER BY id")]


def test_the_bridge_delivers_every_verdict_once_across_a_broker_outage_and_leaves_offline_when_killed(
    tmp_path: Path, broker: Broker
) -> None:
    import jsonschema
    from test_pipeline_e2e import MODEL_DIR, write_config

    if not (MODEL_DIR / "model.onnx").is_file():
        pytest.skip(f"the bundled model is missing ({MODEL_DIR})")
    config, _endpoints = write_config(tmp_path, fps=6, defect_rate=0.5, restart_backoff_s=3.0)
    settings = json.loads(config.read_text())
    state = tmp_path / "bridge-state.json"
    settings["bridges"] = {
        "mqtt": {
            "port": broker.port,
            "prefix": PREFIX,
            "client_id": "bridge-test",
            "state_path": str(state),
            "reconnect_backoff_s": 0.2,
            "reconnect_backoff_max_s": 1.0,
            "connect_timeout_s": 2.0,
            "highlights": True,
        }
    }
    settings["health"] = {"status_every_s": 1.0}
    config.write_text(json.dumps(settings))
    schema = json.loads((REPO / "schemas" / "verdict.v1.json").read_text())
    listener = Listener(broker.port)
    listener.start()
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [*CLI, "run", "--config", str(config), "--run-dir", str(run_dir), "--summary-every", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for("10 verdicts over MQTT", lambda: len(listener.ids()) >= 10, STARTUP_S, process)
        wait_for("the camera's status online", lambda: "online" in listener.statuses, 30, process)
        broker.stop()
        stopped = time.time_ns()
        time.sleep(OUTAGE_S)
        restarted = time.time_ns()
        broker.start()
        during = [v for v in journal_ids(tmp_path / "journal.sqlite") if v not in set(listener.ids())]
        assert len(during) >= 0.5 * OUTAGE_S, f"only {len(during)} verdicts were made while the broker was down"
        wait_for("the outage's verdicts", lambda: set(during) <= set(listener.ids()), 60, process)
        wait_for("20 live verdicts more", lambda: len(listener.ids()) >= len(during) + 30, 60, process)

        received = listener.ids()
        journal = journal_ids(tmp_path / "journal.sqlite")
        first, last = min(journal.index(v) for v in received), max(journal.index(v) for v in received)
        assert sorted(received) == sorted(journal[first : last + 1]), "a verdict is missing or came twice"
        assert len(set(received)) == len(received)
        # A DUP retransmission is the broker resending its own PUBLISH to this listener (its PUBACK was cut by
        # the broker's stop): the same message, never a second one from the bridge.
        assert set(listener.redelivered) <= set(received)
        for verdict in listener.verdicts:
            jsonschema.validate(verdict, schema)
        times = [v["time"] for v in listener.verdicts if v["verdict_id"] in during]
        assert times == sorted(times)  # replayed in order
        assert any(stopped < _ns(t) < restarted for t in times)
        assert json.loads(state.read_text())["acked"] >= during[-1]
        assert listener.highlights and all(h[:2] == b"\xff\xd8" and h[-2:] == b"\xff\xd9" for h in listener.highlights)

        bridge = json.loads((run_dir / "bridge-mqtt.json").read_text())
        os.kill(bridge["pid"], signal.SIGKILL)
        wait_for("the will", lambda: listener.statuses[-1:] == ["offline"], 30, process)
        retained = subprocess.run(
            ["mosquitto_sub", "-p", str(broker.port), "-t", f"{PREFIX}/cam0/status", "-C", "1", "-W", "5"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert retained.stdout.strip() == "offline", retained
    finally:
        listener.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert process.returncode == 0, process.stdout.read()[-3000:] if process.stdout else ""


def _ns(text: str) -> int:
    from stream_service.wire.messages import parse_utc_time

    return parse_utc_time(text)


@pytest.fixture
def journaled(make_verdict: Callable[..., Any], journaled_line: Callable[..., Any]) -> tuple[str, str, Path]:
    """An infer stage's outside (conftest.journaled_line): verdicts of cam0 journaled, then published, every
    20 ms, the journal served on REP; (verdicts endpoint, journal endpoint, journal file)."""
    from stream_service.wire.messages import VerdictIds, utc_time

    ids = VerdictIds()

    def verdict_of(seq: int) -> Any:
        now = time.time_ns()
        return make_verdict("cam0", seq, verdict_id=ids.new(now), time=utc_time(now))

    line = journaled_line(verdict_of, 0.02)
    return line.pub, line.rep, Path(line.settings.path)


def test_a_killed_bridge_resumes_after_the_acknowledged_verdict_and_logs_in_with_its_password(
    tmp_path: Path, journaled: tuple[str, str, Path]
) -> None:
    pub, rep, journal = journaled
    directory = tmp_path / "mosquitto"
    directory.mkdir()
    users = {"bridge": "bridge-secret", "listener": "listener-secret"}
    broker = Broker(directory, free_port(), users=users)
    broker.start()
    state = tmp_path / "state.json"
    mqtt = {"port": broker.port, "prefix": PREFIX, "client_id": "bridge-resume", "state_path": str(state)}
    config = tmp_path / "bridge.yaml"

    def bridge(password: str) -> subprocess.Popen[bytes]:
        config.write_text(
            json.dumps(
                {
                    "cameras": [{"id": "cam0", "source": {"kind": "synthetic"}}],
                    "transport": {"verdicts_pub": pub, "journal_rep": rep},
                    "bridges": {"mqtt": mqtt | {"username": "bridge", "password": password, "connect_timeout_s": 2}},
                }
            )
        )
        with (tmp_path / "bridge.log").open("ab") as log:
            return subprocess.Popen([*CLI, "bridge", "mqtt", "--config", str(config)], stdout=log, stderr=log)

    listener = Listener(broker.port, login=("listener", "listener-secret"))
    listener.start()
    processes = [bridge("wrong-password")]
    try:
        time.sleep(5.0)
        assert listener.ids() == [] and not state.exists()  # refused by the broker: nothing went out
        assert "not authori" in (tmp_path / "bridge.log").read_text().lower()  # and it says why, retrying
        processes[0].kill()
        processes[0].wait()
        processes.append(bridge("bridge-secret"))
        wait_for("40 verdicts", lambda: len(listener.ids()) >= 40, 120, processes[-1])
        processes[-1].kill()  # SIGKILL: no goodbye; its state file holds the last acknowledged verdict
        processes[-1].wait()
        acked = json.loads(state.read_text())["acked"]
        time.sleep(3.0)  # verdicts go on into the journal while no bridge runs
        processes.append(bridge("bridge-secret"))
        wait_for("the verdicts of the gap", lambda: len(listener.ids()) >= 40 + 150, 120, processes[-1])
        received = listener.ids()
        ids = journal_ids(journal)
        assert acked in received
        first, last = min(ids.index(v) for v in received), max(ids.index(v) for v in received)
        assert sorted(received) == sorted(ids[first : last + 1]), "a verdict is missing or came twice"
        assert set(listener.redelivered) <= set(received)
    finally:
        listener.close()
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(20)
        broker.stop()


def certificates(directory: Path) -> dict[str, Path]:
    """A test CA (openssl) and a server and a client certificate it signed, for 127.0.0.1."""

    def openssl(args: str) -> None:
        subprocess.run(["openssl", *args.split()], check=True, capture_output=True, cwd=directory)

    openssl("req -x509 -newkey rsa:2048 -nodes -days 2 -keyout ca.key -out ca.pem -subj /CN=test-ca")
    for name in ("server", "client"):
        (directory / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl(f"req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name}")
        openssl(
            f"x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -out {name}.pem "
            f"-extfile {name}.ext"
        )
    paths = {"ca": "ca.pem", "server": "server.pem", "server_key": "server.key"}
    paths |= {"client": "client.pem", "client_key": "client.key"}
    return {k: directory / v for k, v in paths.items()}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed (to make test certificates)")
def test_the_bridge_speaks_tls_with_a_client_certificate(tmp_path: Path, journaled: tuple[str, str, Path]) -> None:
    pub, rep, journal = journaled
    tls = certificates(tmp_path)
    directory = tmp_path / "mosquitto"
    directory.mkdir()
    broker = Broker(directory, free_port(), tls=tls)
    broker.start()
    listener = Listener(broker.port, tls=tls)
    listener.start()
    mqtt = {"port": broker.port, "prefix": PREFIX, "state_path": str(tmp_path / "state.json")}
    mqtt |= {"ca_file": str(tls["ca"]), "cert_file": str(tls["client"]), "key_file": str(tls["client_key"])}
    config = tmp_path / "bridge.yaml"
    cameras = [{"id": "cam0", "source": {"kind": "synthetic"}}]
    config.write_text(
        json.dumps(
            {"cameras": cameras, "transport": {"verdicts_pub": pub, "journal_rep": rep}, "bridges": {"mqtt": mqtt}}
        )
    )
    log = tmp_path / "bridge.log"
    with log.open("wb") as out:
        process = subprocess.Popen([*CLI, "bridge", "mqtt", "--config", str(config)], stdout=out, stderr=out)
    try:
        wait_for("10 verdicts over TLS", lambda: len(listener.ids()) >= 10, 120, process)
        assert set(listener.ids()) <= set(journal_ids(journal))
        plain = subprocess.run(  # the same port without TLS: refused (the broker speaks TLS only)
            ["mosquitto_sub", "-p", str(broker.port), "-t", f"{PREFIX}/#", "-C", "1", "-W", "3"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert plain.returncode != 0 and not plain.stdout
    finally:
        listener.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(20)
        broker.stop()
    assert process.returncode == 0, log.read_text()[-3000:]
