"""The OPC UA bridge as a process (`stream-service bridge opcua`) against a publisher of verdicts and camera status:
asyncua's client reads the camera's variables by their documented node ids and subscribes to them, and the values
follow the verdict stream; an anonymous client and a wrong password are refused."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_service.wire.messages import CameraStatus, Verdict, VerdictIds, utc_time
from stream_service.wire.transport import FrameSender

asyncua = pytest.importorskip("asyncua", reason="asyncua is missing: pip install 'stream-service[opcua]'")
from asyncua import Client, ua  # noqa: E402

pytestmark = pytest.mark.timeout(300)
CLI = [sys.executable, "-m", "stream_service.cli"]
URI = "urn:stream-service:test-line"
STARTUP_S = 120.0  # asyncua loads the standard address space first: seconds on a loaded machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def publisher(make_verdict: Callable[..., Verdict]) -> Iterator[tuple[str, list[Verdict]]]:
    """Verdicts of cam0 every 50 ms (every third a fail) and its status every 0.5 s; yields the endpoint and
    the verdicts published so far."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    stop, ready = threading.Event(), threading.Event()
    published: list[Verdict] = []
    ids = VerdictIds()

    def publish() -> None:
        with FrameSender(endpoint, kind="pub", hwm=100, linger_ms=0) as pub:
            ready.set()
            for seq in itertools.count():
                if stop.is_set():
                    return
                now = time.time_ns()
                fail = seq % 3 == 0
                v = make_verdict(
                    "cam0",
                    seq,
                    verdict_id=ids.new(now),
                    time=utc_time(now),
                    verdict="fail" if fail else "pass",
                    score=0.8 if fail else 0.1,
                    threshold=0.5,
                )
                pub.send("verdicts.cam0", v)
                published.append(v)
                if seq % 10 == 0:
                    status = CameraStatus(camera_id="cam0", seq=seq, capture_ns=now, state="online", since_ns=now)
                    pub.send("status.cam0", status)
                time.sleep(0.05)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield endpoint, published
    stop.set()
    thread.join(10)


def certificates(directory: Path) -> dict[str, Path]:
    """A self-signed server and client certificate (DER) with their keys (PEM)."""
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    paths = {}
    for role, use in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key, cert = directory / f"{role}-key.pem", directory / f"{role}-cert.der"
        uri = "urn:freeopcua:python:server" if role == "server" else "urn:stream-service:test-client"
        attrs = {"commonName": f"stream-service test {role}"}
        asyncio.run(setup_self_signed_certificate(key, cert, uri, "localhost", [use], attrs))
        paths[f"{role}_key"], paths[f"{role}_cert"] = key, cert
    return paths


@pytest.fixture(params=["plain", "secure"])
def bridge(
    request: pytest.FixtureRequest, publisher: tuple[str, list[Verdict]], tmp_path: Path
) -> Iterator[tuple[str, list[Verdict], dict[str, Path] | None]]:
    """The bridge process on a free port, user plc: with the None endpoint ("plain"), or Basic256Sha256 only
    ("secure"); yields its OPC UA URL, the publisher's verdicts and the certificates (secure)."""
    endpoint, published = publisher
    port = free_port()
    opcua: dict[str, Any] = {"port": port, "namespace_uri": URI, "users": {"plc": "line-one-secret"}}
    certs = certificates(tmp_path) if request.param == "secure" else None
    if certs is not None:
        opcua |= {"certificate": str(certs["server_cert"]), "private_key": str(certs["server_key"])}
        opcua["allow_unencrypted"] = False
    config = tmp_path / "line.yaml"
    config.write_text(
        json.dumps(
            {
                "cameras": [{"id": "cam0", "source": {"kind": "synthetic"}}],
                "transport": {"verdicts_pub": endpoint},
                "bridges": {"opcua": opcua},
            }
        )
    )
    stats, log = tmp_path / "bridge-opcua.json", tmp_path / "bridge-opcua.log"
    with log.open("wb") as out:  # a file, not a pipe nobody reads while the test runs
        process = subprocess.Popen(
            [*CLI, "bridge", "opcua", "--config", str(config), "--stats", str(stats)], stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the OPC UA server did not listen"
                time.sleep(0.2)
        yield f"opc.tcp://127.0.0.1:{port}/stream-service/", published, certs
        process.send_signal(signal.SIGTERM)
        process.wait(20)
        assert process.returncode == 0, log.read_text()[-3000:]
        assert "asyncua.server.address_space" not in log.read_text()  # its INFO flood is kept out of the log
        assert json.loads(stats.read_text())["stage"] == "bridge"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def client(
    url: str, certs: dict[str, Path] | None, user: str | None = "plc", password: str = "line-one-secret"
) -> Client:
    c = Client(url, timeout=10)
    if certs is not None:
        c.application_uri = "urn:stream-service:test-client"
        asyncio.run(
            c.set_security_string(f"Basic256Sha256,SignAndEncrypt,{certs['client_cert']},{certs['client_key']}")
        )
    if user is not None:
        c.set_user(user)
        c.set_password(password)
    return c


async def read_camera(c: Client) -> dict[str, Any]:
    """Every variable of cam0 in one Read request, as a PLC reads a consistent set: separate reads can
    straddle the server's update for the next verdict (Verdict of one, Score of the other)."""
    idx = await c.get_namespace_index(URI)
    names = ["Verdict", "Fail", "Score", "Threshold", "Regions", "VerdictTime", "VerdictId", "Seq"]
    names += ["PassCount", "FailCount", "Online", "State"]
    values = await c.read_values([c.get_node(f"ns={idx};s=cam0.{n}") for n in names])
    return dict(zip(names, values, strict=True))


Bridge = tuple[str, list[Verdict], dict[str, Path] | None]


def test_the_camera_object_follows_the_verdict_stream(bridge: Bridge) -> None:
    url, published, certs = bridge
    secure = client(url, certs)

    async def check() -> None:
        async with secure as c:
            idx = await c.get_namespace_index(URI)
            obj = await c.nodes.objects.get_child([f"{idx}:cam0"])
            assert obj.nodeid == ua.NodeId("cam0", idx)  # the documented node id, found by browsing too
            changes: list[str] = []

            class Handler:
                def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
                    changes.append(value)

            sub = await c.create_subscription(50, Handler())
            await sub.subscribe_data_change(c.get_node(f"ns={idx};s=cam0.VerdictId"))
            deadline = time.monotonic() + 30
            while len([v for v in changes if v]) < 5:
                assert time.monotonic() < deadline, changes
                await asyncio.sleep(0.1)
            by_id = {v.verdict_id: v for v in published}
            assert all(v in by_id for v in changes if v)  # every notification is a published verdict's id
            seqs = [by_id[v].seq for v in changes if v]
            assert seqs == sorted(seqs) and len(set(seqs)) > 3  # in order, following the stream
            await sub.delete()
            for _ in range(20):  # each read a consistent set while verdicts keep coming
                values = await read_camera(c)
                assert values["VerdictId"] in {v.verdict_id for v in published}
                verdict = (values["Verdict"], values["Fail"], values["Score"])
                assert verdict in {("pass", False, 0.1), ("fail", True, 0.8)}, verdict
            assert values["Online"] is True and values["State"] == "online"
            assert values["Threshold"] == 0.5 and values["Regions"] == "[]"
            assert values["PassCount"] + values["FailCount"] >= 5 and values["FailCount"] >= 1
            assert values["VerdictTime"].year >= 2026

    asyncio.run(check())


def test_anonymous_and_wrong_password_clients_are_refused(bridge: Bridge) -> None:
    url, _, certs = bridge

    async def connect(c: Client) -> None:
        async with c:
            await c.nodes.objects.read_browse_name()

    with pytest.raises(ua.UaError, match=r"BadIdentityTokenRejected|BadIdentityTokenInvalid"):
        asyncio.run(connect(client(url, certs, user=None)))
    with pytest.raises(ua.UaError, match=r"BadUserAccessDenied|BadIdentityTokenRejected"):
        asyncio.run(connect(client(url, certs, password="wrong-password")))
    offered = {
        e.SecurityPolicyUri.rsplit("#", 1)[1] for e in asyncio.run(client(url, None).connect_and_get_server_endpoints())
    }
    # security on: only Basic256Sha256 is offered, so a plaintext session cannot even be asked for
    assert offered == ({"Basic256Sha256"} if certs is not None else {"None"})
