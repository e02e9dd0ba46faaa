"""Real ZeroMQ sockets on loopback: tcp, ipc and the shared-memory ring; drops, drains, rejections."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_service.errors import ConfigError, MessageError, TransportError
from stream_service.wire.messages import (
    ArraySpec,
    FeaturesHeader,
    FrameHeader,
    Message,
    Registration,
    Verdict,
    encode,
)
from stream_service.wire.shm_ring import remove_stale_rings
from stream_service.wire.transport import (
    SHM_MARKER,
    FrameReceiver,
    FrameSender,
    ReceiverSet,
    open_socket,
)

pytestmark = pytest.mark.timeout(60)

TIMEOUT_S = 10.0  # generous: the machine may be loaded; a passing test never waits this long


def header(seq: int, camera: str = "cam0", shape: tuple[int, ...] = (48, 64, 3), dtype: str = "uint8") -> FrameHeader:
    return FrameHeader(camera_id=camera, seq=seq, capture_ns=time.time_ns(), shape=shape, dtype=dtype)


def frame(seq: int, shape: tuple[int, ...] = (48, 64, 3), dtype: str = "uint8") -> np.ndarray:
    return (np.arange(int(np.prod(shape))) + seq).astype(dtype).reshape(shape)


def receive(receiver: FrameReceiver) -> Message:
    message = receiver.receive(TIMEOUT_S)
    assert message is not None, "nothing arrived"
    return message


def receive_until(receiver: FrameReceiver, done: Any) -> list[Message]:
    """Messages until ``done(message)``; skips ``None`` polls, fails after TIMEOUT_S."""
    messages: list[Message] = []
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        message = receiver.receive(0.1)
        if message is not None:
            messages.append(message)
            if done(message):
                return messages
    raise AssertionError(f"condition not reached; got {[(m.header.camera_id, m.header.seq) for m in messages]}")


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    # Short path: ipc endpoints are limited to ~107 bytes, and pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="ss-") as directory:
        yield Path(directory)


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request: pytest.FixtureRequest, ipc_dir: Path) -> str:
    return "tcp://127.0.0.1:*" if request.param == "tcp" else f"ipc://{ipc_dir}/frames.ipc"


def pair(endpoint: str, **sender_options: Any) -> tuple[FrameReceiver, FrameSender]:
    receiver = FrameReceiver(endpoint, bind=True, hwm=16, linger_ms=0, max_drain=sender_options.pop("max_drain", 0))
    options = {"hwm": 16, "linger_ms": 0, "send_timeout_ms": -1} | sender_options
    return receiver, FrameSender(receiver.endpoint, bind=False, **options)


def test_frames_round_trip_zero_copy(endpoint: str) -> None:
    receiver, sender = pair(endpoint)
    with receiver, sender:
        assert receiver.endpoint.startswith(endpoint.split(":")[0]) and not receiver.endpoint.endswith("*")
        for seq, (shape, dtype) in enumerate([((48, 64, 3), "uint8"), ((5, 7), "float32"), ((1, 3), "uint16")]):
            assert sender.send("frames.cam0", header(seq, shape=shape, dtype=dtype), [frame(seq, shape, dtype)])
            topic, got, arrays = receive(receiver)
            assert (topic, got.seq, got.dropped) == ("frames.cam0", seq, 0)
            np.testing.assert_array_equal(arrays[0], frame(seq, shape, dtype))
            # A view of ZeroMQ's receive buffer: not owned, not writable.
            assert not arrays[0].flags.owndata and not arrays[0].flags.writeable


def test_features_with_two_arrays_round_trip(endpoint: str) -> None:
    features = FeaturesHeader(
        camera_id="cam0",
        seq=1,
        capture_ns=1,
        shape=(8, 8),
        dtype="uint8",
        arrays=(
            ArraySpec(name="registered", shape=(8, 8), dtype="uint8"),
            ArraySpec(name="grid", shape=(2, 3), dtype="float32"),
        ),
        registration=Registration(dx=1.0, dy=2.0, confidence=0.5),
    )
    receiver, sender = pair(endpoint)
    with receiver, sender:
        grid = np.arange(6, dtype=np.float32).reshape(2, 3)
        sender.send("features.cam0", features, [np.ones((8, 8), np.uint8), grid])
        _, got, arrays = receive(receiver)
        assert got == features
        np.testing.assert_array_equal(arrays[1], grid)


def test_capture_send_never_blocks_and_counts_drops_without_a_receiver() -> None:
    with FrameSender("tcp://127.0.0.1:*", hwm=1, linger_ms=0, send_timeout_ms=0) as sender:
        start = time.monotonic()
        results = [sender.send("frames.cam0", header(seq), [frame(seq)]) for seq in range(50)]
        assert time.monotonic() - start < 5.0  # 50 non-blocking sends; a blocking one would hang
        assert not any(results)
        assert sender.dropped["cam0"] == 50 and sender.sent == 0


def test_capture_drops_on_a_full_queue_and_reports_them_downstream(endpoint: str) -> None:
    big = (256, 256, 3)  # 196 KiB: socket buffers fill after a few frames
    receiver = FrameReceiver(endpoint, bind=True, hwm=1, linger_ms=0)
    with receiver, FrameSender(receiver.endpoint, bind=False, hwm=1, linger_ms=0, send_timeout_ms=0) as sender:
        start = time.monotonic()
        for seq in range(400):
            sender.send("frames.cam0", header(seq, shape=big), [frame(seq, big)])
        assert time.monotonic() - start < 10.0  # never blocked on the receiver that is not reading
        assert sender.dropped["cam0"] > 0
        attempts, messages, final = 400, [], 10_000
        while True:  # a last frame, once the receiver has made room; it carries the drops before it
            attempts += 1
            if sender.send("frames.cam0", header(final, shape=big), [frame(0, big)]):
                break
            if (message := receiver.receive(0.1)) is not None:
                messages.append(message)
        messages += receive_until(receiver, lambda m: m.header.seq >= final)
        assert sender.sent + sender.dropped["cam0"] == attempts
        assert sum(1 + m.header.dropped for m in messages) == attempts  # every frame delivered or reported


def test_drop_oldest_drain_keeps_the_newest_per_camera(endpoint: str) -> None:
    receiver, sender = pair(endpoint, max_drain=64)
    sent = {"a": 0, "b": 0}
    accounted = {"a": 0, "b": 0}
    with receiver, sender:
        for _burst in range(5):  # until one burst was queued at once (almost always the first)
            for camera, count in (("a", 12), ("b", 6)):
                for seq in range(sent[camera], sent[camera] + count):
                    sender.send(f"frames.{camera}", header(seq, camera), [frame(seq)])
                sent[camera] += count
            newest = {camera: n - 1 for camera, n in sent.items()}
            seen: dict[str, int] = {}
            deadline = time.monotonic() + TIMEOUT_S
            while seen != newest and time.monotonic() < deadline:
                message = receiver.receive(0.1)
                if message is not None:
                    camera, seq = message.header.camera_id, message.header.seq
                    assert seq > seen.get(camera, -1)
                    np.testing.assert_array_equal(message.arrays[0], frame(seq))
                    seen[camera] = seq
                    accounted[camera] += 1 + message.header.dropped
            assert seen == newest
            if receiver.dropped["a"]:
                break
    assert receiver.dropped["a"] > 0, "five bursts arrived one message at a time: nothing to drain"
    assert accounted == sent  # each skipped frame is reported in the dropped field of a newer one


def test_malformed_multipart_is_rejected_counted_and_the_receiver_goes_on(endpoint: str) -> None:
    with FrameReceiver(endpoint, bind=True, hwm=16, linger_ms=0) as receiver:
        raw = open_socket("push", receiver.endpoint, bind=False, hwm=16, linger_ms=0)
        try:
            raw.send_multipart([b"frames.cam0", b"{not json"])
            raw.send_multipart([b"frames.cam0" + SHM_MARKER, b"{}", b'{"ring": "../../etc/passwd"}'])
            raw.send_multipart([bytes(p) for p in encode("frames.cam0", header(1), [frame(1)])])
            errors = []
            while True:
                try:
                    message = receive(receiver)
                    break
                except MessageError as exc:
                    errors.append(exc)
            assert message.header.seq == 1
            assert receiver.rejected == {"header json": 1, "shm descriptor": 1}
            assert len(errors) == 2 and "expected" in str(errors[0])
        finally:
            raw.close(linger=0)


def test_sub_receives_only_its_topics(make_verdict: Callable[..., Verdict]) -> None:
    pub = FrameSender("tcp://127.0.0.1:*", kind="pub", hwm=16, linger_ms=0)
    with pub, FrameReceiver(pub.endpoint, kind="sub", topics=["verdicts.cam1"], hwm=16, linger_ms=0) as sub:
        got: list[Verdict] = []
        deadline = time.monotonic() + TIMEOUT_S
        seq = 0
        while not got and time.monotonic() < deadline:  # PUB drops until the subscription has arrived
            for camera in ("cam0", "cam1"):
                pub.send(f"verdicts.{camera}", make_verdict(camera, seq))
            seq += 1
            message = sub.receive(0.05)
            if message is not None:
                assert isinstance(message.header, Verdict)
                got.append(message.header)
        assert got and all(v.camera_id == "cam1" for v in got)


def test_one_receiver_connects_to_several_senders() -> None:
    senders = [FrameSender("tcp://127.0.0.1:*", hwm=16, linger_ms=0, send_timeout_ms=-1) for _ in range(2)]
    with FrameReceiver([s.endpoint for s in senders], hwm=16, linger_ms=0) as receiver:
        for camera, sender in zip(("cam0", "cam1"), senders, strict=True):
            sender.send(f"frames.{camera}", header(0, camera), [frame(0)])
        got = [receive(receiver), receive(receiver)]
        assert sorted(m.header.camera_id for m in got) == ["cam0", "cam1"]
    for sender in senders:
        sender.close()
    with pytest.raises(ConfigError, match="endpoints"):
        FrameReceiver(["tcp://127.0.0.1:*", "tcp://127.0.0.1:*"], bind=True, hwm=1, linger_ms=0)


@pytest.mark.parametrize("endpoint", ["tcp://256.1.1.1:5555", "nonsense://x", "ipc:///no/such/dir/x.ipc"])
def test_socket_errors_become_transport_errors_naming_the_endpoint(endpoint: str) -> None:
    with pytest.raises(TransportError, match="bind pull socket to") as info:
        FrameReceiver(endpoint, bind=True, hwm=1, linger_ms=0)
    assert endpoint in str(info.value)


# --- shared-memory ring --------------------------------------------------------------------------------


@pytest.fixture
def shm_pair(ipc_dir: Path) -> Iterator[tuple[FrameReceiver, FrameSender]]:
    receiver = FrameReceiver(f"ipc://{ipc_dir}/ring.ipc", bind=True, hwm=16, linger_ms=0)
    sender = FrameSender(
        receiver.endpoint, bind=False, hwm=16, linger_ms=0, send_timeout_ms=0, shm_slots=3, shm_slot_bytes=48 * 64 * 3
    )
    with receiver, sender:
        yield receiver, sender


def test_shm_round_trip_is_zero_copy_and_read_only(shm_pair: tuple[FrameReceiver, FrameSender]) -> None:
    receiver, sender = shm_pair
    for seq in range(6):  # two laps of the ring
        assert sender.send("frames.cam0", header(seq), [frame(seq)])
        topic, got, arrays = receive(receiver)
        assert (topic, got.seq, got.dropped) == ("frames.cam0", seq, 0)
        np.testing.assert_array_equal(arrays[0], frame(seq))
        assert not arrays[0].flags.writeable
        del arrays
    small = frame(1, (5, 7), "float32")
    sender.send("frames.cam0", header(9, shape=(5, 7), dtype="float32"), [small])
    np.testing.assert_array_equal(receive(receiver).arrays[0], small)


def test_shm_slot_stays_leased_while_viewed_so_capture_drops(shm_pair: tuple[FrameReceiver, FrameSender]) -> None:
    receiver, sender = shm_pair
    held = []
    for seq in range(3):
        sender.send("frames.cam0", header(seq), [frame(seq)])
        held.append(receive(receiver).arrays[0][10:20])  # a view of a view keeps the slot
    assert not sender.send("frames.cam0", header(3), [frame(3)])  # ring full: dropped, not blocked
    assert sender.dropped["cam0"] == 1
    del held[0]
    gc.collect()
    assert sender.send("frames.cam0", header(4), [frame(4)])
    got = receive(receiver)
    assert (got.header.seq, got.header.dropped) == (4, 1)
    np.testing.assert_array_equal(held[0], frame(1)[10:20])  # the held frames never changed


def test_drained_shm_messages_give_their_slots_back(ipc_dir: Path) -> None:
    receiver = FrameReceiver(f"ipc://{ipc_dir}/d.ipc", bind=True, hwm=16, linger_ms=0, max_drain=8)
    options: dict[str, Any] = {"hwm": 16, "linger_ms": 0, "shm_slots": 3, "shm_slot_bytes": 48 * 64 * 3}
    with receiver, FrameSender(receiver.endpoint, bind=False, **options) as sender:
        assert all(sender.send("frames.cam0", header(seq), [frame(seq)]) for seq in range(3))
        assert not sender.send("frames.cam0", header(3), [frame(3)])  # ring full
        newest = None
        while newest is None or newest.header.seq != 2:
            newest = receive(receiver)  # skipped or freed messages give their slots back
        assert sender.send("frames.cam0", header(4), [frame(4)]) and sender.send("frames.cam0", header(5), [frame(5)])
        got = receive_until(receiver, lambda m: m.header.seq == 5)
        assert sum(1 + m.header.dropped for m in got) == 2 + 1  # 4, 5 and the ring-full drop of 3


def test_shm_overwritten_slot_is_detected_and_dropped(ipc_dir: Path) -> None:
    for copy in (False, True):
        with (
            FrameReceiver(f"ipc://{ipc_dir}/o{copy}.ipc", bind=True, hwm=16, linger_ms=0, shm_copy=copy) as receiver,
            FrameSender(
                receiver.endpoint,
                bind=False,
                hwm=16,
                linger_ms=0,
                shm_slots=2,
                shm_slot_bytes=64,
                shm_lease_timeout_s=0,
            ) as sender,
        ):
            shape = (4, 4)
            for seq in range(4):  # with a zero lease the sender reclaims slots whose descriptors are queued
                assert sender.send("frames.cam0", header(seq, shape=shape), [frame(seq, shape)])
            assert sender.ring_reclaimed == 2
            got = receive(receiver)
            assert (got.header.seq, got.header.dropped) == (2, 2)
            np.testing.assert_array_equal(got.arrays[0], frame(2, shape))
            assert receiver.ring_counts["overwritten"] == 2 and receiver.dropped["cam0"] == 2


def test_shm_reclaim_while_in_use_is_counted(ipc_dir: Path) -> None:
    with (
        FrameReceiver(f"ipc://{ipc_dir}/u.ipc", bind=True, hwm=16, linger_ms=0) as receiver,
        FrameSender(
            receiver.endpoint, bind=False, hwm=16, linger_ms=0, shm_slots=2, shm_slot_bytes=64, shm_lease_timeout_s=0
        ) as sender,
    ):
        shape = (4, 4)
        sender.send("frames.cam0", header(0, shape=shape), [frame(0, shape)])
        in_use = receive(receiver)
        for seq in (1, 2):
            sender.send("frames.cam0", header(seq, shape=shape), [frame(seq, shape)])
        del in_use
        gc.collect()
        assert receiver.ring_counts["overwritten_in_use"] == 1


def test_reserved_slot_is_written_in_place_and_sent_without_copy(shm_pair: tuple[FrameReceiver, FrameSender]) -> None:
    receiver, sender = shm_pair
    h = header(0)
    arrays = sender.reserve(h.array_specs())
    assert arrays is not None
    arrays[0][...] = frame(0)  # the capture writes its pixels straight into shared memory
    assert sender.send("frames.cam0", h, arrays)
    with pytest.raises(ValueError, match="read-only"):
        arrays[0][0, 0, 0] = 1  # the slot now belongs to the receiver
    np.testing.assert_array_equal(receive(receiver).arrays[0], frame(0))


def test_shm_is_refused_on_pub_and_oversized_messages_go_inline(ipc_dir: Path) -> None:
    with pytest.raises(ConfigError, match="shm_slots"):
        FrameSender(f"ipc://{ipc_dir}/p.ipc", kind="pub", hwm=1, linger_ms=0, shm_slots=2, shm_slot_bytes=64)
    receiver = FrameReceiver(f"ipc://{ipc_dir}/i.ipc", bind=True, hwm=4, linger_ms=0)
    with receiver, FrameSender(receiver.endpoint, bind=False, hwm=4, linger_ms=0, shm_slots=2, shm_slot_bytes=64) as s:
        s.send("frames.cam0", header(0), [frame(0)])  # 9 KiB > one 4 KiB page slot
        np.testing.assert_array_equal(receive(receiver).arrays[0], frame(0))


def test_rings_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"stream-service-ring-{int(dead.stdout)}-abc123"
    alive = tmp_path / f"stream-service-ring-{1}-abc123"
    other = tmp_path / "unrelated-file"
    for path in (stale, alive, other):
        path.write_bytes(b"x")
    assert remove_stale_rings(tmp_path) == [stale]
    assert alive.exists() and other.exists()


# The slim client (stream_service/client.py) speaks ZeroMQ itself: transport would bring NumPy with messages.
ZMQ_MODULES = {"stream_service/wire/transport.py", "stream_service/client.py"}


def test_zmq_is_imported_only_by_transport() -> None:
    root = Path(__file__).resolve().parents[1]
    offenders = [
        path.name
        for path in (root / "stream_service").rglob("*.py")
        if path.relative_to(root).as_posix() not in ZMQ_MODULES
        and any(line.strip().startswith(("import zmq", "from zmq")) for line in path.read_text().splitlines())
    ]
    assert offenders == []
    assert zmq.zmq_version_info() >= (4, 0)


# --- bounds: size, camera per endpoint, floods ------------------------------------------------------------


def test_a_message_over_the_size_bound_is_refused_by_zeromq_and_the_receiver_goes_on() -> None:
    receiver = FrameReceiver("tcp://127.0.0.1:*", bind=True, hwm=4, linger_ms=0, max_message_bytes=1 << 20)
    big = open_socket("push", receiver.endpoint, bind=False, hwm=4, linger_ms=0)
    sender = FrameSender(receiver.endpoint, bind=False, hwm=4, linger_ms=0, send_timeout_ms=-1)
    try:
        huge = np.zeros(200 * 2**20, np.uint8)  # 200 MB: the whole part is refused, never taken into memory
        big.send_multipart([b"frames.cam0", header(0, shape=(10000, 20000)).model_dump_json().encode(), huge.data])
        assert receiver.receive(1.0) is None
        assert sender.send("frames.cam0", header(1), [frame(1)])  # a fitting frame from another peer
        assert receive(receiver).header.seq == 1
        assert receiver.receive(0.5) is None  # the 200 MB message never arrives
        assert receiver.received == 1 and not receiver.rejected
    finally:
        big.close()
        sender.close()
        receiver.close()


def test_a_frame_on_the_wrong_cameras_endpoint_is_rejected_and_unknown_ids_are_one_reason() -> None:
    cam0 = FrameReceiver("tcp://127.0.0.1:*", bind=True, hwm=16, linger_ms=0, cameras={"cam0"})
    cam1 = FrameReceiver("tcp://127.0.0.1:*", bind=True, hwm=16, linger_ms=0, cameras={"cam1"})
    receivers = ReceiverSet([cam0, cam1])
    to0 = FrameSender(cam0.endpoint, bind=False, hwm=16, linger_ms=0, send_timeout_ms=-1)
    to1 = FrameSender(cam1.endpoint, bind=False, hwm=16, linger_ms=0, send_timeout_ms=-1)
    try:
        assert to1.send("frames.cam0", header(7, "cam0"), [frame(7)])  # cam0's frame on cam1's socket
        for i in range(50):  # invented cameras
            to0.send(f"frames.x{i}", header(i, f"x{i}"), [frame(i)])
        to0.send("frames.cam0", header(8, "cam0"), [frame(8)])
        to1.send("frames.cam1", header(9, "cam1"), [frame(9)])
        got, errors = [], []
        deadline = time.monotonic() + TIMEOUT_S
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                message = receivers.receive(0.1)
            except MessageError as exc:
                errors.append(str(exc))
                continue
            if message is not None:
                got.append((message.header.camera_id, message.header.seq))
        assert sorted(got) == [("cam0", 8), ("cam1", 9)]
        assert receivers.rejected == {"camera_id": 51}  # one counter, however many ids were invented
        assert not receivers.dropped and receivers.received == 2
        assert any("expected one of ['cam1'] on tcp://" in e and "found 'cam0'" in e for e in errors)
    finally:
        to0.close()
        to1.close()
        receivers.close()


def test_a_flood_of_malformed_messages_neither_piles_up_nor_holds_back_good_ones(endpoint: str) -> None:
    receiver, sender = pair(endpoint, max_drain=64)
    raw = open_socket("push", receiver.endpoint, bind=False, hwm=1000, linger_ms=0)
    with receiver, sender:
        try:
            for _ in range(300):
                raw.send_multipart([b"frames.cam0", b"{not json"])
            sender.send("frames.cam0", header(5), [frame(5)])
            time.sleep(0.3)
            seen, errors = None, 0
            deadline = time.monotonic() + TIMEOUT_S
            while seen is None and time.monotonic() < deadline:
                try:
                    seen = receiver.receive(0.1)
                except MessageError:
                    errors += 1
                assert len(receiver._errors) <= 1  # the rejected are counted, never queued up
            assert seen is not None and seen.header.seq == 5
        finally:
            raw.close()


SHM_PARTS = st.builds(
    lambda topic, desc: [topic + SHM_MARKER, good_header(), desc],
    st.binary(max_size=16),
    st.binary(max_size=64)
    | st.fixed_dictionaries(
        {
            "ring": st.text(max_size=40) | st.just("stream-service-ring-1-ab"),
            "slot": st.integers(-5, 2**70),
            "generation": st.integers(-5, 2**70),
            "offsets": st.lists(st.integers(-1, 2**70), max_size=12),
        }
    ).map(lambda d: json.dumps(d).encode()),
)


def good_header() -> bytes:
    return header(0).model_dump_json().encode()


@settings(max_examples=300, deadline=None)
@given(parts=SHM_PARTS | st.lists(st.binary(max_size=48), max_size=5) | st.lists(st.just(b"[" * 3000), max_size=3))
def test_parse_of_random_parts_and_descriptors_raises_only_message_errors(parts: list[bytes]) -> None:
    try:
        FrameReceiver._parse([memoryview(p) for p in parts])
    except MessageError as exc:
        assert "expected" in str(exc) and "found" in str(exc)
