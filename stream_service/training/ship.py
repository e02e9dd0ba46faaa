"""From a trained network to a shipped model folder: ONNX file, model card, chosen thresholds, figures.

Everything here is chosen on the validation boards (never on images the model trained on, never on
the held-out test): the verdict threshold leaves the crop miss and false-alarm rates furthest inside
their targets (``choose_threshold``) and the highlight thresholds give the best highlight precision
that keeps box recall >= ``target_recall`` on full frames. The classical baseline is tuned on the
training split and evaluated on the same data.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_service.model.card import CARD_NAME, ONNX_NAME, ModelCard, file_sha256
from stream_service.model.session import InspectionModel
from stream_service.quality.crops import crop_origins, make_crop_manifest
from stream_service.quality.evaluation import evaluate
from stream_service.quality.manifest import ManifestItem, load_manifest, read_gray
from stream_service.quality.metrics import near_boxes
from stream_service.training.dataset import align, split_by_group
from stream_service.training.export import check_export, export_onnx
from stream_service.training.train import TrainResult, config_dict
from stream_service.training.vit import SoartcViT, rollout
from stream_service.vision.baseline import tune_baseline
from stream_service.vision.highlight import MAGNITUDE_CHANNELS, Pieces, token_relevance
from stream_service.vision.inspection import FeatureExtractor
from stream_service.vision.soartc import to_unit
from stream_service.vision.tokens import CHANNEL_NAMES, FeatureSpec
from stream_service.vision.windows import WindowLayout

log = logging.getLogger(__name__)

LICENCE_NOTE = (
    "Trained on the DeepPCB training split (tangsanli5201/DeepPCB, MIT licence; its README says the data is "
    "for research purposes). Validate on your own parts before production use."
)


# The figures of an evaluation that a card records (validation, and the folds' out-of-board reports).
FIGURE_KEYS = (
    "crop_auroc",
    "crop_miss_rate",
    "crop_false_alarm_rate",
    "full_highlight_precision",
    "full_box_recall",
    "pass_crop_false_highlight_rate",
    "n_crops_fail",
    "n_crops_pass",
    "n_full",
)


def _card(
    result: TrainResult,
    name: str,
    version: str,
    sha: str,
    threshold: float,
    threshold_note: str,
    highlight_params: dict[str, float],
    highlight_note: str,
    training: dict[str, Any],
    validation: dict[str, Any],
    experiments: list[dict[str, Any]],
    stride: int,
) -> ModelCard:
    spec = result.spec
    return ModelCard.model_validate(
        {
            "name": name,
            "version": version,
            "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "onnx": ONNX_NAME,
            "sha256": sha,
            "inputs": {"windows": "(N, grid, grid, channels) float32 token features"},
            "outputs": {
                "logits": "(N, 2) float32 [pass, fail]",
                "attention": "(N, grid, grid) float32 class-token attention, last layer, mean over heads",
            },
            "features": {
                "block": spec.block,
                "variant": spec.variant,
                "polarity": "dark-object",
                "channels": list(CHANNEL_NAMES),
                "calibration": asdict(spec.calibration),
                "sub_calibration": asdict(spec.sub_calibration),
                "diff_threshold": spec.diff_threshold,
                "open_px": spec.open_px,
                "open_large_px": spec.open_large_px,
                "registration": spec.registration,
                "valid_region": spec.valid_region,
                "tolerance_px": spec.tolerance_px,
                "highlight_tolerance_px": spec.highlight_tolerance_px,
                "local_px": spec.local_px,
            },
            "window": {"grid": result.config.grid, "stride": stride, "pixels": result.config.grid * spec.block},
            "threshold": {"value": threshold, "chosen_by": threshold_note},
            "highlight": {
                **highlight_params,
                "source": result.model.cfg.attention,
                "chosen_by": highlight_note,
            },
            "architecture": result.model.cfg.as_dict(),
            "training": training,
            "validation": validation,
            "experiments": experiments,
        }
    )


def _write_card(card: ModelCard, out_dir: Path) -> None:
    (out_dir / CARD_NAME).write_text(card.model_dump_json(indent=1) + "\n")


def _training_crops(
    items: list[ManifestItem], seed: int, spec: FeatureSpec | None = None
) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for item in items:
        ref_u8, frame_u8 = read_gray(item.reference), read_gray(item.frame)
        for x0, y0, label in crop_origins(item.boxes, ref_u8, 256, 1, 1, rng):
            ref = to_unit(ref_u8[y0 : y0 + 256, x0 : x0 + 256], True)
            frame = to_unit(frame_u8[y0 : y0 + 256, x0 : x0 + 256], True)
            pairs.append((ref, align(ref, frame, spec), label == "fail"))
    return pairs


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
    value: float
    miss_rate: float
    false_alarm_rate: float
    margin_se: float  # the smaller of the two margins to the targets, in binomial standard errors


def choose_threshold(
    scores: np.ndarray, labels: np.ndarray, max_miss: float = 0.01, max_false_alarm: float = 0.02
) -> ThresholdChoice:
    """The verdict threshold that leaves both validation rates furthest inside their targets.

    Each candidate (midway between neighbouring distinct scores) is judged by its smaller margin,
    (target - rate) / sqrt(target (1 - target) / n), for the crop miss rate against ``max_miss`` over the
    fail crops and the false-alarm rate against ``max_false_alarm`` over the pass crops: a margin counted
    in standard errors, so the rate measured on fewer crops (the noisier one) needs more room. On unseen
    boards both rates move; this is the threshold most likely to keep both. Ties go to the lower
    threshold (a defect missed costs more than a part looked at twice).
    """
    fails, passes = np.sort(scores[labels]), np.sort(scores[~labels])
    if fails.size == 0 or passes.size == 0:
        raise ValueError(f"choose_threshold: expected fail and pass scores, found {fails.size} and {passes.size}")
    distinct = np.unique(scores)
    candidates = np.concatenate([[distinct[0] - 1e-6], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1] + 1e-6]])
    miss = np.searchsorted(fails, candidates, side="left") / fails.size  # fail scores below the threshold
    alarms = 1.0 - np.searchsorted(passes, candidates, side="left") / passes.size  # pass scores at or above
    se_miss = math.sqrt(max_miss * (1 - max_miss) / fails.size)
    se_alarm = math.sqrt(max_false_alarm * (1 - max_false_alarm) / passes.size)
    margin = np.minimum((max_miss - miss) / se_miss, (max_false_alarm - alarms) / se_alarm)
    best = int(np.argmax(margin))  # the first (lowest) of equal margins
    return ThresholdChoice(float(candidates[best]), float(miss[best]), float(alarms[best]), float(margin[best]))


def _full_frame_cache(
    model: InspectionModel, items: list[ManifestItem]
) -> list[tuple[ManifestItem, Any, WindowLayout]]:
    """(item, token features, window layout) of every full frame, computed once for the highlight grids."""
    card = model.card
    spec = card.features.to_spec()
    out = []
    for item in items:
        if item.kind != "full":
            continue
        extractor = FeatureExtractor(
            read_gray(item.reference), spec, card.features.polarity == "dark-object", device="cpu"
        )
        feats = extractor.extract(read_gray(item.frame)).features
        layout = WindowLayout.cover(feats.tokens_hwc.shape[:2], card.window.grid, card.window.stride)
        out.append((item, feats, layout))
    return out


# Highlight precision rollout must gain over the last-layer map to be worth its inference time.
ROLLOUT_MARGIN = 0.01
ATTENTION_GRID = (1.0, 2.0, 3.0, 5.0, 8.0)
MAGNITUDE_GRID = (0.5, 0.75)
ELONGATION_GRID = (6.0, 8.0, 12.0, 16.0, 1e6)
MIN_AREA_GRID = (0, 10)


HighlightMaps = list[tuple[ManifestItem, Any, np.ndarray, Pieces]]


def highlight_maps(
    cache: list[tuple[ManifestItem, Any, WindowLayout]],
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    threshold: float,
) -> HighlightMaps:
    """(item, features, token relevance, pieces) of every cached full frame under one model and threshold."""
    maps = []
    for item, feats, layout in cache:
        probs, attention = run(layout.cut(feats.tokens_hwc))
        relevance = token_relevance(layout, probs, attention, threshold)
        maps.append((item, feats, relevance, Pieces.of(feats.open_diff_hw)))
    return maps


@dataclasses.dataclass(frozen=True)
class _PiecePixels:
    """A defective full frame reduced to the pixels of its difference pieces, for the highlight grid."""

    piece: np.ndarray  # (n,) piece label of each pixel
    token: np.ndarray  # (n,) flat token index of each pixel, -1 past the last whole token
    near: np.ndarray  # (n,) bool: within MARGIN_PX of a box
    in_box: list[np.ndarray]  # per box: indices of the pixels inside it
    relevance: np.ndarray  # (h * w,) token relevance
    magnitude: np.ndarray  # (h * w,) token magnitude
    pieces: Pieces

    @classmethod
    def of(cls, item: ManifestItem, feats: Any, relevance: np.ndarray, pieces: Pieces, block: int) -> _PiecePixels:
        ys, xs = np.nonzero(pieces.labels_hw)
        h, w = relevance.shape
        inside = (ys < h * block) & (xs < w * block)
        token = np.where(inside, (ys // block) * w + xs // block, -1)
        near = near_boxes(pieces.labels_hw.shape, item.boxes)[ys, xs]
        in_box = [
            np.flatnonzero((xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)) for x1, y1, x2, y2, *_ in item.boxes
        ]
        magnitude = feats.tokens_hwc[..., MAGNITUDE_CHANNELS].max(axis=2)
        return cls(pieces.labels_hw[ys, xs], token, near, in_box, relevance.ravel(), magnitude.ravel(), pieces)


def grid_highlight(maps: HighlightMaps, block: int, target_recall: float) -> tuple[dict[str, float], dict[str, float]]:
    """(parameters, figures): the best full-frame highlight precision at box recall >= target over the grid
    (attention x magnitude x elongation x minimum area), on frames that may come from several models.

    The same figures as ``highlight_mask`` then ``Scoreboard`` per combination (precision over highlighted
    pixels of the defective full frames, box recall), computed on the pieces' pixels only.
    """
    frames = [_PiecePixels.of(i, f, r, p, block) for i, f, r, p in maps if i.kind == "full" and i.label == "fail"]
    boxes_total = sum(len(f.in_box) for f in frames)
    keeps = {
        (att, mag): [((f.relevance >= att) & (f.magnitude >= mag) & (f.relevance > 0)) for f in frames]
        for att, mag in itertools.product(ATTENTION_GRID, MAGNITUDE_GRID)
    }
    shapes = {
        (elong, area): [f.pieces.defect_like(elong, area)[f.piece] for f in frames]
        for elong, area in itertools.product(ELONGATION_GRID, MIN_AREA_GRID)
    }
    best: tuple[float, dict[str, float], dict[str, float]] | None = None
    for att, mag, elong, area in itertools.product(ATTENTION_GRID, MAGNITUDE_GRID, ELONGATION_GRID, MIN_AREA_GRID):
        lit = near = hits = 0
        for f, keep, shape in zip(frames, keeps[att, mag], shapes[elong, area], strict=True):
            mask = shape & (f.token >= 0)
            mask[mask] = keep[f.token[mask]]
            lit += int(mask.sum())
            near += int((mask & f.near).sum())
            hits += sum(bool(mask[idx].any()) for idx in f.in_box)
        precision = near / lit if lit else 0.0
        recall = hits / boxes_total if boxes_total else 0.0
        key = precision if recall >= target_recall else recall - 1.0
        if best is None or key > best[0]:
            params = {"attention": att, "magnitude": mag, "max_elongation": elong, "min_area": area}
            best = (key, params, {"precision": precision, "box_recall": recall, **params})
    assert best is not None
    return best[1], best[2]


def tune_highlight(
    model: InspectionModel,
    cache: list[tuple[ManifestItem, Any, WindowLayout]],
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    threshold: float,
    target_recall: float,
) -> tuple[dict[str, float], dict[str, float]]:
    """(highlight parameters, figures): the best full-frame highlight precision at box recall >= target.

    ``run`` maps windows to (fail probabilities, attention maps): the ONNX model's last-layer map, or a
    torch rollout, so that both are measured on the same frames and the same grid (attention x
    magnitude x elongation x minimum area).
    """
    return grid_highlight(highlight_maps(cache, run, threshold), model.card.features.block, target_recall)


def _better(a: dict[str, float], b: dict[str, float], target_recall: float) -> bool:
    """Whether highlight figures ``a`` beat ``b``: precision once both reach the box-recall target."""
    a_ok, b_ok = a["box_recall"] >= target_recall, b["box_recall"] >= target_recall
    if a_ok != b_ok:
        return a_ok
    return a["precision"] > b["precision"] if a_ok else a["box_recall"] > b["box_recall"]


def _with_attention(net: SoartcViT, attention: str) -> SoartcViT:
    """The same weights with another exported attention map."""
    other = SoartcViT(dataclasses.replace(net.cfg, attention=attention))
    other.load_state_dict(net.state_dict())
    return other.eval()


def _torch_rollout(net: SoartcViT) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    def run(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        net.eval()
        with torch.no_grad():
            x, layers = net.encode(torch.from_numpy(windows))
            probs = torch.softmax(net.head(x[:, 0]), 1)[:, 1]
            return probs.numpy(), rollout(layers, net.cfg.grid).numpy()

    return run


def ship(
    result: TrainResult,
    manifest: Path,
    out_dir: Path,
    name: str,
    version: str = "1",
    stride: int = 12,
    max_miss: float = 0.01,
    max_false_alarm: float = 0.02,
    target_recall: float = 0.98,
    experiments: list[dict[str, Any]] | None = None,
) -> ModelCard:
    """Export, choose thresholds on validation, evaluate model and baseline, write card.json + model.onnx."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = result.config
    items = load_manifest(manifest)
    train_items, val_items = split_by_group(items, cfg.val_groups)
    onnx_path = out_dir / ONNX_NAME
    export_onnx(result.model, onnx_path)
    rng = np.random.default_rng(cfg.seed)
    probe = rng.random((4, cfg.grid, cfg.grid, cfg.vit.channels)).astype(np.float32)
    export_check = check_export(result.model, onnx_path, probe)
    log.info("export matches torch: %s", export_check)
    params = tune_baseline(_training_crops(train_items, cfg.seed, result.spec))
    log.info("baseline tuned on training crops: %s", params)
    training = {
        "data": "DeepPCB training split (1,000 aligned template/tested pairs, 640x640, binarised)",
        "licence": LICENCE_NOTE,
        "split": {
            "validation_groups": list(cfg.val_groups),
            "train_pairs": result.train_items,
            "validation_pairs": result.val_items,
        },
        "config": config_dict(cfg),
        "seconds": round(result.seconds, 1),
        "history": result.history,
        "baseline": asdict(params),
        "export_check": export_check,
    }
    with tempfile.TemporaryDirectory(prefix="stream-service-val-") as tmp:
        val_manifest = make_crop_manifest(val_items, Path(tmp) / "data", n_fail=2, n_pass=2, seed=cfg.seed + 7)
        provisional = _card(
            result,
            name,
            version,
            file_sha256(onnx_path),
            0.5,
            "provisional",
            {"attention": 1.0, "magnitude": 0.0, "max_elongation": 1e6, "min_area": 0},
            "provisional",
            training,
            {},
            [],
            stride,
        )
        _write_card(provisional, out_dir)
        model = InspectionModel.load(out_dir, device="cpu")
        first = evaluate(val_manifest, Path(tmp) / "first", model)
        preds = [json.loads(line) for line in (Path(tmp) / "first" / "predictions.jsonl").read_text().splitlines()]
        val_rows = {r.id: r for r in load_manifest(val_manifest)}
        crops = [(p["score"], val_rows[p["id"]].label == "fail") for p in preds if val_rows[p["id"]].kind == "crop"]
        scores, labels = np.array([c[0] for c in crops]), np.array([c[1] for c in crops])
        choice = choose_threshold(scores, labels, max_miss, max_false_alarm)
        threshold = choice.value
        threshold_note = (
            f"the threshold that keeps the crop miss rate (target <= {max_miss}) and the false-alarm rate "
            f"(target <= {max_false_alarm}) furthest inside their targets, the smaller margin counted in binomial "
            f"standard errors: miss {choice.miss_rate:.4f}, false alarms {choice.false_alarm_rate:.4f}, margin "
            f"{choice.margin_se:.2f} SE, on {labels.sum()} fail and {(~labels).sum()} pass validation crops "
            f"(boards {', '.join(cfg.val_groups)})"
        )
        cache = _full_frame_cache(model, list(val_rows.values()))
        hl_params, hl = tune_highlight(model, cache, model.run, threshold, target_recall)
        r_params, hl_rollout = tune_highlight(model, cache, _torch_rollout(result.model), threshold, target_recall)
        source = "last-layer"
        # Rollout costs about twice the model's time on the CPU (per-layer maps): ship it only when it
        # filters clearly better than the last layer.
        if _better(hl_rollout, hl, target_recall) and hl_rollout["precision"] > hl["precision"] + ROLLOUT_MARGIN:
            # Rollout filters better: the ONNX file's second output becomes the rollout map.
            result.model = _with_attention(result.model, "rollout")
            export_onnx(result.model, onnx_path)
            training["export_check"] = check_export(result.model, onnx_path, probe)
            hl_params, source = r_params, "rollout"
        experiments = [
            *(experiments or []),
            {"what": "highlight filter: last-layer class-token attention", "validation": hl},
            {"what": "highlight filter: attention rollout (Abnar & Zuidema 2020)", "validation": hl_rollout},
        ]
        highlight_note = (
            f"best full-frame highlight precision with box recall >= {target_recall} on the validation boards "
            "(grid over attention x magnitude x elongation x minimum area): "
            f"precision {hl['precision']:.3f}, box recall {hl['box_recall']:.3f}; "
            f"rollout on the same grid gave precision {hl_rollout['precision']:.3f}, box recall "
            f"{hl_rollout['box_recall']:.3f}; shipped: {source}"
        )
        log.info("threshold %.4f (%s); highlight %s", threshold, first.get("crop_auroc"), highlight_note)

        def final_card(validation: dict[str, Any]) -> ModelCard:
            sha = file_sha256(onnx_path)
            return _card(
                result, name, version, sha, threshold, threshold_note, hl_params, highlight_note, training,
                validation, experiments, stride,
            )  # fmt: skip

        _write_card(final_card({}), out_dir)
        model = InspectionModel.load(out_dir, device="cpu")
        vit = evaluate(val_manifest, Path(tmp) / "vit", model)
        base = evaluate(val_manifest, Path(tmp) / "baseline", model, method="baseline")
    keys = (*FIGURE_KEYS, "median_ms_per_pair")
    validation = {
        "data": (
            f"validation boards {', '.join(cfg.val_groups)}: 256x256 crops (2 fail + 2 pass per image, "
            "DeepPCB README rule) and full frames"
        ),
        "vit": {k: vit.get(k) for k in keys},
        "baseline": {k: base.get(k) for k in keys},
        "window": result.validation,
    }
    card = final_card(validation)
    _write_card(card, out_dir)
    return card
