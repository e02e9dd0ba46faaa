"""``stream-service evaluate``: a manifest in, ``predictions.jsonl`` and ``metrics.json`` out.

Every pair goes through the same code as the live pipeline (``FeatureExtractor`` then ``Detector``,
or registration then the classical baseline), in process. Predictions follow ARCHITECTURE.md:
``{"id", "verdict", "score", "highlight": "masks/<id>.png"}`` with the frame-sized mask (nonzero =
highlighted); the figures in ``metrics.json`` are computed by ``stream_service.quality.metrics``, which
agrees with the reference scorer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from stream_service.errors import FrameShapeError, InputError
from stream_service.quality.manifest import load_manifest, read_gray
from stream_service.quality.metrics import Scoreboard
from stream_service.vision.baseline import BaselineParams, baseline
from stream_service.vision.inspection import Detector, FeatureExtractor, WindowModel, mask_png
from stream_service.vision.registration import Registrar
from stream_service.vision.soartc import Device, to_unit

log = logging.getLogger(__name__)

EvalMethod = Literal["vit", "baseline"]


def baseline_params(model: WindowModel) -> BaselineParams:
    """The classical method's parameters tuned on the model's training split (stored in its card)."""
    stored = model.card.training.get("baseline")
    if not isinstance(stored, dict):
        raise InputError("model card training.baseline: expected tuned baseline parameters, found none")
    return BaselineParams(**stored)


def evaluate(
    manifest: Path,
    out_dir: Path,
    model: WindowModel,
    method: EvalMethod = "vit",
    device: Device = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """Run every pair of a manifest, write predictions, masks and metrics; return the metrics."""
    items = load_manifest(manifest)
    card = model.card
    spec = card.features.to_spec()
    dark = card.features.polarity == "dark-object"
    detector = Detector(model)
    params = baseline_params(model) if method == "baseline" else None
    masks_dir = out_dir / "masks"
    masks_dir.mkdir(parents=True, exist_ok=True)
    board = Scoreboard()
    timings: list[float] = []
    lines: list[str] = []
    for n, item in enumerate(items):
        ref_u8, frame_u8 = read_gray(item.reference), read_gray(item.frame)
        if ref_u8.shape != frame_u8.shape:
            raise FrameShapeError(
                f"pair {item.id}: expected the frame to be {ref_u8.shape} like its reference, found {frame_u8.shape}"
            )
        started = time.perf_counter()
        if params is None:
            extractor = FeatureExtractor(ref_u8, spec, dark, device=device)
            detection = detector.detect(extractor.extract(frame_u8).features)
            verdict, score, mask = detection.verdict, detection.score, detection.highlight.mask_hw
        else:
            reference = to_unit(ref_u8, dark)
            frame = to_unit(frame_u8, dark)
            registrar = Registrar(reference, spec.registration or "translation")
            aligned, _ = registrar.front_end(frame, valid_region=spec.valid_region, local_px=spec.local_px)
            result = baseline(reference, aligned, params)
            verdict, score, mask = result.verdict, result.score, result.mask_hw
        timings.append((time.perf_counter() - started) * 1e3)
        mask_name = f"masks/{item.id}.png"
        cv2.imwrite(str(out_dir / mask_name), mask_png(mask))
        lines.append(json.dumps({"id": item.id, "verdict": verdict, "score": float(score), "highlight": mask_name}))
        board.add(item.kind or "crop", item.label, item.boxes, float(score), verdict, mask)
        if progress is not None:
            progress(n + 1, len(items))
    (out_dir / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    figures: dict[str, object] = {
        **board.figures(),
        "method": method,
        "model": f"{card.name} {card.version}",
        "threshold": detector.threshold if params is None else None,
        "baseline_params": asdict(params) if params is not None else None,
        "median_ms_per_pair": float(np.median(timings)) if timings else None,
        "manifest": str(manifest),
    }
    (out_dir / "metrics.json").write_text(json.dumps(figures, indent=1) + "\n")
    return figures
