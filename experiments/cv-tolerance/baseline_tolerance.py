"""The classical baseline given the ViT's edge-jitter tolerance: does the tolerance alone close the gap?

The same out-of-board protocol as ``stream-service train --folds 4`` runs for the baseline: per fold, the
baseline is tuned on the fold's training boards (``tune_baseline`` on the same training crops) and run on
the held-out boards' crops, all with the shipped front end (affine registration, valid-region mask), once
as shipped and once with ``forgive_jitter`` at ``--tolerance-px`` applied to every registered frame.
Pooled AUROC, false alarms at the baseline's own tuned miss rate and the operating curve are printed and
written as JSON.

    python experiments/cv-tolerance/baseline_tolerance.py runs/cv-f --out experiments/cv-tolerance/baseline.json

RUN_DIR is a cross-validation run folder: its ``oof-data/fold-K-crops.jsonl`` are the held-out crops (the
baseline is retuned here, with and without the tolerance; the run's own parameters are not read).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from stream_service.quality.manifest import load_manifest, read_gray
from stream_service.quality.metrics import auroc
from stream_service.quality.oof import false_alarm_at_miss, operating_curve
from stream_service.training.folds import assign_folds
from stream_service.training.ship import _training_crops
from stream_service.vision.baseline import baseline, tune_baseline
from stream_service.vision.registration import Registrar, mask_invalid
from stream_service.vision.soartc import to_unit
from stream_service.vision.tokens import FeatureSpec, forgive_jitter

DEEPPCB = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "deeppcb" / "manifest.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--manifest", type=Path, default=DEEPPCB)
    parser.add_argument("--tolerance-px", type=int, default=1)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    spec = FeatureSpec(registration="affine", valid_region=True)
    items = load_manifest(args.manifest)
    folds = assign_folds([i.group for i in items], args.folds)
    data = args.run_dir / "oof-data"
    pooled: dict[int, list[tuple[float, bool, int]]] = {0: [], args.tolerance_px: []}
    per_fold = []
    for fold in folds:
        train = [i for i in items if i.group in set(fold.train)]
        crops = _training_crops(train, 0, spec)
        held = load_manifest(data / f"fold-{fold.index}-crops.jsonl")
        seen = []
        for item in held:
            reference = to_unit(read_gray(item.reference), True)
            aligned, reg = Registrar(reference, "affine").align(to_unit(read_gray(item.frame), True))
            seen.append((reference, mask_invalid(reference, aligned, reg), item.label == "fail"))
        for px in pooled:
            tuned = tune_baseline([(r, forgive_jitter(r, a, px), y) for r, a, y in crops])
            for r, a, y in seen:
                result = baseline(r, forgive_jitter(r, a, px), tuned)
                pooled[px].append((result.score, y, tuned.min_area))
            per_fold.append({"fold": fold.index, "tolerance_px": px, "params": asdict(tuned)})
            print(f"fold {fold.index} tolerance {px}: {tuned}", flush=True)
    out: dict[str, object] = {"run_dir": str(args.run_dir), "per_fold": per_fold}
    for px, rows in pooled.items():
        scores = np.array([s for s, _, _ in rows])
        labels = np.array([y for _, y, _ in rows])
        own = np.array([s >= m for s, _, m in rows])
        own_rates = {"miss_rate": float((~own[labels]).mean()), "false_alarm_rate": float(own[~labels].mean())}
        at_1 = false_alarm_at_miss(scores, labels, 0.01)
        out[f"tolerance_{px}"] = {
            "crop_auroc": auroc(scores, labels),
            "at_its_own_threshold": own_rates,
            "at_1pct_miss": at_1,
            "operating_curve": operating_curve(scores, labels),
        }
        print(f"tolerance {px}: own threshold {own_rates}; at 1% miss {at_1}")
        for point in out[f"tolerance_{px}"]["operating_curve"]:  # type: ignore[index]
            print(f"  {point}")
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
