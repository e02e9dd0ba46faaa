"""Per-frame cost of SOARTC on the CPU and the GPU, against a plain difference-mosaic baseline.

Paths timed per frame size (medians and p90 over --repeats runs, warm-up runs excluded):

- baseline: the "difference mosaic" ``cv2.absdiff(ref_u8, frame_u8)`` then ``cv2.resize(diff, (W // b, H // b),
  INTER_AREA)`` on uint8 frames: the cheapest block-wise difference image one could feed a classifier.
  Every ratio in the table is median(path) / median(baseline).
- cpu metrics: ``soartc_metrics`` (Numba) on float32 frames.
- cpu features: metrics + deviations + uint8 mosaic, what the features stage computes per frame.
- gpu metrics: ``CudaSoartc.metrics`` including the upload, the download and the synchronisation.
- gpu kernel: ``CudaSoartc.metrics_device`` on a frame already on the GPU, timed with CUDA events.
- gpu features: gpu metrics + deviations + mosaic on the CPU.

Frames come from a real DeepPCB pair (template = reference, tested image = frame), tiled to the size,
mapped to float32 in [0, 1] and inverted (dark copper). Without the data set (or with --synthetic) a
seeded synthetic PCB pattern with injected defects stands in, and the table and the JSON say so.
Each path cycles over --frames copies of the frame in distinct memory, so large frames are not served
from the CPU cache more than they would be in the service.

Run: ``python benchmarks/bench_soartc.py [--sizes 640x640,1920x1080] [--repeats 30] [--threads 8]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numba
import numpy as np
from _machine import machine, write_report

from stream_service.vision.soartc import (
    VARIANTS,
    Calibration,
    calibrate,
    cuda_available,
    dark_blocks,
    deviations,
    mosaic,
    soartc_metrics,
    to_unit,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = "640x640,1920x1080,2448x2048"
TILE = 640
NO_CUDA = "n/a (no CUDA)"


def datasets_root(arg: str | None) -> Path:
    """--datasets, else $STREAM_SERVICE_DATASETS, else <repo>/../shared/datasets."""
    if arg:
        return Path(arg)
    env = os.environ.get("STREAM_SERVICE_DATASETS")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


def deeppcb_pair(root: Path) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The first pair of the DeepPCB manifest as uint8 gray (template, tested), or None when absent."""
    manifest = root / "deeppcb" / "manifest.jsonl"
    if not manifest.is_file():
        return None
    with manifest.open() as f:
        entry = json.loads(f.readline())
    ref = cv2.imread(str(root / "deeppcb" / entry["reference"]), cv2.IMREAD_GRAYSCALE)
    frame = cv2.imread(str(root / "deeppcb" / entry["frame"]), cv2.IMREAD_GRAYSCALE)
    if ref is None or frame is None or ref.shape != frame.shape:
        return None
    return ref, frame, f"DeepPCB pair {entry['id']} ({manifest.parent})"


def synthetic_pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """A deterministic PCB-like binary tile (black copper on white), and a copy with 8 injected defects."""
    rng = np.random.default_rng(seed)
    ref = np.full((TILE, TILE), 255, np.uint8)
    for _ in range(40):  # traces: straight horizontal or vertical runs
        x, y = (int(v) for v in rng.integers(0, TILE, 2))
        length, width = int(rng.integers(60, 400)), int(rng.integers(3, 9))
        end = (min(x + length, TILE - 1), y) if rng.random() < 0.5 else (x, min(y + length, TILE - 1))
        cv2.line(ref, (x, y), end, 0, width)
    for _ in range(60):  # pads, some with a drill hole
        x, y = (int(v) for v in rng.integers(0, TILE - 24, 2))
        w, h = (int(v) for v in rng.integers(8, 24, 2))
        cv2.rectangle(ref, (x, y), (x + w, y + h), 0, -1)
        if rng.random() < 0.5:
            cv2.circle(ref, (x + w // 2, y + h // 2), 2, 255, -1)
    frame = ref.copy()
    for k in range(8):  # opens and pin-holes (white on copper), shorts and spurs (black on background)
        x, y = (int(v) for v in rng.integers(20, TILE - 40, 2))
        colour = 255 if k % 2 == 0 else 0
        w, h = (int(v) for v in rng.integers(4, 16, 2))
        cv2.rectangle(frame, (x, y), (x + w, y + h), colour, -1)
    return ref, frame, f"synthetic PCB pattern (seed {seed}, 8 injected defects)"


def tile_to(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The 640 x 640 image tiled (np.tile) and cropped to height x width."""
    reps = (math.ceil(height / image.shape[0]), math.ceil(width / image.shape[1]))
    return np.ascontiguousarray(np.tile(image, reps)[:height, :width])


def timed(fn: Callable[[int], object], repeats: int, warmup: int) -> list[float]:
    """Milliseconds of fn(i) for i in range(repeats), after `warmup` untimed calls."""
    for i in range(warmup):
        fn(i)
    samples = []
    for i in range(repeats):
        start = time.perf_counter_ns()
        fn(i)
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


def gpu_event_timed(kernel: Any, frames_d: list[Any], repeats: int, warmup: int) -> list[float]:
    """Milliseconds of kernel.metrics_device on device-resident frames, measured by CUDA events."""
    import cupy

    for i in range(warmup):
        kernel.metrics_device(frames_d[i % len(frames_d)])
    kernel.stream.synchronize()
    samples = []
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    for i in range(repeats):
        start.record(kernel.stream)
        kernel.metrics_device(frames_d[i % len(frames_d)])
        end.record(kernel.stream)
        end.synchronize()
        samples.append(float(cupy.cuda.get_elapsed_time(start, end)))
    return samples


def agreement(gpu: tuple[np.ndarray, ...], cpu: tuple[np.ndarray, ...]) -> dict[str, float | bool]:
    """Max abs error, max relative error where |cpu| > 1e-3, and allclose(rtol=1e-5, atol=1e-6)."""
    max_abs, max_rel, ok = 0.0, 0.0, True
    for g, c in zip(gpu, cpu, strict=True):
        diff = np.abs(g.astype(np.float64) - c)
        max_abs = max(max_abs, float(diff.max()))
        big = np.abs(c) > 1e-3
        if big.any():
            max_rel = max(max_rel, float((diff[big] / np.abs(c[big])).max()))
        ok = ok and bool(np.allclose(g, c, rtol=1e-5, atol=1e-6))
    return {"max_abs_error": max_abs, "max_rel_error": max_rel, "allclose": ok}


def machine_info(threads: int) -> dict[str, Any]:
    info = machine(numba_threads=threads, numba=numba.__version__, gpu=None, cupy=None)
    if cuda_available():
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        info["cupy"] = cupy.__version__
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    return info


def row(size: str, path: str, samples: list[float] | None, pixels: int, base_ms: float | None) -> dict[str, Any]:
    if samples is None:
        return {"size": size, "path": path, "median_ms": None, "note": NO_CUDA}
    median = float(np.median(samples))
    return {
        "size": size,
        "path": path,
        "median_ms": median,
        "p90_ms": float(np.percentile(samples, 90)),
        "mpix_per_s": pixels / (median / 1e3) / 1e6,
        "ratio_to_baseline": median / base_ms if base_ms else 1.0,
        "samples_ms": samples,
    }


def bench_size(
    width: int,
    height: int,
    pair: tuple[np.ndarray, np.ndarray],
    args: argparse.Namespace,
    use_gpu: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    size = f"{width}x{height}"
    b, variant, n = args.block, args.variant, args.frames
    ref_u8, frame_u8 = (tile_to(image, width, height) for image in pair)
    ref = to_unit(ref_u8, dark_object=True)
    frame = to_unit(frame_u8, dark_object=True)
    frames_u8 = [frame_u8.copy() for _ in range(n)]
    frames = [frame.copy() for _ in range(n)]
    grid = (width // b, height // b)
    dark = dark_blocks(ref, b)
    cal: Calibration = calibrate([deviations(*soartc_metrics(ref, frame, b, variant), dark)])

    def baseline(i: int) -> object:
        return cv2.resize(cv2.absdiff(ref_u8, frames_u8[i % n]), grid, interpolation=cv2.INTER_AREA)

    def cpu_metrics(i: int) -> object:
        return soartc_metrics(ref, frames[i % n], b, variant)

    def cpu_features(i: int) -> object:
        return mosaic(deviations(*soartc_metrics(ref, frames[i % n], b, variant), dark), cal)

    rep, warm = args.repeats, args.warmup
    base = timed(baseline, rep, warm)
    base_ms = float(np.median(base))
    rows = [
        row(size, "baseline absdiff+INTER_AREA (uint8)", base, width * height, None),
        row(size, f"cpu metrics (numba, b={b}, {variant})", timed(cpu_metrics, rep, warm), width * height, base_ms),
        row(size, "cpu features (metrics+deviations+mosaic)", timed(cpu_features, rep, warm), width * height, base_ms),
    ]
    gpu_paths = [
        "gpu metrics (upload+kernel+download)",
        "gpu kernel only (CUDA events)",
        "gpu features (gpu metrics+cpu mosaic)",
    ]
    if not use_gpu:
        return rows + [row(size, path, None, width * height, base_ms) for path in gpu_paths], None

    import cupy

    from stream_service.vision.soartc_cuda import CudaSoartc

    kernel = CudaSoartc(ref, b, variant)

    def gpu_metrics(i: int) -> object:
        return kernel.metrics(frames[i % n])

    def gpu_features(i: int) -> object:
        return mosaic(deviations(*kernel.metrics(frames[i % n]), dark), cal)

    frames_d = [cupy.asarray(f) for f in frames]
    cupy.cuda.Device().synchronize()
    rows += [
        row(size, gpu_paths[0], timed(gpu_metrics, rep, warm), width * height, base_ms),
        row(size, gpu_paths[1], gpu_event_timed(kernel, frames_d, rep, warm), width * height, base_ms),
        row(size, gpu_paths[2], timed(gpu_features, rep, warm), width * height, base_ms),
    ]
    check = agreement(kernel.metrics(frame), soartc_metrics(ref, frame, b, variant))
    return rows, {"size": size, **check}


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    print(header)
    print(f"{'size':>10}  {'path':<42} {'median ms':>10} {'p90 ms':>9} {'Mpix/s':>9} {'x baseline':>10}")
    for r in rows:
        if r["median_ms"] is None:
            print(f"{r['size']:>10}  {r['path']:<42} {r['note']:>10}")
            continue
        print(
            f"{r['size']:>10}  {r['path']:<42} {r['median_ms']:>10.3f} {r['p90_ms']:>9.3f} "
            f"{r['mpix_per_s']:>9.1f} {r['ratio_to_baseline']:>10.2f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"WxH list, comma-separated (default {DEFAULT_SIZES})")
    p.add_argument("--block", type=int, default=8, choices=(4, 8, 16))
    p.add_argument("--variant", default="v1.1", choices=VARIANTS)
    p.add_argument("--repeats", type=int, default=30, help="timed runs per path and size (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (JIT, caches, CUDA context)")
    p.add_argument("--frames", type=int, default=4, help="distinct frame buffers cycled through (default 4)")
    p.add_argument("--threads", type=int, default=None, help="Numba and OpenCV threads (default: all cores)")
    p.add_argument("--datasets", default=None, help="datasets folder (default $STREAM_SERVICE_DATASETS)")
    p.add_argument("--synthetic", action="store_true", help="use the synthetic PCB pattern, not DeepPCB")
    p.add_argument("--out", default="bench_out/bench_soartc.json", help="JSON results path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    if threads > numba.config.NUMBA_NUM_THREADS:
        print(f"note: --threads {threads} capped at the {numba.config.NUMBA_NUM_THREADS} threads Numba has")
        threads = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(threads)
    cv2.setNumThreads(threads)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]

    root = datasets_root(args.datasets)
    found = None if args.synthetic else deeppcb_pair(root)
    if found is None:
        ref_u8, frame_u8, source = synthetic_pair()
        if not args.synthetic:
            source += f"; DeepPCB not found under {root}"
    else:
        ref_u8, frame_u8, source = found
    use_gpu = cuda_available()
    info = machine_info(threads)

    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    for width, height in sizes:
        size_rows, check = bench_size(width, height, (ref_u8, frame_u8), args, use_gpu)
        rows += size_rows
        if check is not None:
            checks.append(check)

    header = (
        f"SOARTC per frame: block {args.block}, {args.variant}, {args.repeats} runs ({args.warmup} warm-up), "
        f"{threads} CPU threads, GPU {info['gpu'] or NO_CUDA}\ndata: {source}"
    )
    print_table(rows, header)
    for c in checks:
        print(
            f"gpu vs cpu {c['size']}: max rel error {c['max_rel_error']:.2e} (|cpu| > 1e-3), "
            f"max abs error {c['max_abs_error']:.2e}, allclose(rtol=1e-5, atol=1e-6) {c['allclose']}"
        )
    if not use_gpu:
        print("gpu vs cpu: not checked (no CUDA)")

    result = {
        "machine": info,
        "config": dict(vars(args)),
        "data": {"source": source, "synthetic": found is None},
        "baseline": "cv2.absdiff(ref_u8, frame_u8) + cv2.resize(INTER_AREA) to the block grid, uint8",
        "results": rows,
        "gpu_cpu_agreement": checks or NO_CUDA,
    }
    write_report(Path(args.out), {"benchmark": "bench_soartc", **result})
    return 0 if all(c["allclose"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
