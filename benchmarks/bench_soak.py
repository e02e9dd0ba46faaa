"""Soak: the embedded default pipeline left running, its memory, file descriptors and latency watched.

Starts `stream-service run` on the embedded default (synthetic 640x640 camera at 10 fps, the bundled
model, CPU, shared memory, the dashboard), on free loopback ports, subscribes to its verdicts, skips a
warm-up, then every ``--every`` seconds samples each process (the run loop and its stage processes): resident
memory (VmRSS), open file descriptors, and the shared-memory rings in /dev/shm; and, per interval, the
verdicts received, the frames the pipeline reported dropped, and the end-to-end latency (capture stamp
to verdict received here). At the end it fits a line to each process's memory (MiB per hour) and
compares the latency of the first and the last interval: a service meant to run for months must show
flat memory, no descriptor or ring leak, and no latency drift.

    python benchmarks/bench_soak.py [--minutes 10] [--every 10] [--out bench_out/bench_soak.json]
    python benchmarks/bench_soak.py --faults --minutes 30   # 2 cameras x 10 fps, faults (soak_faults.py)

With ``--faults`` a second camera (a folder replaying frames) joins, and the pipeline is hurt on a schedule:
each stage killed in turn, the folder camera's frames removed and restored, a subscriber stalled 30 s, a
burst of hostile messages; the report adds memory growth per process after its own warm-up (a restarted
process is a new one), the p99 of the first and the last 5 minutes, restarts, and the journal against
the frames captured (verdicts received but not journaled must be none).

Prints a table and writes JSON with the samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from _machine import machine, now, write_report
from bench_pipeline import free_ports, running_pipeline
from soak_faults import Faults, account, folder_camera

from stream_service.wire.messages import Verdict
from stream_service.wire.shm_ring import ring_directory


def proc_sample(pid: int) -> dict[str, float] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {"rss_mib": rss / 1024, "fds": fds}


def with_pid(sample: dict[str, float] | None, pid: int) -> dict[str, float] | None:
    return None if sample is None else {**sample, "pid": pid}


def slope_per_hour(times_s: list[float], values: list[float]) -> float:
    if len(times_s) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(times_s) / 3600.0, np.asarray(values), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="measured time after the warm-up")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds skipped after the first verdict")
    parser.add_argument("--faults", action="store_true", help="2 cameras, and the faults of soak_faults.py")
    parser.add_argument("--out", type=Path, default=Path("bench_out/bench_soak.json"))
    args = parser.parse_args()

    capture, features, verdicts, http, journal = free_ports(5)
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "default.yaml").read_text())
    config["transport"] |= {
        "capture_out": [f"tcp://127.0.0.1:{capture}"],
        "features_out": f"tcp://127.0.0.1:{features}",
        "verdicts_pub": f"tcp://127.0.0.1:{verdicts}",
        "journal_rep": f"tcp://127.0.0.1:{journal}",
    }
    config["dashboard"] |= {"port": http}
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        folder = Path(tmp)
        config["journal"] |= {"path": str(folder / "journal.sqlite")}
        samples: list[dict[str, Any]] = []
        endpoint = f"tcp://127.0.0.1:{verdicts}"  # the embedded default with its ports moved
        faults = None
        if args.faults:
            config["cameras"].append(folder_camera(folder, 10.0))
            config["transport"]["capture_out"].append(f"tcp://127.0.0.1:{free_ports(1)[0]}")
            faults = Faults(
                folder / "run", folder / "frames", config["transport"]["features_out"], endpoint, args.minutes
            )
        received_ids: set[str] = set()
        captured: dict[int, int] = {}  # frames read, per capture process (a restarted capture counts afresh)
        with running_pipeline(config, folder, endpoint, args.warmup) as (process, subscriber):
            started = time.monotonic()
            end = started + args.minutes * 60
            while time.monotonic() < end:
                pids = {p.stem: int(json.loads(p.read_text())["pid"]) for p in (folder / "run").glob("*.json")}
                pids["run"] = process.pid
                for beat in (folder / "run").glob("capture-*.json"):
                    record = json.loads(beat.read_text())
                    captured[int(record["pid"])] = int(record["stats"]["capture"]["frames"])
                if faults is not None:
                    faults.due(time.monotonic() - started)
                interval_end = min(end, time.monotonic() + args.every)
                e2e: list[float] = []
                dropped = 0
                while (left := interval_end - time.monotonic()) > 0:
                    message = subscriber.receive(left)
                    if message is not None and isinstance(message.header, Verdict):
                        e2e.append((time.time_ns() - message.header.capture_ns) / 1e6)
                        dropped += message.header.dropped
                        if message.header.verdict_id is not None:
                            received_ids.add(message.header.verdict_id)
                sample: dict[str, Any] = {
                    "t_s": round(time.monotonic() - started, 1),
                    "verdicts": len(e2e),
                    "dropped": dropped,
                    "e2e_p50_ms": float(np.percentile(e2e, 50)) if e2e else None,
                    "e2e_p99_ms": float(np.percentile(e2e, 99)) if e2e else None,
                    "rings": len(list(ring_directory().glob("stream-service-ring-*"))),
                    "processes": {
                        name: proc_sample(pid) | {"pid": pid} if proc_sample(pid) else None
                        for name, pid in pids.items()
                    },
                }
                samples.append(sample)
                print(
                    f"[{sample['t_s']:6.0f} s] {len(e2e) / args.every:5.1f} verdicts/s  e2e p50 "
                    f"{sample['e2e_p50_ms'] or float('nan'):5.0f} ms  "
                    + "  ".join(f"{n} {p['rss_mib']:.0f} MiB" for n, p in sample["processes"].items() if p is not None),
                    file=sys.stderr,
                    flush=True,
                )
            for beat in (folder / "run").glob("capture-*.json"):
                record = json.loads(beat.read_text())
                captured[int(record["pid"])] = int(record["stats"]["capture"]["frames"])
        output = (folder / "run.out").read_text()
        accounting = account(folder / "journal.sqlite", sum(captured.values()), received_ids) if faults else None

    names = sorted({n for s in samples for n in s["processes"]})
    rows = []
    for name in names:
        points = [(s["t_s"], s["processes"][name]) for s in samples if s["processes"].get(name)]
        if points:  # the process alive at the end, after its own warm-up (a restarted stage is a new process)
            final = [(t, p) for t, p in points if p["pid"] == points[-1][1]["pid"]]
            warm = [(t, p) for t, p in final if t >= final[0][0] + args.warmup] or final[-1:]
            growth = warm[-1][1]["rss_mib"] - warm[0][1]["rss_mib"]
        else:
            growth = None
        times, rss = [t for t, _ in points], [p["rss_mib"] for _, p in points]
        fds = [p["fds"] for _, p in points]
        rows.append(
            {
                "process": name,
                "rss_first_mib": rss[0] if rss else None,
                "rss_last_mib": rss[-1] if rss else None,
                "rss_max_mib": max(rss) if rss else None,
                "rss_slope_mib_per_hour": slope_per_hour(times, rss),
                "fds_first": fds[0] if fds else None,
                "fds_last": fds[-1] if fds else None,
                "alive_to_the_end": len(points) == len(samples),
                "rss_growth_after_warmup_mib": growth,
            }
        )
    first, last = samples[0], samples[-1]
    window = max(1, int(300 / args.every))  # 5 minutes of samples
    p99 = [s["e2e_p99_ms"] for s in samples if s["e2e_p99_ms"] is not None]
    summary = {
        "minutes": args.minutes,
        "verdicts": sum(s["verdicts"] for s in samples),
        "verdicts_per_s": statistics.mean(s["verdicts"] for s in samples) / args.every,
        "dropped": sum(s["dropped"] for s in samples),
        "e2e_p50_first_last_ms": [first["e2e_p50_ms"], last["e2e_p50_ms"]],
        "e2e_p99_first_last_ms": [first["e2e_p99_ms"], last["e2e_p99_ms"]],
        "rings_first_last": [first["rings"], last["rings"]],
        "restarts": output.count("; restarting in"),
        "e2e_p99_first_last_5min_ms": [statistics.median(p99[:window]), statistics.median(p99[-window:])]
        if p99
        else None,
        "faults": faults.log if faults else None,
        "stalled_subscriber_missed": faults.stalled_missed if faults else None,
        "accounting": accounting,
    }
    print(
        f"\n{'process':<14}{'RSS first':>10}{'last':>8}{'max':>8}{'MiB/h':>8}{'growth':>8}{'fds':>9}"
        f"  (after {args.warmup:.0f} s; growth: the final process, after its own warm-up)"
    )
    for r in rows:
        grown = r["rss_growth_after_warmup_mib"]
        print(
            f"{r['process']:<14}{r['rss_first_mib']:>10.1f}{r['rss_last_mib']:>8.1f}{r['rss_max_mib']:>8.1f}"
            f"{r['rss_slope_mib_per_hour']:>8.1f}{grown if grown is not None else float('nan'):>8.1f}"
            f"{r['fds_first']:>5}->{r['fds_last']:<3}" + ("" if r["alive_to_the_end"] else "  (died)")
        )
    print(json.dumps(summary))
    report = {
        "benchmark": "bench_soak",
        "date": now(),
        "machine": machine(),
        "params": vars(args) | {"out": str(args.out)},
        "summary": summary,
        "processes": rows,
        "samples": samples,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
