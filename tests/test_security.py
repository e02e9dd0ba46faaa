"""CURVE on every tcp hop: keys, who is admitted, impostors, plaintext refused off this host; owner-only files.

Real ZeroMQ sockets on loopback with free ports. CURVE is a per-process setting read when a socket is
opened (``transport.use_curve``), so one test opens a server with the pipeline's keys and clients with
other keys, or none, one after the other.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_service.errors import ConfigError
from stream_service.settings import load_settings
from stream_service.wire.messages import FrameHeader, Verdict
from stream_service.wire.transport import CurveKeys, FrameReceiver, FrameSender, generate_keys, use_curve

CLI = [sys.executable, "-m", "stream_service.cli"]
pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[CurveKeys]:
    generate_keys(tmp_path / "keys")
    try:
        yield CurveKeys.load(tmp_path / "keys")
    finally:
        use_curve(None)


def stranger(tmp_path: Path, name: str) -> CurveKeys:
    """Keys of someone else: another pipeline's server pair and client pair, in no one's authorized/."""
    generate_keys(tmp_path / name)
    return CurveKeys.load(tmp_path / name)


def received(receiver: FrameReceiver, within_s: float) -> list[object]:
    got, deadline = [], time.monotonic() + within_s
    while time.monotonic() < deadline:
        if (message := receiver.receive(0.1)) is not None:
            got.append(message.header)
    return got


def test_generated_keys_are_owner_only_and_never_overwritten(tmp_path: Path) -> None:
    made = generate_keys(tmp_path / "keys")
    assert {p.name for p in made} == {"server.key", "server.key_secret", "client.key", "client.key_secret"} | {
        "client.key"
    }
    for secret in (tmp_path / "keys").glob("*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert (tmp_path / "keys" / "authorized" / "client.key").is_file()
    with pytest.raises(ConfigError, match="expected one without keys"):
        generate_keys(tmp_path / "keys")
    with pytest.raises(ConfigError, match=r"client\.key_secret"):
        (tmp_path / "keys" / "client.key_secret").unlink()
        CurveKeys.load(tmp_path / "keys")


def test_only_authorized_clients_that_pin_the_server_get_verdicts(
    keys: CurveKeys, tmp_path: Path, make_verdict: object
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    use_curve(keys)
    publisher = FrameSender(endpoint, kind="pub", hwm=100, linger_ms=0)
    friend = FrameReceiver(endpoint, kind="sub", topics=["verdicts."], hwm=100, linger_ms=0)
    other = stranger(tmp_path, "other")
    use_curve(CurveKeys(keys.server_public, None, other.client_public, other.client_secret, other.authorized))
    unknown = FrameReceiver(endpoint, kind="sub", topics=["verdicts."], hwm=100, linger_ms=0)
    use_curve(None)
    plaintext = FrameReceiver(endpoint, kind="sub", topics=["verdicts."], hwm=100, linger_ms=0)
    try:
        time.sleep(0.5)  # handshakes (and refusals) done
        for seq in range(20):
            publisher.send("verdicts.cam0", make_verdict("cam0", seq))  # type: ignore[operator]
            time.sleep(0.01)
        assert len([h for h in received(friend, 1.0) if isinstance(h, Verdict)]) == 20
        assert received(unknown, 0.3) == [] and received(plaintext, 0.3) == []
    finally:
        for sock in (publisher, friend, unknown, plaintext):
            sock.close()


def test_an_impostor_bound_on_the_port_during_a_restart_is_ignored(
    keys: CurveKeys, tmp_path: Path, make_verdict: object
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    use_curve(keys)
    subscriber = FrameReceiver(endpoint, kind="sub", topics=["verdicts."], hwm=100, linger_ms=0)
    impostor_keys = stranger(tmp_path, "impostor")  # it has everything but the pipeline's server secret
    use_curve(impostor_keys)
    impostor = FrameSender(endpoint, kind="pub", hwm=100, linger_ms=0)
    sink = FrameSender(f"tcp://127.0.0.1:{free_port()}", kind="push", hwm=10, linger_ms=0)
    try:
        time.sleep(0.5)
        for seq in range(10):
            impostor.send("verdicts.cam0", make_verdict("cam0", seq, verdict="pass"))  # type: ignore[operator]
            time.sleep(0.01)
        assert received(subscriber, 1.0) == []
    finally:
        for sock in (subscriber, impostor, sink):
            sock.close()


def test_frames_pushed_without_an_authorized_key_are_not_accepted(keys: CurveKeys, tmp_path: Path) -> None:
    import numpy as np

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    use_curve(keys)
    pull = FrameReceiver(endpoint, bind=True, hwm=10, linger_ms=0)
    other = stranger(tmp_path, "other")
    use_curve(CurveKeys(keys.server_public, None, other.client_public, other.client_secret, other.authorized))
    forger = FrameSender(endpoint, bind=False, hwm=10, linger_ms=0)
    use_curve(keys)
    camera = FrameSender(endpoint, bind=False, hwm=10, linger_ms=0)
    frame = np.zeros((4, 4), np.uint8)
    try:
        time.sleep(0.5)
        for seq in range(5):
            forger.send(
                "frames.cam0",
                FrameHeader(camera_id="cam0", seq=seq, capture_ns=0, shape=(4, 4), dtype="uint8"),
                [frame],
            )
        camera.send(
            "frames.cam0", FrameHeader(camera_id="cam0", seq=99, capture_ns=0, shape=(4, 4), dtype="uint8"), [frame]
        )
        got = [h.seq for h in received(pull, 1.0) if isinstance(h, FrameHeader)]
        assert got == [99]
    finally:
        for sock in (pull, forger, camera):
            sock.close()


@pytest.mark.parametrize(
    ("security", "ok"),
    [({}, False), ({"allow_plaintext": True}, True), ({"keys": "/etc/stream-service/keys"}, True)],
)
def test_an_endpoint_off_this_host_needs_keys_or_an_explicit_plaintext(
    tmp_path: Path, security: dict[str, object], ok: bool
) -> None:
    config = tmp_path / "line.yaml"
    config.write_text(
        json.dumps(
            {
                "cameras": [{"id": "cam0", "source": {"kind": "synthetic"}}],
                "transport": {"verdicts_pub": "tcp://0.0.0.0:57300"},
                "security": security,
            }
        )
    )
    if ok:
        load_settings(config, {})
    else:
        with pytest.raises(
            ConfigError, match=r"security\.keys: expected a keys folder .* found 'tcp://0\.0\.0\.0:57300"
        ):
            load_settings(config, {})


def test_keys_generate_on_the_command_line(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "keys", "generate", str(tmp_path / "k")], capture_output=True, text=True)
    assert done.returncode == 0 and str(tmp_path / "k" / "server.key_secret") in done.stdout
    again = subprocess.run([*CLI, "keys", "generate", str(tmp_path / "k")], capture_output=True, text=True)
    assert again.returncode == 1 and "expected one without keys" in again.stderr


@pytest.mark.timeout(300)
def test_a_keyed_pipeline_serves_keyed_subscribers_only_and_keeps_its_files_to_its_user(tmp_path: Path) -> None:
    generate_keys(tmp_path / "keys")
    capture, features, verdicts = free_port(), free_port(), free_port()
    config = tmp_path / "line.yaml"
    config.write_text(
        json.dumps(
            {
                "cameras": [{"id": "cam0", "source": {"kind": "synthetic", "width": 256, "height": 256, "fps": 5}}],
                "transport": {
                    "capture_out": [f"tcp://127.0.0.1:{capture}"],
                    "features_out": f"tcp://127.0.0.1:{features}",
                    "verdicts_pub": f"tcp://127.0.0.1:{verdicts}",
                },
                "inference": {"threads": 1},
                "supervisor": {"startup_timeout_s": 200.0},
                "dashboard": {"enabled": False},
                "security": {"keys": str(tmp_path / "keys")},
            }
        )
    )
    run_dir = tmp_path / "run"
    run = subprocess.Popen(
        [*CLI, "run", "--config", str(config), "--run-dir", str(run_dir)], stderr=subprocess.PIPE, text=True
    )
    endpoint = f"tcp://127.0.0.1:{verdicts}"
    try:
        keyed = subprocess.run(
            [*CLI, "subscribe", "--endpoint", endpoint, "--keys", str(tmp_path / "keys"), "--count", "3", "--json"],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert keyed.returncode == 0, keyed.stderr
        assert len([json.loads(line) for line in keyed.stdout.splitlines()]) == 3
        plain = subprocess.run(
            [*CLI, "subscribe", "--endpoint", endpoint, "--count", "1", "--timeout", "4"],
            capture_output=True,
            text=True,
        )
        assert plain.returncode == 1 and "nothing arrived" in plain.stderr
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        for made in [*run_dir.glob("*.log"), *run_dir.glob("*.json")]:
            assert stat.S_IMODE(made.stat().st_mode) & 0o077 == 0, made
    finally:
        run.terminate()
        run.wait(30)
