"""Training the SOARTC ViT on CPU: windows from a manifest, seeded, within a time budget.

Losses, per batch (pass windows oversampled to balance the classes):
- cross-entropy of the window verdict (ambiguous windows excluded);
- an attention loss: on windows with defect tokens, the KL divergence from the box-derived token
  distribution to the class token's last-layer attention, so that the attention *is* the filter;
- a per-token BCE on the token head, with the rare defect tokens weighted up (auxiliary).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional

from stream_service.quality.manifest import ManifestItem, load_manifest
from stream_service.quality.metrics import auroc
from stream_service.training.dataset import (
    AMBIGUOUS,
    FAIL,
    LATER_FIELDS,
    NO_AUGMENT,
    PASS,
    Augment,
    build_windows,
    calibrate_spec,
    split_by_group,
)
from stream_service.training.vit import SoartcViT, VitConfig
from stream_service.vision.tokens import FeatureSpec

log = logging.getLogger(__name__)

Arrays = tuple[npt.NDArray[np.float16], npt.NDArray[np.uint8], npt.NDArray[np.int8]]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (stored in the model card)."""

    seed: int = 0
    val_groups: tuple[str, ...] = ("group13000", "group50600")
    block: int = 16
    grid: int = 16
    train_windows_per_image: int = 12
    val_windows_per_image: int = 6
    rounds: int = 3
    minutes: float = 26.0
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.02
    attention_weight: float = 1.0
    token_weight: float = 0.5
    token_pos_weight: float = 8.0
    vit: VitConfig = field(default_factory=VitConfig)
    augment: Augment = field(default_factory=Augment)
    calibration_images: int = 60
    workers: int = 2
    # The front end the windows are made with (and the card records): registration and valid-region mask.
    registration: str = "translation"
    valid_region: bool = False
    # Hard-negative mining: from the second round on, each epoch adds this share (of the oversampled pass
    # count) of pass windows drawn in proportion to the model's current fail probability on them.
    hard_negatives: float = 0.0
    # Edge-jitter tolerance of the features in pixels (FeatureSpec.tolerance_px; 0: pixel to pixel).
    tolerance_px: int = 0
    # New board designs from the synthetic generator (training.synthetic), ``synthetic_frames`` frames each,
    # added to the training pairs only (never calibration, validation or evaluation); 0: none.
    synthetic_boards: int = 0
    synthetic_frames: int = 8
    # Their copper grown or etched back by region by up to this many pixels (training.synthetic.regional_etch).
    synthetic_etch_px: float = 0.0
    # > 0: the model is a soup, the uniform weight average of this recipe trained twice from the same
    # initialisation, once as given and once with ``augment.regional_etch_px`` at this value (cv.trained).
    soup_regional_etch_px: float = 0.0
    # Local refinement of the registration in pixels (FeatureSpec.local_px; 0: one warp per frame).
    local_px: int = 0


# TrainConfig fields added after recipes were checkpointed, at their "off" value (see LATER_FIELDS).
LATER_CONFIG = {
    "hard_negatives": 0.0,
    "tolerance_px": 0,
    "synthetic_boards": 0,
    "synthetic_frames": 8,
    "synthetic_etch_px": 0.0,
    "soup_regional_etch_px": 0.0,
    "local_px": 0,
}


def _windows_job(args: tuple[list[ManifestItem], FeatureSpec, int, int, Augment, int]) -> Arrays:
    items, spec, grid, per_image, aug, seed = args
    return build_windows(items, spec, grid, per_image, aug, seed)


def parallel_windows(
    items: list[ManifestItem], spec: FeatureSpec, grid: int, per_image: int, aug: Augment, seed: int, workers: int
) -> Arrays:
    """build_windows over ``workers`` processes, each on an interleaved share of items with its own seed."""
    jobs = [(items[k::workers], spec, grid, per_image, aug, seed * 1000 + k) for k in range(workers)]
    if workers == 1:
        parts = [_windows_job(jobs[0])]
    else:
        with get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_windows_job, jobs)
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
    )


def _batches(
    labels: npt.NDArray[np.int8],
    batch: int,
    rng: np.random.Generator,
    hardness: npt.NDArray[np.float32] | None = None,
    hard_share: float = 0.0,
) -> list[npt.NDArray[np.intp]]:
    """One epoch of batch indices with pass windows oversampled to match the fail windows.

    With ``hardness`` (the model's fail probability per window) a further ``hard_share`` of that pass count
    is drawn from the pass windows in proportion to their hardness: the good windows the model finds most
    like defects come back more often (hard-negative mining)."""
    passes, others = np.flatnonzero(labels == PASS), np.flatnonzero(labels != PASS)
    fails = int((labels == FAIL).sum())
    extra = rng.choice(passes, size=max(fails - passes.size, 0), replace=True) if passes.size else passes
    hard = passes[:0]
    if hardness is not None and hard_share > 0 and passes.size:
        weight = hardness[passes].astype(np.float64) + 1e-6
        size = round(hard_share * max(fails, passes.size))
        hard = rng.choice(passes, size=size, replace=True, p=weight / weight.sum())
    order = rng.permutation(np.concatenate([passes, extra, hard, others]))
    return [order[i : i + batch] for i in range(0, order.size, batch)]


def _pass_hardness(model: SoartcViT, windows: Arrays) -> npt.NDArray[np.float32]:
    """The model's fail probability on every pass window (0 elsewhere: only pass windows are mined)."""
    passes = np.flatnonzero(windows[2] == PASS)
    hardness = np.zeros(windows[2].size, np.float32)
    if passes.size:
        hardness[passes] = predict(model, windows[0][passes])[0]
    return hardness


def _loss(
    model: SoartcViT, tokens: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig
) -> torch.Tensor:
    logits, attention, token_logits = model.forward_all(tokens)
    known = labels != AMBIGUOUS
    loss = functional.cross_entropy(logits[known], labels[known].long()) if known.any() else logits.sum() * 0
    t = targets.float().flatten(1)
    has = t.sum(1) > 0
    if has.any() and cfg.attention_weight > 0:
        dist = t[has] / t[has].sum(1, keepdim=True)
        att = attention.flatten(1)[has].clamp_min(1e-8)
        loss = loss + cfg.attention_weight * (dist * (dist.clamp_min(1e-8).log() - att.log())).sum(1).mean()
    if cfg.token_weight > 0:
        pos_weight = torch.tensor(cfg.token_pos_weight)
        loss = loss + cfg.token_weight * functional.binary_cross_entropy_with_logits(
            token_logits.flatten(1), t, pos_weight=pos_weight
        )
    return loss


@torch.no_grad()
def predict(model: SoartcViT, tokens: npt.NDArray[np.float16], batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(fail probability (N,), attention (N, g, g)) for windows, in eval mode."""
    model.eval()
    probs, atts = [], []
    for i in range(0, len(tokens), batch):
        logits, attention = model(torch.from_numpy(tokens[i : i + batch].astype(np.float32)))
        probs.append(torch.softmax(logits, 1)[:, 1].numpy())
        atts.append(attention.numpy())
    model.train()
    return np.concatenate(probs), np.concatenate(atts)


def window_report(probs: np.ndarray, labels: np.ndarray, max_miss: float = 0.01) -> dict[str, float]:
    """Window AUROC and, at the highest threshold that keeps misses <= max_miss, the false-alarm rate."""
    known = labels != AMBIGUOUS
    p, y = probs[known], labels[known] == FAIL
    fail_scores = np.sort(p[y])
    k = math.floor(max_miss * fail_scores.size)
    threshold = float(fail_scores[k]) if fail_scores.size else 0.5
    return {
        "auroc": auroc(p, y),
        "threshold_at_miss": threshold,
        "miss_rate": float((p[y] < threshold).mean()),
        "false_alarm_rate": float((p[~y] >= threshold).mean()),
        "n_pass": int((~y).sum()),
        "n_fail": int(y.sum()),
    }


@dataclass
class TrainResult:
    model: SoartcViT
    spec: FeatureSpec
    config: TrainConfig
    history: list[dict[str, float]]
    validation: dict[str, float]
    train_items: int
    val_items: int
    seconds: float


def train(manifest: Path, cfg: TrainConfig, progress: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Train a SOARTC ViT from a manifest; deterministic for a given config and machine.

    With ``cfg.val_groups`` empty every pair trains and the last weights are kept (the recipe of the
    board-held-out folds and of the model trained on all boards after them).
    """
    from stream_service.errors import InputError

    if cfg.soup_regional_etch_px > 0:
        raise InputError(
            f"soup_regional_etch_px: expected 0 without cross-validation (a soup is made of the folds' "
            f"ingredients: train --folds K), found {cfg.soup_regional_etch_px:g}"
        )
    items = load_manifest(manifest)
    train_items, val_items = split_by_group(items, cfg.val_groups)
    if not train_items or (cfg.val_groups and not val_items):
        raise InputError(
            f"train/validation split by group: expected both non-empty with val_groups={list(cfg.val_groups)}, "
            f"found {len(train_items)} train and {len(val_items)} validation pairs"
        )
    # Named by the recipe's synthetic fields, so runs with other ones never overwrite its pairs.
    name = f"synthetic-{cfg.synthetic_boards}x{cfg.synthetic_frames}-etch{cfg.synthetic_etch_px:g}"
    extra = synthetic_pairs(cfg, Path("runs") / name)
    return train_on(train_items, val_items, cfg, progress, extra)


def synthetic_pairs(cfg: TrainConfig, folder: Path) -> list[ManifestItem]:
    """The recipe's synthetic training boards (``cfg.synthetic_boards``), written under ``folder``."""
    if cfg.synthetic_boards == 0:
        return []
    from stream_service.training.synthetic import synthetic_items

    items = synthetic_items(folder, cfg.synthetic_boards, cfg.synthetic_frames, etch_px=cfg.synthetic_etch_px)
    log.info("%d synthetic training pairs of %d new boards in %s", len(items), cfg.synthetic_boards, folder)
    return items


def train_on(
    train_items: list[ManifestItem],
    val_items: list[ManifestItem],
    cfg: TrainConfig,
    progress: Callable[[dict[str, float]], None] | None = None,
    extra_items: Sequence[ManifestItem] = (),
) -> TrainResult:
    """Train on the given pairs; validation windows from ``val_items`` pick the best epoch (none: the last).

    ``extra_items`` (synthetic boards) add training windows only: the calibration is measured on
    ``train_items``, and ``TrainResult.train_items`` counts those."""
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    calib_items = [
        train_items[i]
        for i in rng.choice(len(train_items), min(cfg.calibration_images, len(train_items)), replace=False)
    ]
    front = FeatureSpec(
        block=cfg.block,
        registration=_method(cfg.registration),
        valid_region=cfg.valid_region,
        tolerance_px=cfg.tolerance_px,
        local_px=cfg.local_px,
    )
    spec = calibrate_spec(calib_items, front)
    log.info("calibrated features on %d images: %s", len(calib_items), spec)
    val = (
        parallel_windows(val_items, spec, cfg.grid, cfg.val_windows_per_image, NO_AUGMENT, cfg.seed + 1, cfg.workers)
        if val_items
        else None
    )
    model = SoartcViT(cfg.vit)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The budget counts optimisation only, not data preparation (as `stream-service train --help` says):
    # a short budget still trains, however long the windows take to build.
    budget = cfg.minutes * 60
    trained = 0.0
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    step = 0
    for rnd in range(cfg.rounds):
        pairs = [*train_items, *extra_items]
        tr = parallel_windows(
            pairs, spec, cfg.grid, cfg.train_windows_per_image, cfg.augment, cfg.seed + 10 + rnd, cfg.workers
        )
        counts = np.bincount(tr[2] + 1, minlength=3)  # labels -1, 0, 1
        log.info("round %d: %d training windows (%s ambiguous/pass/fail)", rnd, len(tr[2]), counts)
        epoch = 0
        origin = time.monotonic() - trained  # time.monotonic() - origin = seconds trained so far
        while time.monotonic() - origin < (rnd + 1) * budget / cfg.rounds:
            hardness = _pass_hardness(model, tr) if rnd > 0 and cfg.hard_negatives > 0 else None
            for idx in _batches(tr[2], cfg.batch_size, rng, hardness, cfg.hard_negatives):
                frac = min((time.monotonic() - origin) / budget, 1.0)
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * min(1.0, (step + 1) / 200) * (0.5 * (1 + math.cos(math.pi * frac)))
                loss = _loss(
                    model,
                    torch.from_numpy(tr[0][idx].astype(np.float32)),
                    torch.from_numpy(tr[1][idx]),
                    torch.from_numpy(tr[2][idx]),
                    cfg,
                )
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
            epoch += 1
            report: dict[str, float] = {"round": rnd, "epoch": epoch, "step": step, "loss": loss.item()}
            if val is not None:
                probs, _ = predict(model, val[0])
                report.update(window_report(probs, val[2]))
            report["elapsed_s"] = time.monotonic() - started
            history.append(report)
            log.info("%s", json.dumps(report))
            if progress is not None:
                progress(report)
            if val is not None:
                score = report["auroc"] - report["false_alarm_rate"]
                if best is None or score > best[0]:
                    best = (score, {k: v.detach().clone() for k, v in model.state_dict().items()})
        trained = time.monotonic() - origin
    if best is not None:
        model.load_state_dict(best[1])
    validation: dict[str, float] = {}
    if val is not None:
        probs, _ = predict(model, val[0])
        validation = window_report(probs, val[2])
    return TrainResult(
        model=model,
        spec=spec,
        config=cfg,
        history=history,
        validation=validation,
        train_items=len(train_items),
        val_items=len(val_items),
        seconds=time.monotonic() - started,
    )


def _method(name: str) -> Literal["translation", "affine", "none"]:
    if name not in ("translation", "affine", "none"):
        from stream_service.errors import InputError

        raise InputError(f"registration method: expected translation, affine or none, found {name!r}")
    return name  # type: ignore[return-value]


def config_dict(cfg: TrainConfig) -> dict[str, object]:
    """The recipe as JSON; fields added later are left out at their "off" value (``LATER_FIELDS``,
    ``LATER_CONFIG``), so the checkpoints of earlier recipes keep their keys."""
    out: dict[str, object] = json.loads(json.dumps(asdict(cfg)))
    for fields, later in ((out["augment"], LATER_FIELDS), (out, LATER_CONFIG)):
        for name, off in later.items():
            if isinstance(fields, dict) and fields.get(name) == off:
                del fields[name]
    return out


def set_threads(threads: int | None) -> None:
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)


def save_checkpoint(result: TrainResult, path: Path) -> None:
    """Keep a trained network and everything ship() needs, so a failed export never costs the training."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state": result.model.state_dict(),
            "spec": asdict(result.spec),
            "config": asdict(result.config),
            "history": result.history,
            "validation": result.validation,
            "train_items": result.train_items,
            "val_items": result.val_items,
            "seconds": result.seconds,
        },
        path,
    )


def soup(ingredients: Sequence[TrainResult], cfg: TrainConfig) -> TrainResult:
    """The uniform weight average of networks trained from the same initialisation (a model soup,
    Wortsman et al. 2022), recorded with ``cfg``: one network of the same size and speed as each.

    The ingredients must share the architecture and the feature front end (the same calibration), so the
    averaged weights read the same tokens; integer buffers are taken from the first."""
    from stream_service.errors import InputError

    first = ingredients[0]
    for other in ingredients[1:]:
        if other.spec != first.spec or other.config.vit != first.config.vit:
            raise InputError(
                f"soup ingredients: expected one feature spec and architecture, found {first.spec} / "
                f"{first.config.vit} and {other.spec} / {other.config.vit}"
            )
    states = [r.model.state_dict() for r in ingredients]
    averaged = {
        name: (sum(s[name] for s in states) / len(states)) if value.is_floating_point() else value
        for name, value in states[0].items()
    }
    model = SoartcViT(first.config.vit)
    model.load_state_dict(averaged)
    model.eval()
    history = [{**h, "ingredient": float(n)} for n, r in enumerate(ingredients) for h in r.history]
    return TrainResult(
        model, first.spec, cfg, history, {}, first.train_items, first.val_items, sum(r.seconds for r in ingredients)
    )


def load_checkpoint(path: Path) -> TrainResult:
    """The TrainResult saved by save_checkpoint."""
    from stream_service.vision.soartc import Calibration

    data = torch.load(path, weights_only=False)
    raw = data["config"]
    cfg = TrainConfig(
        **{
            **raw,
            "val_groups": tuple(raw["val_groups"]),
            "vit": VitConfig(**raw["vit"]),
            "augment": Augment(**{**raw["augment"], "gain": tuple(raw["augment"]["gain"])}),
        }
    )
    s = data["spec"]
    spec = FeatureSpec(
        **{
            **s,
            "calibration": Calibration(**{**s["calibration"], "constants": tuple(s["calibration"]["constants"])}),
            "sub_calibration": Calibration(
                **{**s["sub_calibration"], "constants": tuple(s["sub_calibration"]["constants"])}
            ),
        }
    )
    model = SoartcViT(cfg.vit)
    model.load_state_dict(data["state"])
    return TrainResult(
        model, spec, cfg, data["history"], data["validation"], data["train_items"], data["val_items"], data["seconds"]
    )
