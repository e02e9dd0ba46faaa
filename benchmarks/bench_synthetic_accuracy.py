"""Verdicts of the bundled model on the synthetic camera's ground truth, in process (no sockets).

Frames of the embedded default's synthetic camera (configs/default.yaml: 640x640, defect rate 0.5) go
through the live pipeline's code path, ``FeatureExtractor`` (reference = the camera's clean render, the
model card's feature spec) then ``Detector`` (the card's threshold, or ``inference.threshold``). The
figures that matter: the share of defective frames judged fail (target >= 98%) and of clean frames
judged fail (target <= 2%). Also reported: detection per defect kind (frames whose defects are all of
that kind), box recall (truth boxes that a region touches, 8 px margin), and what the false alarms look
like (scores, regions).

    python benchmarks/bench_synthetic_accuracy.py [--frames 200] [--seeds 0 1 2 3] [--config FILE]

Writes bench_out/bench_synthetic_accuracy.json.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _machine import machine, now, write_report

from stream_service.model.card import resolve_model_dir
from stream_service.model.session import InspectionModel
from stream_service.settings import SyntheticSource, load_settings
from stream_service.sources.camera import synthetic_camera
from stream_service.sources.synthetic import DEFECT_KINDS
from stream_service.stages.features import synthetic_reference
from stream_service.stages.inference import to_frame_regions
from stream_service.vision.inspection import Detector, FeatureExtractor

KIND_NAMES = {1: "open", 2: "short", 3: "mousebite", 4: "spur", 5: "spurious copper", 6: "pin-hole"}
MARGIN_PX = 8


def touches(region: Any, box: list[int]) -> bool:
    return bool(
        region.x1 <= box[2] + MARGIN_PX
        and box[0] <= region.x2 + MARGIN_PX
        and region.y1 <= box[3] + MARGIN_PX
        and box[1] <= region.y2 + MARGIN_PX
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="settings YAML (default: the embedded default)")
    parser.add_argument("--frames", type=int, default=200, help="frames per seed (board)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("bench_out/bench_synthetic_accuracy.json"))
    args = parser.parse_args()

    settings = load_settings(args.config)
    source = settings.cameras[0].source
    if not isinstance(source, SyntheticSource):
        raise SystemExit("the first camera of the config must be synthetic")
    model_dir = resolve_model_dir(settings.inference.model)
    model = InspectionModel.load(model_dir, "cpu", settings.inference.threads)
    card = model.card
    detector = Detector(model, threshold=settings.inference.threshold)
    dark = settings.cameras[0].polarity == "dark-object"

    defective = caught = clean = alarms = 0
    boxes_total = boxes_hit = 0
    by_kind: dict[int, list[int]] = {k: [0, 0] for k in DEFECT_KINDS}  # [frames, judged fail]
    box_kind: dict[int, list[int]] = {k: [0, 0] for k in DEFECT_KINDS}  # [boxes, touched]
    missed: list[dict[str, Any]] = []
    false_alarms: list[dict[str, Any]] = []
    clean_scores: list[float] = []
    fail_scores: list[float] = []
    started = time.perf_counter()
    for seed in args.seeds:
        board = source.model_copy(update={"seed": seed})
        camera = synthetic_camera(board)
        extractor = FeatureExtractor(
            synthetic_reference(board),
            card.features.to_spec(),
            dark,
            registration=settings.soartc.registration,
            max_shift=settings.soartc.max_shift_px,
            device="cpu",
        )
        for index in range(args.frames):
            frame, truth = camera.next_frame()
            extracted = extractor.extract(frame)
            detection = detector.detect(extracted.features)
            reg = extracted.registration
            regions = to_frame_regions(detection.highlight.regions, reg.dx, reg.dy, frame.shape)
            failed = detection.verdict == "fail"
            if truth["label"] == "fail":
                defective += 1
                caught += failed
                fail_scores.append(detection.score)
                kinds = {b[4] for b in truth["boxes"]}
                if len(kinds) == 1:
                    (kind,) = kinds
                    by_kind[kind][0] += 1
                    by_kind[kind][1] += failed
                for box in truth["boxes"]:
                    hit = failed and any(touches(r, box) for r in regions)
                    boxes_total += 1
                    boxes_hit += hit
                    box_kind[box[4]][0] += 1
                    box_kind[box[4]][1] += hit
                if not failed:
                    missed.append(
                        {
                            "seed": seed,
                            "frame": index,
                            "score": round(detection.score, 4),
                            "kinds": sorted(KIND_NAMES[k] for k in kinds),
                            "boxes": truth["boxes"],
                        }
                    )
            else:
                clean += 1
                alarms += failed
                clean_scores.append(detection.score)
                if failed:
                    false_alarms.append(
                        {
                            "seed": seed,
                            "frame": index,
                            "score": round(detection.score, 4),
                            "regions": [[r.x1, r.y1, r.x2, r.y2, r.area] for r in regions[:5]],
                            "shift": [round(reg.dx, 2), round(reg.dy, 2)],
                        }
                    )
    seconds = time.perf_counter() - started

    detected = caught / defective if defective else float("nan")
    false_alarm = alarms / clean if clean else float("nan")
    print(f"model {card.name} {card.version} (threshold {detector.threshold:.4f}), {model_dir}")
    print(
        f"synthetic camera {source.width}x{source.height}, seeds {args.seeds}, {args.frames} frames each, "
        f"{seconds:.0f} s"
    )
    print(f"defective frames judged fail: {caught}/{defective} = {detected:.2%}   (target >= 98%)")
    print(f"clean frames judged fail:     {alarms}/{clean} = {false_alarm:.2%}   (target <= 2%)")
    print(f"truth boxes touched by a region of a fail verdict: {boxes_hit}/{boxes_total}")
    print("per defect kind (frames of that kind only: judged fail / frames; boxes touched / boxes):")
    for kind in DEFECT_KINDS:
        frames, fails = by_kind[kind]
        boxes, hits = box_kind[kind]
        print(f"  {KIND_NAMES[kind]:<16} {fails:>4}/{frames:<4}  boxes {hits:>4}/{boxes:<4}")
    if clean_scores:
        print(f"clean-frame scores: median {np.median(clean_scores):.4f}, p99 {np.percentile(clean_scores, 99):.4f}")
    if fail_scores:
        print(f"defective-frame scores: median {np.median(fail_scores):.4f}, p1 {np.percentile(fail_scores, 1):.4f}")
    print(f"missed defective frames by kind: {dict(Counter(k for m in missed for k in m['kinds']))}")
    for alarm in false_alarms[:10]:
        print(f"  false alarm: {alarm}")

    report = {
        "benchmark": "bench_synthetic_accuracy",
        "date": now(),
        "machine": machine(),
        "model": {"name": card.name, "version": card.version, "threshold": detector.threshold, "dir": str(model_dir)},
        "camera": board.model_dump() | {"seeds": args.seeds, "frames_per_seed": args.frames},
        "defective_frames": defective,
        "defective_judged_fail": caught,
        "defective_judged_fail_rate": detected,
        "clean_frames": clean,
        "clean_judged_fail": alarms,
        "clean_judged_fail_rate": false_alarm,
        "clean_score_median": float(np.median(clean_scores)) if clean_scores else None,
        "clean_score_p99": float(np.percentile(clean_scores, 99)) if clean_scores else None,
        "defective_score_p1": float(np.percentile(fail_scores, 1)) if fail_scores else None,
        "boxes": boxes_total,
        "boxes_touched": boxes_hit,
        "by_kind": {KIND_NAMES[k]: {"frames": v[0], "judged_fail": v[1]} for k, v in by_kind.items()},
        "boxes_by_kind": {KIND_NAMES[k]: {"boxes": v[0], "touched": v[1]} for k, v in box_kind.items()},
        "missed": missed,
        "false_alarms": false_alarms,
        "seconds": seconds,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
