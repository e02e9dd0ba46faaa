"""Inference time per frame: the ONNX ViT over all windows of a frame (one batch) against the baseline.

For each frame size (default 640x640, a real DeepPCB pair; larger sizes tiled from it) it times, in the
same run and on the same frames:
- ``features``: registration + SOARTC token features (the soartc stage's work);
- ``vit``: the model on all windows in one batched ONNX Runtime call (the 25 ms budget);
- ``vit+highlight``: the infer stage's whole work (model, verdict, attention filter, regions);
- ``baseline``: the classical method (threshold, opening, regions) on the registered frame.
Prints a table of medians and p90s, with the ratio of the ViT to the baseline, and writes JSON.

    python benchmarks/bench_inference.py [--sizes 640x640,1920x1080] [--repeats 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
from _machine import machine, now, write_report

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stream_service.model.card import default_model_dir  # noqa: E402
from stream_service.model.session import InspectionModel  # noqa: E402
from stream_service.quality.evaluation import baseline_params  # noqa: E402
from stream_service.quality.manifest import read_gray  # noqa: E402
from stream_service.vision.baseline import BaselineParams, baseline  # noqa: E402
from stream_service.vision.inspection import Detector, FeatureExtractor  # noqa: E402
from stream_service.vision.registration import Registrar  # noqa: E402
from stream_service.vision.soartc import cuda_available, to_unit  # noqa: E402
from stream_service.vision.windows import WindowLayout  # noqa: E402


def dataset_pair() -> tuple[np.ndarray, np.ndarray, str]:
    root = Path(os.environ.get("STREAM_SERVICE_DATASETS", REPO.parent / "shared" / "datasets")) / "deeppcb"
    group = root / "PCBData" / "group20085" / "20085"
    ref, frame = group / "20085000_temp.jpg", group / "20085000_test.jpg"
    if ref.is_file():
        return read_gray(ref), read_gray(frame), "DeepPCB 20085000"
    from stream_service.sources.synthetic import SyntheticCamera

    cam = SyntheticCamera(seed=3, defect_rate=1.0)
    return cam.reference(), cam.next_frame()[0], "synthetic camera (DeepPCB not found)"


def tiled(image: np.ndarray, h: int, w: int) -> np.ndarray:
    reps = (-(-h // image.shape[0]), -(-w // image.shape[1]))
    return np.ascontiguousarray(np.tile(image, reps)[:h, :w])


def timed(fn, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1e6)
    return out


def measure(
    size: str,
    ref: np.ndarray,
    frame: np.ndarray,
    model: InspectionModel,
    detector: Detector,
    params: BaselineParams,
    repeats: int,
) -> list[dict[str, object]]:
    """The four paths on one frame size, each timed ``repeats`` times after a warm-up."""
    spec = model.card.features.to_spec()
    extractor = FeatureExtractor(ref, spec, True, device="cpu")
    feats = extractor.extract(frame).features
    layout = WindowLayout.cover(feats.tokens_hwc.shape[:2], model.card.window.grid, model.card.window.stride)
    windows = layout.cut(feats.tokens_hwc)
    ref_unit = to_unit(ref, True)
    registrar = Registrar(ref_unit)
    frame_unit = to_unit(frame, True)

    def run_baseline() -> None:
        aligned, _ = registrar.align(frame_unit)
        baseline(ref_unit, aligned, params)

    results = {"features": timed(lambda: extractor.extract(frame), repeats)}
    if cuda_available():  # the same work with the SOARTC kernels on the GPU (soartc.device: cuda)
        on_gpu = FeatureExtractor(ref, spec, True, device="cuda")
        results["features-cuda"] = timed(lambda: on_gpu.extract(frame), repeats)
    results |= {
        "vit": timed(lambda: model.run(windows), repeats),
        "vit+highlight": timed(lambda: detector.detect(feats), repeats),
        "baseline": timed(run_baseline, repeats),
    }
    base = statistics.median(results["baseline"])
    return [
        {
            "size": size,
            "path": path,
            "windows": len(layout.origins),
            "median_ms": statistics.median(samples),
            "p90_ms": float(np.percentile(samples, 90)),
            "x_baseline": statistics.median(samples) / base,
            "samples_ms": samples,
        }
        for path, samples in results.items()
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="640x640,1920x1080")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "bench_inference.json")
    args = parser.parse_args()

    model = InspectionModel.load(args.model, device="cpu", threads=args.threads)
    detector = Detector(model)
    try:
        params = baseline_params(model)
    except Exception:  # noqa: BLE001 - a card without tuned parameters still gets a baseline row
        params = BaselineParams()
    ref_u8, frame_u8, source = dataset_pair()
    rows = []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        rows += measure(size, tiled(ref_u8, h, w), tiled(frame_u8, h, w), model, detector, params, args.repeats)
    print(f"inference per frame: model {model.card.name} {model.card.version}, {args.threads} ORT threads, {source}")
    print(f"{'size':>10}  {'path':<14} {'windows':>7} {'median ms':>10} {'p90 ms':>8} {'x baseline':>10}")
    for r in rows:
        print(
            f"{r['size']:>10}  {r['path']:<14} {r['windows']:>7} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} "
            f"{r['x_baseline']:>10.2f}"
        )
    report = {
        "benchmark": "bench_inference",
        "date": now(),
        "machine": machine(onnxruntime=onnxruntime.__version__),
        "model": f"{model.card.name} {model.card.version}",
        "threads": args.threads,
        "data": source,
        "rows": rows,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
