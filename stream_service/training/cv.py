"""Honest validation by board: grouped K-fold cross-validation, pooled choices, then the model on all boards.

``cross_validate`` trains one model per fold (the shipping recipe, no validation boards: the last
weights are kept) on the boards outside the fold, and predicts every pair and crop of the fold's
held-out boards: an out-of-board prediction for each. The verdict threshold (``choose_threshold``) and
every highlight parameter (``grid_highlight``) are chosen on the pooled out-of-board predictions only;
the figures reported are those of the same pooled predictions, pooled and per board, next to the
classical baseline tuned on each fold's training boards. Then the shipped model is trained on every
board with the same recipe and carries the pooled choices and figures in its card.

Folds and the final model are checkpointed under ``out_dir``: a rerun with the same recipe trains only
what is missing. A front end other than the trained one (``Variant``: registration method and
valid-region mask at evaluation) reuses the trained folds and is reported in its own folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream_service.model.card import ONNX_NAME, file_sha256
from stream_service.model.session import InspectionModel
from stream_service.quality.crops import make_crop_manifest
from stream_service.quality.evaluation import evaluate
from stream_service.quality.gallery import write_gallery
from stream_service.quality.manifest import ManifestItem, load_manifest
from stream_service.quality.oof import (
    false_alarm_at_miss,
    operating_curve,
    pool_predictions,
    rates_at,
    score_by_group,
)
from stream_service.training.export import export_onnx
from stream_service.training.folds import Fold, assign_folds
from stream_service.training.ship import (
    FIGURE_KEYS,
    LICENCE_NOTE,
    _card,
    _full_frame_cache,
    _training_crops,
    _write_card,
    choose_threshold,
    grid_highlight,
    highlight_maps,
)
from stream_service.training.train import (
    TrainConfig,
    TrainResult,
    config_dict,
    load_checkpoint,
    save_checkpoint,
    soup,
    synthetic_pairs,
    train_on,
)
from stream_service.vision.baseline import BaselineParams, tune_baseline

log = logging.getLogger(__name__)

PROVISIONAL_HIGHLIGHT = {"attention": 1.0, "magnitude": 0.0, "max_elongation": 1e6, "min_area": 0}


@dataclass(frozen=True)
class Variant:
    """The front end a trained model is evaluated with (None: the one it was trained with)."""

    registration: str | None = None
    valid_region: bool | None = None
    tolerance_px: int | None = None
    highlight_tolerance_px: int | None = None
    local_px: int | None = None

    def apply(self, result: TrainResult) -> TrainResult:
        """The result with every field set here replacing the spec's field of the same name."""
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        return dataclasses.replace(result, spec=dataclasses.replace(result.spec, **changes))

    def name(self, result: TrainResult) -> str:
        spec = self.apply(result).spec
        return (
            (spec.registration or "translation")
            + ("+valid-region" if spec.valid_region else "")
            + (f"+tolerance{spec.tolerance_px}" if spec.tolerance_px else "")
            + (f"+highlight{spec.highlight_tolerance}" if spec.highlight_tolerance != spec.tolerance_px else "")
            + (f"+local{spec.local_px}" if spec.local_px else "")
        )


@dataclass(frozen=True)
class CvOptions:
    folds: int = 4
    max_miss: float = 0.01
    max_false_alarm: float = 0.02
    target_recall: float = 0.98
    stride: int = 12
    gallery: int = 6
    variant: Variant = dataclasses.field(default_factory=Variant)


def recipe(cfg: TrainConfig) -> TrainConfig:
    """The recipe of every fold and of the final model: no validation boards, the last weights kept."""
    return dataclasses.replace(cfg, val_groups=())


def _key(cfg: TrainConfig, train_groups: Sequence[str]) -> str:
    text = json.dumps({"config": config_dict(recipe(cfg)), "train": sorted(train_groups)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def trained(
    items: list[ManifestItem],
    train_groups: Sequence[str],
    cfg: TrainConfig,
    folder: Path,
    extra: Sequence[ManifestItem] = (),
) -> tuple[TrainResult, BaselineParams]:
    """The model (and the baseline) trained on ``train_groups`` by the recipe, from folder's checkpoint when
    an earlier run left one for the same recipe and boards; trained and checkpointed otherwise. ``extra``
    (the recipe's synthetic boards) adds training windows to every model, never a baseline crop."""
    if cfg.soup_regional_etch_px > 0:
        return _souped(items, train_groups, cfg, folder, extra)
    key = _key(cfg, train_groups)
    meta_path, ckpt = folder / "trained.json", folder / "checkpoint.pt"
    if meta_path.is_file() and ckpt.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            log.info("%s: resuming from its checkpoint (recipe %s)", folder, key)
            return load_checkpoint(ckpt), BaselineParams(**meta["baseline"])
    chosen = set(train_groups)
    train_items = [i for i in items if i.group in chosen]
    log.info("%s: training on %d pairs of %s", folder, len(train_items), sorted(chosen))
    result = train_on(train_items, [], recipe(cfg), extra_items=extra)
    save_checkpoint(result, ckpt)
    params = tune_baseline(_training_crops(train_items, cfg.seed, result.spec))
    meta = {"key": key, "train_groups": sorted(chosen), "baseline": asdict(params), "seconds": result.seconds}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return result, params


def soup_ingredients(cfg: TrainConfig) -> dict[str, TrainConfig]:
    """A soup recipe's ingredients by folder name: the recipe as given, and with regional etching."""
    plain = dataclasses.replace(cfg, soup_regional_etch_px=0.0)
    etched = dataclasses.replace(
        plain, augment=dataclasses.replace(plain.augment, regional_etch_px=cfg.soup_regional_etch_px)
    )
    return {"plain": plain, f"regional-etch-{cfg.soup_regional_etch_px:g}": etched}


def _souped(
    items: list[ManifestItem],
    train_groups: Sequence[str],
    cfg: TrainConfig,
    folder: Path,
    extra: Sequence[ManifestItem],
) -> tuple[TrainResult, BaselineParams]:
    """The soup recipe's model: each ingredient trained (or resumed) under ``folder/ingredients/NAME`` by
    ``trained``, with its own recipe key, then weight-averaged; the baseline is the plain ingredient's (the
    baseline never sees an augmentation, so both ingredients tune the same one)."""
    made = [
        trained(items, train_groups, ingredient, folder / "ingredients" / name, extra)
        for name, ingredient in soup_ingredients(cfg).items()
    ]
    return soup([result for result, _ in made], cfg), made[0][1]


def train_folds(
    manifest: Path,
    out_dir: Path,
    cfg: TrainConfig,
    k: int,
    final: bool = True,
    extra: Sequence[ManifestItem] | None = None,
) -> tuple[list[Fold], list[tuple[TrainResult, BaselineParams]]]:
    """Every fold's model (resumed where checkpointed), and the final model on all boards when ``final``.

    ``extra``: the recipe's synthetic pairs when the caller has them already (written under ``out_dir``
    here otherwise)."""
    items = load_manifest(manifest)
    folds = assign_folds([i.group for i in items], k)
    if extra is None:
        extra = synthetic_pairs(cfg, out_dir / "synthetic")
    results = [trained(items, f.train, cfg, out_dir / "folds" / f"fold-{f.index}", extra) for f in folds]
    if final:
        trained(items, sorted({str(i.group) for i in items}), cfg, out_dir / "final", extra)
    return folds, results


def _write_model(
    result: TrainResult,
    params: BaselineParams,
    folder: Path,
    threshold: float,
    highlight: dict[str, float],
    stride: int,
    extra: dict[str, Any] | None = None,
) -> InspectionModel:
    """model.onnx (exported once) and a card with the given threshold and highlight; loaded back."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / ONNX_NAME
    if not onnx_path.is_file():
        export_onnx(result.model, onnx_path)
    training = {"config": config_dict(result.config), "baseline": asdict(params), **(extra or {})}
    card = _card(
        result, folder.name, "cv", file_sha256(onnx_path), threshold, "cross-validation", highlight,
        "cross-validation", training, {}, [], stride,
    )  # fmt: skip
    _write_card(card, folder)
    return InspectionModel.load(folder, device="cpu")


def _subset(manifest: Path, groups: Sequence[str], out: Path, kinds: Sequence[str] = ("crop", "full")) -> Path:
    """The rows of ``manifest`` of the given groups and kinds, as a manifest next to it (same relative paths)."""
    keep = set(groups)
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    chosen = [r for r in rows if r.get("group") in keep and r.get("kind", "crop") in kinds]
    out.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return out


def _crop_scores(predictions: Path, rows: dict[str, ManifestItem]) -> tuple[np.ndarray, np.ndarray]:
    preds = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    crops = [(float(p["score"]), rows[p["id"]].label == "fail") for p in preds if rows[p["id"]].kind == "crop"]
    return np.array([c[0] for c in crops], np.float64), np.array([c[1] for c in crops], bool)


def _summary(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: figures[k] for k in FIGURE_KEYS if k in figures}


@dataclass
class Oof:
    """The pooled out-of-board outcome of one recipe and front end."""

    variant: str
    threshold: float
    threshold_note: str
    highlight: dict[str, float]
    highlight_note: str
    report: dict[str, Any]


def out_of_board(
    manifest: Path,
    out_dir: Path,
    folds: list[Fold],
    results: list[tuple[TrainResult, BaselineParams]],
    opts: CvOptions,
    progress: Callable[[str], None] | None = None,
) -> Oof:
    """Predict every held-out board with its fold's model; choose threshold and highlight on the pool."""
    say = progress or (lambda text: log.info("%s", text))
    started = time.monotonic()
    seed = results[0][0].config.seed
    data = out_dir / "oof-data"
    crop_manifest = data / "manifest.jsonl"
    if not crop_manifest.is_file():  # the same crops for every recipe and front end
        make_crop_manifest(load_manifest(manifest), data, n_fail=2, n_pass=2, seed=seed + 7)
    rows = {r.id: r for r in load_manifest(crop_manifest)}
    variants = [(f, opts.variant.apply(r), p) for f, (r, p) in zip(folds, results, strict=True)]
    name = opts.variant.name(results[0][0])
    root = out_dir / "oof" / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    subsets = {f.index: _subset(crop_manifest, f.held_out, data / f"fold-{f.index}.jsonl") for f in folds}
    crops_only = {
        f.index: _subset(crop_manifest, f.held_out, data / f"fold-{f.index}-crops.jsonl", ("crop",)) for f in folds
    }
    # 1. crop scores of every held-out board (threshold-free) and the baseline's predictions
    scores, labels = [], []
    for fold, result, params in variants:
        model = _write_model(
            result, params, root / "models" / f"fold-{fold.index}", 0.5, PROVISIONAL_HIGHLIGHT, opts.stride
        )
        evaluate(crops_only[fold.index], root / "scores" / f"fold-{fold.index}", model, device="cpu")
        s, y = _crop_scores(root / "scores" / f"fold-{fold.index}" / "predictions.jsonl", rows)
        scores.append(s)
        labels.append(y)
        evaluate(subsets[fold.index], root / "baseline" / f"fold-{fold.index}", model, method="baseline", device="cpu")
        say(f"fold {fold.index} ({', '.join(fold.held_out)}): scored {s.size} crops")
    pooled_s, pooled_y = np.concatenate(scores), np.concatenate(labels)
    choice = choose_threshold(pooled_s, pooled_y, opts.max_miss, opts.max_false_alarm)
    threshold = choice.value
    threshold_note = (
        f"chosen on the pooled out-of-board crop predictions of {len(folds)}-fold cross-validation by board "
        f"(every board held out once): the threshold that keeps the crop miss rate (target <= {opts.max_miss}) "
        f"and the false-alarm rate (target <= {opts.max_false_alarm}) furthest inside their targets in binomial "
        f"standard errors: miss {choice.miss_rate:.4f}, false alarms {choice.false_alarm_rate:.4f}, margin "
        f"{choice.margin_se:.2f} SE, on {int(pooled_y.sum())} fail and {int((~pooled_y).sum())} pass crops"
    )
    say(f"pooled threshold {threshold:.4f}: miss {choice.miss_rate:.4f}, false alarms {choice.false_alarm_rate:.4f}")
    # 2. highlight parameters on the pooled held-out full frames, each through its own fold's model
    maps = []
    for fold, _, _ in variants:
        model = InspectionModel.load(root / "models" / f"fold-{fold.index}", device="cpu")
        held = [r for r in rows.values() if r.group in set(fold.held_out)]
        maps.extend(highlight_maps(_full_frame_cache(model, held), model.run, threshold))
    block = results[0][0].spec.block
    hl_params, hl = grid_highlight(maps, block, opts.target_recall)
    del maps
    highlight_note = (
        f"best full-frame highlight precision with box recall >= {opts.target_recall} on the pooled out-of-board "
        "full frames (grid over attention x magnitude x elongation x minimum area; last-layer attention): "
        f"precision {hl['precision']:.3f}, box recall {hl['box_recall']:.3f}"
    )
    say(highlight_note)
    # 3. the out-of-board predictions at the pooled choices, pooled and scored as score.py scores them
    for fold, result, params in variants:
        model = _write_model(result, params, root / "models" / f"fold-{fold.index}", threshold, hl_params, opts.stride)
        evaluate(subsets[fold.index], root / "vit" / f"fold-{fold.index}", model, device="cpu")
    parts = [f"fold-{f.index}" for f in folds]
    for method in ("vit", "baseline"):
        pool_predictions([(root / method / p, p) for p in parts], root / method / "predictions.jsonl")
    report = _report(root, rows, folds, results, threshold, opts)
    report["threshold"] = {"value": threshold, "chosen_by": threshold_note}
    report["highlight"] = {**hl_params, "chosen_by": highlight_note}
    report["seconds"] = round(time.monotonic() - started, 1)
    report["manifest"] = str(crop_manifest)
    (root / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    if opts.gallery:
        front = variants[0][1].spec
        write_gallery(
            crop_manifest,
            root / "vit" / "predictions.jsonl",
            root / "gallery",
            opts.gallery,
            front.registration or "translation",
            front.tolerance_px,
            front.local_px,
        )
    return Oof(name, threshold, threshold_note, hl_params, highlight_note, report)


def _report(
    root: Path,
    rows: dict[str, ManifestItem],
    folds: list[Fold],
    results: list[tuple[TrainResult, BaselineParams]],
    threshold: float,
    opts: CvOptions,
) -> dict[str, Any]:
    items = list(rows.values())
    vit_pooled, vit_groups = score_by_group(items, root / "vit" / "predictions.jsonl")
    base_pooled, base_groups = score_by_group(items, root / "baseline" / "predictions.jsonl")
    vs, vy = _crop_scores(root / "vit" / "predictions.jsonl", rows)
    bs, by = _crop_scores(root / "baseline" / "predictions.jsonl", rows)
    at_threshold = rates_at(vs, vy, threshold)
    equal_miss = false_alarm_at_miss(bs, by, at_threshold["miss_rate"])
    # The baseline's area scores are coarse: below some miss rate it has to flag everything. So the fair pair
    # is the ViT at the baseline's own operating point (its miss rate at its tuned threshold).
    base_miss = float(base_pooled["crop_miss_rate"])
    vit_at_base = false_alarm_at_miss(vs, vy, base_miss)
    base_alarms = float(base_pooled["crop_false_alarm_rate"])
    return {
        "protocol": (
            f"{len(folds)}-fold cross-validation by board: each fold's model trained on the other boards with "
            "the recipe below; every crop and full frame predicted by the model that never saw its board; "
            "threshold and highlight chosen on the pooled predictions; baseline tuned on each fold's training "
            "boards (its own threshold: the smallest region area keeping the training-crop miss rate <= 1%)"
        ),
        "folds": [
            {
                **f.as_dict(),
                "train_seconds": round(r.seconds, 1),
                "steps": r.history[-1]["step"] if r.history else 0,
                "baseline": asdict(p),
            }
            for f, (r, p) in zip(folds, results, strict=True)
        ],
        "pooled": {
            "vit": {
                **_summary(vit_pooled),
                "false_alarm_at_1pct_miss": false_alarm_at_miss(vs, vy, opts.max_miss),
                "at_baseline_miss_rate": vit_at_base,
            },
            "baseline": {
                **_summary(base_pooled),
                "false_alarm_at_1pct_miss": false_alarm_at_miss(bs, by, opts.max_miss),
                "at_vit_miss_rate": equal_miss,
            },
            "equal_miss": {
                "miss_rate": base_miss,
                "vit_false_alarm_rate": vit_at_base["false_alarm_rate"],
                "baseline_false_alarm_rate": base_alarms,
                "ratio": vit_at_base["false_alarm_rate"] / base_alarms if base_alarms > 0 else None,
                "note": "the ViT at the baseline's own miss rate (its verdicts at the threshold tuned per fold)",
            },
        },
        "boards": {
            g: {"vit": _summary(vit_groups[g]), "baseline": _summary(base_groups.get(g, {}))} for g in vit_groups
        },
        "operating_curve": {"vit": operating_curve(vs, vy), "baseline": operating_curve(bs, by)},
    }


def cross_validate(
    manifest: Path,
    out_dir: Path,
    cfg: TrainConfig,
    opts: CvOptions,
    name: str,
    version: str,
    experiments: list[dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Oof:
    """Folds, the pooled out-of-board choices and figures, then the model on all boards in ``out_dir``."""
    extra = synthetic_pairs(cfg, out_dir / "synthetic")  # written once, for the folds and the final model
    folds, results = train_folds(manifest, out_dir, cfg, opts.folds, final=False, extra=extra)
    oof = out_of_board(manifest, out_dir, folds, results, opts, progress)
    items = load_manifest(manifest)
    final, params = trained(items, sorted({str(i.group) for i in items}), cfg, out_dir / "final", extra)
    final = opts.variant.apply(final)
    onnx_path = out_dir / ONNX_NAME
    onnx_path.unlink(missing_ok=True)
    export_onnx(final.model, onnx_path)
    training = {
        "data": "DeepPCB training split (1,000 aligned template/tested pairs, 640x640, binarised), all 7 boards",
        "licence": LICENCE_NOTE,
        "split": {"validation_groups": [], "train_pairs": final.train_items, "validation": "cross-validation by board"},
        "config": config_dict(final.config),
        "seconds": round(final.seconds, 1),
        "steps": steps_of(final.history),
        "baseline": asdict(params),
        "folds": [f.as_dict() for f in folds],
    }
    validation = {"data": "out-of-board predictions of every pair and crop (see protocol)", **oof.report}
    card = _card(
        final, name, version, file_sha256(onnx_path), oof.threshold, oof.threshold_note, oof.highlight,
        oof.highlight_note, training, validation, experiments or [], opts.stride,
    )  # fmt: skip
    _write_card(card, out_dir)
    return oof


def steps_of(history: Sequence[dict[str, float]]) -> int | list[int]:
    """The optimisation steps a model had: one count, or one per ingredient of a soup (``train.soup``)."""
    if not history:
        return 0
    if "ingredient" not in history[-1]:
        return int(history[-1]["step"])
    last = {entry["ingredient"]: int(entry["step"]) for entry in history}  # each ingredient's final entry
    return [last[n] for n in sorted(last)]


def summary_line(oof: Oof, out_dir: Path) -> str:
    """One paragraph of the pooled out-of-board figures, for the terminal."""
    vit, base = oof.report["pooled"]["vit"], oof.report["pooled"]["baseline"]
    eq = oof.report["pooled"]["equal_miss"]
    return (
        f"model -> {out_dir} ({oof.variant}); out-of-board, pooled over {len(oof.report['folds'])} folds: threshold "
        f"{oof.threshold:.4f}, crop AUROC {vit['crop_auroc']:.4f}, miss {vit['crop_miss_rate']:.4f}, false alarms "
        f"{vit['crop_false_alarm_rate']:.4f} (at 1% miss {vit['false_alarm_at_1pct_miss']['false_alarm_rate']:.4f}), "
        f"highlight precision {vit['full_highlight_precision']:.3f}, box recall {vit['full_box_recall']:.3f}; "
        f"baseline: AUROC {base['crop_auroc']:.4f}, miss {base['crop_miss_rate']:.4f}, false alarms "
        f"{base['crop_false_alarm_rate']:.4f}, against the ViT's {eq['vit_false_alarm_rate']:.4f} at that miss rate; "
        f"report {out_dir / 'oof' / oof.variant / 'report.json'}"
    )
