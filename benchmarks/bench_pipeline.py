"""The whole pipeline on this machine: end-to-end latency and throughput, then frame transport vs imagezmq.

Part 1, the pipeline: for 640x640 and 1920x1080 frames, with one and two synthetic cameras, start the
real pipeline (``stream-service run``: capture, soartc, infer processes on loopback tcp, the bundled
model, CPU; pixels through the shared-memory ring or over ZeroMQ, ``--shared-memory``) with each camera
offered at a set frame rate, subscribe to its verdicts from this process, skip a warm-up, and measure
for a fixed time:

- end-to-end latency, from the capture stamp (``capture_ns``) to the verdict received here, p50/p99;
- the pipeline's own figures from the verdicts: soartc, infer and end-to-end (capture to publish);
- throughput: verdicts per second (all cameras), and the frames dropped to keep up (drop-oldest).

An offered rate above what the machine sustains is on purpose: throughput is then the capacity, and the
latency is that of fresh frames, the older ones dropped and counted.

CURVE's cost (``--curve-cost``): the same 640x640 pipeline with its pixels over tcp (as across hosts, where
CURVE encrypts every frame), CURVE off and on alternated ``--curve-rounds`` times in the same run.

The journal's cost (``--journal-cost``): the 640x640 pipeline, one camera at 10 fps, with the journal
(``journal.enabled``) on and off, alternated ``--journal-rounds`` times in the same run, end-to-end p50/p99
of each (received here, so the journal write before the publish is inside), and the append alone
(``Journal.append`` of the verdicts received, timed in this process on a fresh journal).

The MQTT bridge's cost (``--mqtt-latency``): the 640x640 pipeline, one camera at 10 fps, with
``bridges.mqtt`` on a local mosquitto (Debian's, started here on a free port); the same verdicts received
here over ZeroMQ and over MQTT (a paho subscriber, QoS 1), capture stamp to received, p50/p99 of each and
the p50 of the per-verdict difference (matched by ``verdict_id``): what the bridge adds.

Part 2, frame transport alone (``bench_transport.py``'s harness, same frames, same machine, separate
processes): our tcp and shared-memory transports against imagezmq, 1920x1080 and 640x640 BGR frames.

    python benchmarks/bench_pipeline.py [--seconds 30] [--warmup 8] [--out bench_out/bench_pipeline.json]
    python benchmarks/bench_pipeline.py --journal-cost --skip-pipeline --skip-transport [--journal-rounds 2]
    python benchmarks/bench_pipeline.py --curve-cost --skip-pipeline --skip-transport [--curve-rounds 2]
    python benchmarks/bench_pipeline.py --mqtt-latency --skip-pipeline --skip-transport

Prints tables and writes JSON with the machine, versions and parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from _machine import machine, now, write_report

from stream_service.wire.messages import Verdict
from stream_service.wire.transport import CurveKeys, FrameReceiver, generate_keys, use_curve

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "stream_service.cli"]
STARTUP_S = 300.0
# (name, width, height, offered fps per camera)
SIZES = {"640x640": (640, 640, 10.0), "1920x1080": (1920, 1080, 5.0)}


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def running_pipeline(
    config: dict[str, Any], folder: Path, verdicts: str, warmup_s: float
) -> Iterator[tuple[subprocess.Popen[bytes], FrameReceiver]]:
    """``stream-service run`` on ``config`` (written to folder/pipeline.yaml, its output to folder/run.out)
    and a subscriber to its ``verdicts`` endpoint; enters once the first verdict has arrived and ``warmup_s``
    more seconds have passed; on exit stops the run (SIGTERM, killed after 30 s) and the subscriber."""
    path = folder / "pipeline.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    subscriber = FrameReceiver(verdicts, kind="sub", topics=["verdicts."], hwm=100_000, linger_ms=0)
    with (folder / "run.out").open("w") as out:
        process = subprocess.Popen(
            [*CLI, "run", "--config", str(path), "--run-dir", str(folder / "run")], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + STARTUP_S
        while subscriber.receive(0.5) is None:
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"the pipeline gave no verdict; see {folder / 'run.out'}")
        warm_until = time.monotonic() + warmup_s
        while time.monotonic() < warm_until:
            subscriber.receive(0.1)
        yield process, subscriber
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        subscriber.close()


def pipeline_config(
    width: int,
    height: int,
    fps: float,
    cameras: int,
    threads: int,
    shared_memory: bool,
    device: str,
    journal: Path | None = None,
    keys: Path | None = None,
) -> tuple[dict[str, Any], str]:
    """The config and its verdicts endpoint; ``journal``: the journal's path (None: the journal off);
    ``keys``: a CURVE keys folder (None: plaintext)."""
    ports = free_ports(cameras + 3)
    verdicts = f"tcp://127.0.0.1:{ports[-1]}"
    config = {
        "cameras": [
            {
                "id": f"cam{i}",
                "source": {"kind": "synthetic", "width": width, "height": height, "fps": fps, "seed": i},
            }
            for i in range(cameras)
        ],
        "transport": {
            "capture_out": [f"tcp://127.0.0.1:{p}" for p in ports[:cameras]],
            "features_out": f"tcp://127.0.0.1:{ports[-2]}",
            "verdicts_pub": verdicts,
            "journal_rep": f"tcp://127.0.0.1:{ports[-3]}",
            "shared_memory": shared_memory,
        },
        "soartc": {"device": device},
        "inference": {"device": "cpu", "threads": threads},
        "journal": {"enabled": journal is not None} | ({"path": str(journal)} if journal is not None else {}),
        "supervisor": {"startup_timeout_s": STARTUP_S, "heartbeat_timeout_s": 30.0},
        "dashboard": {"enabled": False},
        "security": {"keys": str(keys)} if keys is not None else {},
    }
    return config, verdicts


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return {"p50": float(p50), "p99": float(p99)}


def run_pipeline(
    size: str,
    cameras: int,
    seconds: float,
    warmup: float,
    threads: int,
    shared_memory: bool,
    device: str,
    workdir: Path,
    offered_fps: float | None = None,
    journal: bool = True,
    name: str = "",
    curve: bool = False,
) -> dict[str, Any]:
    width, height, fps = SIZES[size]
    fps = offered_fps or fps
    folder = workdir / f"{size}-{cameras}-{'shm' if shared_memory else 'tcp'}-{device}{name}"
    folder.mkdir(parents=True)
    journal_path = folder / "journal.sqlite" if journal else None
    keys = folder / "keys" if curve else None
    if keys is not None:
        generate_keys(keys)
        use_curve(CurveKeys.load(keys))  # this process's subscriber is a CURVE client too
    config, endpoint = pipeline_config(width, height, fps, cameras, threads, shared_memory, device, journal_path, keys)
    samples: list[tuple[Verdict, int]] = []
    try:
        with running_pipeline(config, folder, endpoint, warmup) as (_, subscriber):
            end = time.monotonic() + seconds
            while (now := time.monotonic()) < end:
                message = subscriber.receive(end - now)
                if message is not None and isinstance(message.header, Verdict):
                    samples.append((message.header, time.time_ns()))
            heartbeats = {p.stem: json.loads(p.read_text()) for p in (folder / "run").glob("*.json")}
    finally:
        use_curve(None)
    received = [(received_ns - v.capture_ns) / 1e6 for v, received_ns in samples]
    # From the verdict made (its end_to_end is taken then) to received here: the journal write (when on),
    # the PUB/SUB hop and this process's wake-up; the part of the latency the journal can add to.
    after_made = [
        r - v.latency_ms["end_to_end"]
        for r, (v, _) in zip(received, samples, strict=True)
        if "end_to_end" in v.latency_ms
    ]
    stages: dict[str, list[float]] = {}
    for v, _ in samples:
        for stage, ms in v.latency_ms.items():
            stages.setdefault(stage, []).append(ms)
    dropped = sum(v.dropped for v, _ in samples)
    captured = sum(int(b["stats"]["capture"]["frames"]) for n, b in heartbeats.items() if n.startswith("capture-"))
    return {
        "size": size,
        "cameras": cameras,
        "journal": journal,
        "curve": curve,
        **({"verdicts_json": [v.model_dump_json() for v, _ in samples]} if name else {}),
        "pixels": "shm" if shared_memory else "tcp",
        "soartc_device": device,
        "offered_fps_per_camera": fps,
        "seconds": seconds,
        "verdicts": len(samples),
        "throughput_fps": len(samples) / seconds,
        "dropped": dropped,
        "dropped_fraction": dropped / (dropped + len(samples)) if samples else None,
        "frames_captured_total": captured,
        "e2e_received_ms": percentiles(received),
        "made_to_received_ms": percentiles(after_made),
        "stages_ms": {stage: percentiles(values) for stage, values in sorted(stages.items())},
        "fail_fraction": sum(v.verdict == "fail" for v, _ in samples) / len(samples) if samples else None,
    }


def append_cost(verdicts_json: list[str], folder: Path) -> dict[str, float | None]:
    """p50/p99 (ms) of ``Journal.append`` for these verdicts, on a fresh journal in ``folder``."""
    from stream_service.runtime.journal import Journal
    from stream_service.settings import JournalSettings

    journal = Journal(JournalSettings(path=folder / "append-cost.sqlite"))
    took = []
    for text in verdicts_json:
        verdict = Verdict.model_validate_json(text)
        started = time.perf_counter_ns()
        journal.append(verdict)
        took.append((time.perf_counter_ns() - started) / 1e6)
    journal.close()
    return percentiles(took)


def run_journal_cost(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """640x640, one camera at 10 fps, the journal off and on alternately (see the module docstring)."""
    rows = []
    for i in range(args.journal_rounds):
        for journal in (False, True):
            print(f"journal cost: round {i + 1}, journal {'on' if journal else 'off'} ...", file=sys.stderr, flush=True)
            rows.append(
                run_pipeline(
                    "640x640",
                    1,
                    args.seconds,
                    args.warmup,
                    args.threads,
                    True,
                    "cpu",
                    workdir,
                    10.0,
                    journal,
                    f"-journal-{'on' if journal else 'off'}-{i}",
                )
            )
    verdicts = [text for r in rows if r["journal"] for text in r.pop("verdicts_json")]
    for r in rows:
        r.pop("verdicts_json", None)

    def added(key: str) -> float:
        on = [r[key]["p50"] for r in rows if r["journal"]]
        off = [r[key]["p50"] for r in rows if not r["journal"]]
        return float(statistics.median(on) - statistics.median(off))

    return {
        "rows": rows,
        "append_ms": append_cost(verdicts, workdir),
        "p50_added_ms": added("e2e_received_ms"),
        "made_to_received_p50_added_ms": added("made_to_received_ms"),
    }


def run_curve_cost(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """640x640, one camera at 10 fps, pixels over tcp (the multi-host case, where CURVE encrypts every
    frame), CURVE off and on alternately; the p50 it adds end to end (median of rounds)."""
    rows = []
    for i in range(args.curve_rounds):
        for curve in (False, True):
            print(f"CURVE cost: round {i + 1}, CURVE {'on' if curve else 'off'} ...", file=sys.stderr, flush=True)
            name = f"-curve-{'on' if curve else 'off'}-{i}"
            rows.append(
                run_pipeline(
                    "640x640",
                    1,
                    args.seconds,
                    args.warmup,
                    args.threads,
                    False,
                    "cpu",
                    workdir,
                    10.0,
                    True,
                    name,
                    curve,
                )
            )
    on = [r["e2e_received_ms"]["p50"] for r in rows if r["curve"]]
    off = [r["e2e_received_ms"]["p50"] for r in rows if not r["curve"]]
    for r in rows:
        r.pop("verdicts_json", None)
    return {"rows": rows, "p50_added_ms": float(statistics.median(on) - statistics.median(off))}


@contextlib.contextmanager
def mosquitto(folder: Path) -> Iterator[int]:
    """Debian's mosquitto on a free loopback port (no persistence); yields the port."""
    import shutil

    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
    if binary is None:
        raise SystemExit("--mqtt-latency needs mosquitto (apt install mosquitto)")
    (port,) = free_ports(1)
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("mosquitto did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def run_mqtt_latency(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """640x640, one camera at 10 fps, verdicts over ZeroMQ and over the MQTT bridge (module docstring)."""
    import threading

    import paho.mqtt.client as paho

    folder = workdir / "mqtt-latency"
    folder.mkdir(parents=True)
    width, height, _ = SIZES["640x640"]
    config, endpoint = pipeline_config(width, height, 10.0, 1, args.threads, True, "cpu", folder / "journal.sqlite")
    mqtt_rx: dict[str, int] = {}
    zmq_rx: dict[str, tuple[int, int]] = {}  # verdict_id: (capture_ns, received_ns)
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        received = time.time_ns()
        with lock:
            mqtt_rx[json.loads(msg.payload)["verdict_id"]] = received

    with mosquitto(folder) as port:
        config["bridges"] = {"mqtt": {"port": port, "prefix": "bench", "state_path": str(folder / "state.json")}}
        listener = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-listener")
        listener.on_message = on_message
        listener.connect("127.0.0.1", port)
        listener.subscribe("bench/+/verdict", qos=1)
        listener.loop_start()
        try:
            with running_pipeline(config, folder, endpoint, args.warmup) as (_, subscriber):
                end = time.monotonic() + args.seconds
                while (t := time.monotonic()) < end:
                    message = subscriber.receive(end - t)
                    if message is not None and isinstance(message.header, Verdict) and message.header.verdict_id:
                        zmq_rx[message.header.verdict_id] = (message.header.capture_ns, time.time_ns())
                time.sleep(1.0)  # the last verdicts' MQTT copies
        finally:
            listener.loop_stop()
            listener.disconnect()
    both = [(c, z, mqtt_rx[v]) for v, (c, z) in zmq_rx.items() if v in mqtt_rx]
    return {
        "seconds": args.seconds,
        "verdicts_zmq": len(zmq_rx),
        "verdicts_mqtt_matched": len(both),
        "zmq_ms": percentiles([(z - c) / 1e6 for c, z, _ in both]),
        "mqtt_ms": percentiles([(m - c) / 1e6 for c, _, m in both]),
        "added_ms": percentiles([(m - z) / 1e6 for _, z, m in both]),
    }


def load_bench_transport() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_transport", HERE / "bench_transport.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_transport"] = module  # spawned processes import it by this name
    spec.loader.exec_module(module)
    return module


def run_transport(frames: int, runs: int) -> list[dict[str, Any]]:
    bench = load_bench_transport()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        for size in ("1920x1080", "640x640"):
            shape = bench.SIZES[size]
            medians = {}
            for transport in ("tcp", "shm", "shm-inplace", "imagezmq"):
                fps = [bench._one_run(transport, shape, frames, Path(tmp))["fps"] for _ in range(runs)]
                medians[transport] = statistics.median(fps)
                rows.append({"size": size, "transport": transport, "fps_runs": [round(f, 1) for f in fps]})
            for row in rows:
                if row["size"] == size:
                    row["fps"] = medians[row["transport"]]
                    row["mb_s"] = row["fps"] * int(np.prod(shape)) / 1e6
                    row["x_imagezmq"] = row["fps"] / medians["imagezmq"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement time per pipeline case")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds skipped after the first verdict")
    parser.add_argument("--threads", type=int, default=0, help="inference.threads (0: ONNX Runtime's default)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--cameras", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--transport-frames", type=int, default=300)
    parser.add_argument("--transport-runs", type=int, default=3)
    parser.add_argument(
        "--shared-memory",
        nargs="+",
        default=["true"],
        choices=["true", "false"],
        help="pipeline hops through the shared-memory ring (true, what auto gives on one host) or over tcp",
    )
    parser.add_argument(
        "--soartc-devices", nargs="+", default=["cpu"], choices=["cpu", "cuda"], help="soartc.device of the cases"
    )
    parser.add_argument("--fps", type=float, default=None, help="offered frames/s per camera (default: per size)")
    parser.add_argument("--journal-cost", action="store_true", help="640x640 at 10 fps, journal on and off")
    parser.add_argument("--journal-rounds", type=int, default=2, help="off/on pairs of --journal-cost")
    parser.add_argument("--curve-cost", action="store_true", help="640x640 at 10 fps over tcp, CURVE on and off")
    parser.add_argument("--curve-rounds", type=int, default=2, help="off/on pairs of --curve-cost")
    parser.add_argument("--mqtt-latency", action="store_true", help="640x640 at 10 fps, ZeroMQ vs the MQTT bridge")
    parser.add_argument("--skip-transport", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_out/bench_pipeline.json"))
    args = parser.parse_args()

    import zmq

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        for size in [] if args.skip_pipeline else args.sizes:
            for cameras in args.cameras:
                for shm in args.shared_memory:
                    for device in args.soartc_devices:
                        print(f"pipeline {size} x{cameras} shm {shm} soartc {device} ...", file=sys.stderr, flush=True)
                        rows.append(
                            run_pipeline(
                                size,
                                cameras,
                                args.seconds,
                                args.warmup,
                                args.threads,
                                shm == "true",
                                device,
                                Path(tmp),
                                args.fps,
                            )
                        )
        journal_cost = run_journal_cost(args, Path(tmp)) if args.journal_cost else None
        curve_cost = run_curve_cost(args, Path(tmp)) if args.curve_cost else None
        mqtt_latency = run_mqtt_latency(args, Path(tmp)) if args.mqtt_latency else None
    transport = [] if args.skip_transport else run_transport(args.transport_frames, args.transport_runs)

    if journal_cost is not None:
        print(
            f"\n{'journal':<8}{'verdicts/s':>11}{'e2e p50':>9}{'e2e p99':>9}{'made->recv p50':>15}{'p99':>7}"
            "   (640x640, 1 camera, 10 fps offered; ms)"
        )
        for r in journal_cost["rows"]:
            e2e, hop = r["e2e_received_ms"], r["made_to_received_ms"]
            print(
                f"{'on' if r['journal'] else 'off':<8}{r['throughput_fps']:>11.2f}"
                f"{e2e['p50'] or float('nan'):>9.1f}{e2e['p99'] or float('nan'):>9.1f}"
                f"{hop['p50'] or float('nan'):>15.2f}{hop['p99'] or float('nan'):>7.2f}"
            )
        append = journal_cost["append_ms"]
        print(
            f"p50 added by the journal (median of rounds): e2e {journal_cost['p50_added_ms']:.2f} ms, made->received "
            f"{journal_cost['made_to_received_p50_added_ms']:.2f} ms; Journal.append alone p50 {append['p50']:.3f} ms, "
            f"p99 {append['p99']:.3f} ms"
        )
    if curve_cost is not None:
        header = f"\n{'CURVE':<8}{'verdicts/s':>11}{'e2e p50':>9}{'e2e p99':>9}"
        print(header + "   (640x640, 1 camera, 10 fps, pixels over tcp; ms)")
        for r in curve_cost["rows"]:
            e2e = r["e2e_received_ms"]
            print(
                f"{'on' if r['curve'] else 'off':<8}{r['throughput_fps']:>11.2f}"
                f"{e2e['p50'] or float('nan'):>9.1f}{e2e['p99'] or float('nan'):>9.1f}"
            )
        print(f"p50 added by CURVE (median of rounds): {curve_cost['p50_added_ms']:.2f} ms")
    if mqtt_latency is not None:
        z, m, a = mqtt_latency["zmq_ms"], mqtt_latency["mqtt_ms"], mqtt_latency["added_ms"]
        print(
            f"\nMQTT bridge (640x640, 1 camera, 10 fps offered; {mqtt_latency['verdicts_mqtt_matched']} of "
            f"{mqtt_latency['verdicts_zmq']} verdicts matched): capture to received p50/p99 ZeroMQ "
            f"{z['p50']:.1f}/{z['p99']:.1f} ms, MQTT {m['p50']:.1f}/{m['p99']:.1f} ms; added p50 {a['p50']:.2f} ms, "
            f"p99 {a['p99']:.2f} ms"
        )
    print(
        f"\n{'frames':<10}{'cams':>5}{'pixels':>7}{'soartc':>7}{'offered/s':>10}{'verdicts/s':>11}{'dropped':>9}"
        f"{'e2e p50':>9}{'e2e p99':>9}{'soartc p50':>11}{'infer p50':>10}   (ms; e2e = capture stamp to received)"
    )
    for r in rows:
        e2e, st = r["e2e_received_ms"], r["stages_ms"]
        print(
            f"{r['size']:<10}{r['cameras']:>5}{r['pixels']:>7}{r['soartc_device']:>7}"
            f"{r['offered_fps_per_camera'] * r['cameras']:>10.1f}"
            f"{r['throughput_fps']:>11.2f}{r['dropped_fraction'] or 0:>9.0%}"
            f"{e2e['p50'] or float('nan'):>9.0f}{e2e['p99'] or float('nan'):>9.0f}"
            f"{(st.get('soartc') or {}).get('p50') or float('nan'):>11.0f}"
            f"{(st.get('infer') or {}).get('p50') or float('nan'):>10.0f}"
        )
    if transport:
        print(f"\n{'frames':<10}{'transport':<10}{'frames/s':>10}{'MB/s':>8}{'x imagezmq':>11}  runs")
        for t in transport:
            print(
                f"{t['size']:<10}{t['transport']:<10}{t['fps']:>10.0f}{t['mb_s']:>8.0f}{t['x_imagezmq']:>11.2f}"
                f"  {t['fps_runs']}"
            )

    card = json.loads((HERE.parent / "models" / "soartc-vit" / "card.json").read_text())
    report = {
        "benchmark": "bench_pipeline",
        "date": now(),
        "machine": machine(pyzmq=zmq.__version__, libzmq=zmq.zmq_version()),
        "model": {"name": card["name"], "version": card["version"], "created": card["created"]},
        "params": vars(args) | {"out": str(args.out)},
        "pipeline": rows,
        "journal_cost": journal_cost,
        "curve_cost": curve_cost,
        "mqtt_latency": mqtt_latency,
        "transport": transport,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
