"""Frame transport alone: our tcp, ipc and shared-memory transports against imagezmq, same frames, same host.

Sender and receiver run in separate processes (multiprocessing, spawn). The sender sends N frames, cycling
through 4 pre-generated random uint8 frames, as fast as the transport accepts them (blocking sends: this
measures capacity, not the capture's never-block drop policy); the receiver times from its WARMUP-th
frame to the last one and reads one pixel of each. Runs of the transports are interleaved, so that load
from other work on the machine spreads over all of them; the table shows the median run.

- tcp, ipc: ``FrameSender``/``FrameReceiver`` over PUSH/PULL, ``copy=False`` both ways.
- shm: the same over ipc with a ring of SHM_SLOTS shared-memory slots: the sender copies the frame into a
  free slot (one copy) and sends a descriptor; the receiver gets a zero-copy view under a lease.
- shm-inplace: the capture path of the design, ``FrameSender.reserve``: the frame is written into its
  slot by the capture (here: once per slot, before timing matters) and the transport moves only the
  descriptor. The pixel write is the capture's own, so it is not timed, just as imagezmq's sender is
  handed ready frames.
- imagezmq: its default REQ/REP over tcp (one round trip per frame, copy=True).

    python benchmarks/bench_transport.py [--frames 400] [--runs 3] [--out bench_out/bench_transport.json]

Prints a table and writes JSON with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _machine import machine, now, write_report

SIZES: dict[str, tuple[int, int, int]] = {"1920x1080": (1080, 1920, 3), "640x640": (640, 640, 3)}
TRANSPORTS = ("tcp", "ipc", "shm", "shm-inplace", "imagezmq")
HWM = 4
SHM_SLOTS = 4
WARMUP = 10
TIMEOUT_S = 60.0
RECEIVE_TIMEOUT_S = 30.0


def _frames(shape: tuple[int, int, int], count: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


def _receiver(transport: str, endpoint: str, n: int, shape: tuple[int, int, int], ready: Any, results: Any) -> None:
    times: list[float] = []
    received = 0
    checksum = 0
    dropped = 0
    if transport == "imagezmq":
        import imagezmq

        hub = imagezmq.ImageHub(open_port=endpoint)
        ready.put(endpoint)
        while received < n:
            name, image = hub.recv_image()
            hub.send_reply(b"OK")
            checksum += int(image[0, 0, 0])
            received += 1
            times.append(time.perf_counter())
            if int(name) == n - 1:
                break
        hub.close()
    else:
        from stream_service.errors import MessageError
        from stream_service.wire.transport import FrameReceiver

        with FrameReceiver(endpoint, bind=True, hwm=HWM, linger_ms=0) as receiver:
            ready.put(receiver.endpoint)
            deadline = time.monotonic() + RECEIVE_TIMEOUT_S
            while time.monotonic() < deadline:
                try:
                    message = receiver.receive(1.0)
                except MessageError as exc:
                    print(f"bench receiver: {exc}", file=sys.stderr, flush=True)
                    continue
                if message is None:
                    continue
                checksum += int(message.arrays[0][0, 0, 0])
                received += 1
                times.append(time.perf_counter())
                if message.header.seq == n - 1:
                    break
            dropped = sum(receiver.dropped.values())
            if received and message is None:
                print(f"bench receiver: timed out after {received} frames, {dropped} dropped", file=sys.stderr)
    moved = len(times) - WARMUP
    elapsed = times[-1] - times[WARMUP - 1] if moved > 0 else float("nan")
    results.put({"received": received, "dropped": dropped, "fps": moved / elapsed, "checksum": checksum})


def _sender(transport: str, endpoint: str, n: int, shape: tuple[int, int, int]) -> None:
    frames = _frames(shape)
    if transport == "imagezmq":
        import imagezmq

        sender = imagezmq.ImageSender(connect_to=endpoint.replace("*", "127.0.0.1"), REQ_REP=True)
        for i in range(n):
            sender.send_image(str(i), frames[i % len(frames)])
        sender.close()
        return
    from stream_service.wire.messages import FrameHeader
    from stream_service.wire.transport import FrameSender, terminate_context

    nbytes = int(np.prod(shape))
    shm = {"shm_slots": SHM_SLOTS, "shm_slot_bytes": nbytes} if transport.startswith("shm") else {}
    written: set[int] = set()
    with FrameSender(endpoint, bind=False, hwm=HWM, linger_ms=-1, send_timeout_ms=-1, **shm) as sender:
        for i in range(n):
            header = FrameHeader(camera_id="bench", seq=i, capture_ns=time.time_ns(), shape=shape, dtype="uint8")
            if transport == "shm-inplace":
                # The capture wrote each slot's frame once, in place; the transport moves descriptors only.
                arrays = sender.reserve(header.array_specs())
                assert arrays is not None
                address = arrays[0].__array_interface__["data"][0]
                if address not in written:
                    arrays[0][...] = frames[len(written) % len(frames)]
                    written.add(address)
                sender.send("frames.bench", header, arrays)
            else:
                sender.send("frames.bench", header, [frames[i % len(frames)]])
    terminate_context()


def _one_run(transport: str, shape: tuple[int, int, int], n: int, workdir: Path) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    if transport == "imagezmq":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        bind_at = f"tcp://*:{port}"
    elif transport == "tcp":
        bind_at = "tcp://127.0.0.1:*"
    else:
        bind_at = f"ipc://{workdir}/{transport}-{time.monotonic_ns()}.ipc"
    receiver = ctx.Process(target=_receiver, args=(transport, bind_at, n, shape, ready, results))
    receiver.start()
    endpoint = ready.get(timeout=TIMEOUT_S)
    sender = ctx.Process(target=_sender, args=(transport, endpoint, n, shape))
    sender.start()
    try:
        result: dict[str, Any] = results.get(timeout=TIMEOUT_S)
    finally:
        for process in (sender, receiver):
            process.join(TIMEOUT_S if process.exitcode is None else 0)
            if process.is_alive():
                process.terminate()
    print(f"  {transport:<11} {shape}: {result['fps']:.0f} frames/s", file=sys.stderr, flush=True)
    return result


def _imagezmq_version() -> str | None:
    try:
        import imagezmq
    except ImportError:
        return None
    return str(getattr(imagezmq, "__version__", "installed"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=list(TRANSPORTS))
    parser.add_argument("--out", type=Path, default=Path("bench_out/bench_transport.json"))
    args = parser.parse_args()

    import zmq

    imagezmq_version = _imagezmq_version()
    rows: list[dict[str, Any]] = []
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        for size in args.sizes:
            for _ in range(args.runs):
                for transport in args.transports:
                    if transport == "imagezmq" and imagezmq_version is None:
                        continue
                    result = _one_run(transport, SIZES[size], args.frames, Path(tmp))
                    runs.setdefault((size, transport), []).append(result)
    for size in args.sizes:
        mb = int(np.prod(SIZES[size])) / 1e6
        base = statistics.median(r["fps"] for r in runs[(size, "imagezmq")]) if (size, "imagezmq") in runs else None
        for transport in args.transports:
            if (size, transport) not in runs:
                rows.append({"size": size, "transport": transport, "note": "imagezmq not installed"})
                continue
            fps = statistics.median(r["fps"] for r in runs[(size, transport)])
            rows.append(
                {
                    "size": size,
                    "transport": transport,
                    "fps": fps,
                    "mb_s": fps * mb,
                    "ratio_to_imagezmq": fps / base if base else None,
                    "fps_runs": [round(r["fps"], 1) for r in runs[(size, transport)]],
                    "dropped_runs": [r["dropped"] for r in runs[(size, transport)]],
                }
            )

    print(f"{'size':<10} {'transport':<11} {'frames/s':>9} {'MB/s':>8} {'x imagezmq':>10} {'dropped':>8}  runs")
    for row in rows:
        if "fps" not in row:
            print(f"{row['size']:<10} {row['transport']:<11} {row['note']}")
            continue
        ratio = f"{row['ratio_to_imagezmq']:.2f}" if row.get("ratio_to_imagezmq") else "n/a"
        print(
            f"{row['size']:<10} {row['transport']:<11} {row['fps']:>9.0f} {row['mb_s']:>8.0f} {ratio:>10} "
            f"{max(row['dropped_runs']):>8}  {row['fps_runs']}"
        )

    report = {
        "benchmark": "bench_transport",
        "date": now(),
        "machine": machine(pyzmq=zmq.__version__, libzmq=zmq.zmq_version(), imagezmq=imagezmq_version),
        "params": {
            "frames_per_run": args.frames,
            "runs": args.runs,
            "warmup_frames": WARMUP,
            "hwm": HWM,
            "shm_slots": SHM_SLOTS,
            "frame_dtype": "uint8",
            "shapes": {s: SIZES[s] for s in args.sizes},
        },
        "results": rows,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
