"""``stream-service train|evaluate``: the inspection model, trained and measured."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from stream_service.cli.app import DEFAULT_MODEL, _fail, app

Registration = Literal["translation", "affine", "none"]
CleanPass = Annotated[
    float, typer.Option(help="Fraction of training windows made defect-free (boxes filled from the reference).")
]
HardNegatives = Annotated[
    float, typer.Option(help="From round 2 on, extra pass windows per epoch (share) drawn by the model's score.")
]
Tolerance = Annotated[
    int, typer.Option(help="Features forgive copper edges moved by up to N px (0-2; 0: pixel to pixel).")
]
RegionalEtch = Annotated[
    float, typer.Option(help="Augmentation: copper grown or etched by region by <= N px, on half the windows.")
]
SyntheticBoards = Annotated[
    int, typer.Option(help="New synthetic board designs added to every model's training pairs (0: none).")
]
SyntheticFrames = Annotated[int, typer.Option(help="Frames (pairs) per synthetic board, half with defects.")]
SyntheticEtch = Annotated[float, typer.Option(help="Synthetic frames' copper grown or etched by region, <= N px.")]
SoupEtch = Annotated[
    float, typer.Option(help="With --folds: models averaged with the recipe + --regional-etch-px N (a soup).")
]
FromCheckpoint = Annotated[
    Path | None, typer.Option(help="Skip training: export and validate a checkpoint saved by an earlier run.")
]
EvalTolerance = Annotated[int | None, typer.Option(help="With --folds: evaluate and ship with this tolerance.")]
EvalHighlightTolerance = Annotated[
    int | None, typer.Option(help="With --folds: the highlight's pixel masks with this tolerance (not a model input).")
]
Local = Annotated[int, typer.Option(help="Registration refined by tile: shifts of <= N px (0-3; 0: one warp).")]
EvalLocal = Annotated[
    int | None, typer.Option(help="With --folds: evaluate and ship with the registration refined by tile, <= N px.")
]
EvalValidRegion = Annotated[
    bool | None, typer.Option(help="With --folds: evaluate and ship with/without the valid-region mask.")
]
Minutes = Annotated[float, typer.Option(help="Training time budget in minutes (data preparation not counted).")]
Notes = Annotated[Path | None, typer.Option(help="JSON list of earlier experiments to record in the model card.")]
EvalRegistration = Annotated[
    Registration | None, typer.Option(help="With --folds: evaluate and ship with this registration instead.")
]


@app.command("train")
def train_command(
    manifest: Annotated[Path, typer.Argument(help="Inspection manifest (JSON Lines) with groups for the split.")],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write (model.onnx + card.json).")],
    minutes: Minutes = 26.0,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    val_groups: Annotated[str, typer.Option(help="Comma-separated validation board groups.")] = "group13000,group50600",
    windows_per_image: Annotated[int, typer.Option(help="Training windows sampled per image per round.")] = 12,
    rounds: Annotated[int, typer.Option(help="Rounds of freshly augmented windows.")] = 3,
    threads: Annotated[int, typer.Option(help="torch threads (0 = all cores).")] = 0,
    version: Annotated[str, typer.Option(help="Model version written to the card.")] = "1",
    folds: Annotated[
        int, typer.Option(help="K > 1: K-fold cross-validation by board (--val-groups unused), then all boards.")
    ] = 0,
    registration: Annotated[Registration, typer.Option(help="Registration the training windows use.")] = "translation",
    valid_region: Annotated[bool, typer.Option(help="Pixels warped in from outside the frame: no evidence.")] = False,
    etch_px: Annotated[float, typer.Option(help="Augmentation: copper edges etched or grown by <= N px (0-1).")] = 0,
    clean_pass: CleanPass = 0,
    regional_etch_px: RegionalEtch = 0,
    hard_negatives: HardNegatives = 0,
    tolerance_px: Tolerance = 0,
    local_px: Local = 0,
    synthetic_boards: SyntheticBoards = 0,
    synthetic_frames: SyntheticFrames = 8,
    synthetic_etch_px: SyntheticEtch = 0,
    eval_registration: EvalRegistration = None,
    eval_valid_region: EvalValidRegion = None,
    eval_tolerance_px: EvalTolerance = None,
    eval_highlight_tolerance_px: EvalHighlightTolerance = None,
    eval_local_px: EvalLocal = None,
    soup_regional_etch_px: SoupEtch = 0,
    from_checkpoint: FromCheckpoint = None,
    notes: Notes = None,
) -> None:
    """Train the SOARTC ViT on CPU, export it to ONNX, choose its thresholds on validation, write its card.

    With --folds K the threshold and highlight are chosen on out-of-board predictions (one model per fold,
    checkpointed under --out, so a rerun trains only what is missing) and the model is trained on all boards."""
    import json

    try:
        from stream_service.training.dataset import Augment
        from stream_service.training.train import TrainConfig, set_threads
    except ImportError as exc:
        typer.echo(f"error: training needs torch and onnx: pip install 'stream-service[train]' ({exc})", err=True)
        raise typer.Exit(1) from exc
    set_threads(threads)
    cfg = TrainConfig(
        seed=seed, minutes=minutes, rounds=rounds, train_windows_per_image=windows_per_image,
        val_groups=tuple(g.strip() for g in val_groups.split(",") if g.strip()),
        registration=registration, valid_region=valid_region, hard_negatives=hard_negatives, tolerance_px=tolerance_px,
        synthetic_boards=synthetic_boards, synthetic_frames=synthetic_frames, synthetic_etch_px=synthetic_etch_px,
        soup_regional_etch_px=soup_regional_etch_px, local_px=local_px,
        augment=Augment(etch_px=etch_px, clean_pass=clean_pass, regional_etch_px=regional_etch_px),
    )  # fmt: skip
    experiments = json.loads(notes.read_text()) if notes is not None else []
    if folds:
        front = (eval_registration, eval_valid_region, eval_tolerance_px, eval_highlight_tolerance_px, eval_local_px)
        _train_folds(manifest, out, cfg, folds, version, experiments, front)
    else:
        _train_single(manifest, out, cfg, version, experiments, from_checkpoint)


def _train_single(
    manifest: Path, out: Path, cfg: Any, version: str, experiments: list[Any], from_checkpoint: Path | None
) -> None:
    from stream_service.errors import StreamServiceError
    from stream_service.training.ship import ship
    from stream_service.training.train import load_checkpoint, save_checkpoint, train

    checkpoint = Path("runs") / f"{out.name}-checkpoint.pt"
    try:
        if from_checkpoint is not None:
            result = load_checkpoint(from_checkpoint)
        else:
            result = train(manifest, cfg)
            save_checkpoint(result, checkpoint)
            typer.echo(f"trained in {result.seconds / 60:.1f} min; checkpoint {checkpoint}")
        card = ship(result, manifest, out, name=out.name, version=version, experiments=experiments)
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    vit = card.validation["vit"]
    typer.echo(
        f"model {card.name} {card.version} -> {out}: threshold {card.threshold.value:.4f}, validation crop AUROC "
        f"{vit['crop_auroc']:.4f}, miss {vit['crop_miss_rate']:.4f}, false alarms {vit['crop_false_alarm_rate']:.4f}, "
        f"highlight precision {vit['full_highlight_precision']:.3f}, box recall {vit['full_box_recall']:.3f}"
    )


def _train_folds(
    manifest: Path,
    out: Path,
    cfg: Any,
    folds: int,
    version: str,
    experiments: list[Any],
    front: tuple[str | None, bool | None, int | None, int | None, int | None],
) -> None:
    from stream_service.errors import StreamServiceError
    from stream_service.training.cv import CvOptions, Variant, cross_validate, summary_line

    opts = CvOptions(folds=folds, variant=Variant(*front))
    try:
        oof = cross_validate(manifest, out, cfg, opts, out.name, version, experiments, progress=typer.echo)
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    typer.echo(summary_line(oof, out))


@app.command("evaluate")
def evaluate_command(
    manifest: Annotated[Path, typer.Argument(help="Inspection manifest (JSON Lines).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for predictions.jsonl, masks/ and metrics.json.")],
    method: Annotated[Literal["vit", "baseline"], typer.Option(help="The ViT, or the classical baseline.")] = "vit",
    model: Annotated[Path, typer.Option(help="Model folder (card.json + model.onnx).")] = DEFAULT_MODEL,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option(help="Compute device.")] = "cpu",
    gallery: Annotated[
        Path | None,
        typer.Option(help="Folder for one PNG per worst error: reference | frame | difference | highlight."),
    ] = None,
    gallery_size: Annotated[int, typer.Option(help="How many false alarms and how many misses to draw.")] = 8,
) -> None:
    """Run every pair of a manifest through the live pipeline's code path and write predictions and metrics."""
    import json

    from stream_service.errors import StreamServiceError
    from stream_service.model.card import resolve_model_dir
    from stream_service.model.session import InspectionModel
    from stream_service.quality.evaluation import evaluate

    try:
        loaded = InspectionModel.load(resolve_model_dir(model), device=device)
        figures = evaluate(manifest, out, loaded, method=method, device=device)
        if gallery is not None:
            from stream_service.quality.gallery import write_gallery

            front = loaded.card.features
            pictures = write_gallery(
                manifest, out / "predictions.jsonl", gallery, gallery_size, front.registration or "translation",
                front.tolerance_px, front.local_px,
            )  # fmt: skip
            figures["gallery"] = [str(p) for p in pictures]
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    typer.echo(json.dumps(figures, indent=1))
