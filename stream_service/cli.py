"""The ``stream-service`` command line. Only this module prints and chooses exit codes.

Every command imports what it needs inside its body, so ``stream-service --help`` starts instantly and
never touches CUDA, ONNX Runtime or torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

import typer

app = typer.Typer(
    name="stream-service",
    help="Real-time visual inspection: cameras -> SOARTC -> ONNX ViT -> verdicts over ZeroMQ.",
    no_args_is_help=True,
    add_completion=False,
)
reference_app = typer.Typer(help="Golden references: build, inspect.", no_args_is_help=True)
app.add_typer(reference_app, name="reference")


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@reference_app.command("build")
def reference_build(
    frames: Annotated[list[Path], typer.Argument(help="Good frames: image files, or folders of them.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write reference.png and reference.json into.")],
    reference_id: Annotated[
        str | None, typer.Option("--id", help="Reference id (default: the --out folder's name).")
    ] = None,
    version: Annotated[int, typer.Option("--version", min=1, help="Reference version.")] = 1,
    polarity: Annotated[
        Literal["bright-object", "dark-object"],
        typer.Option("--polarity", help="Whether the object is brighter or darker than its background."),
    ] = "bright-object",
    registration: Annotated[
        Literal["translation", "affine", "none"],
        typer.Option("--registration", help="How frames 2..N are aligned to the first."),
    ] = "translation",
) -> None:
    """Build a golden reference: register good frames to the first one and average them."""
    from stream_service.errors import StreamServiceError
    from stream_service.references import build_reference_from_files, frame_paths

    try:
        ref = build_reference_from_files(
            frame_paths(frames),
            out,
            polarity=polarity,
            reference_id=reference_id,
            version=version,
            registration=registration,
        )
    except StreamServiceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    meta = ref.meta
    typer.echo(
        f"reference {meta.id} v{meta.version}: {meta.frame_count} frames, shape {meta.shape[0]}x{meta.shape[1]} "
        f"(H x W), {meta.registration} registration, max shift applied {meta.max_shift_px:.2f} px -> {out}"
    )


@reference_app.command("show")
def reference_show(directory: Annotated[Path, typer.Argument(help="A reference directory.")]) -> None:
    """Validate a golden reference and print its metadata as JSON."""
    from stream_service.errors import StreamServiceError
    from stream_service.references import load_reference

    try:
        ref = load_reference(directory)
    except StreamServiceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(ref.meta.model_dump_json(indent=2))


DEFAULT_MODEL = Path("models/soartc-vit")


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@app.command("train")
def train_command(
    manifest: Annotated[Path, typer.Argument(help="Inspection manifest (JSON Lines) with groups for the split.")],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write (model.onnx + card.json).")],
    minutes: Annotated[
        float, typer.Option(help="Training time budget in minutes (data preparation not counted).")
    ] = 30.0,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    val_groups: Annotated[str, typer.Option(help="Comma-separated validation board groups.")] = "group13000,group50600",
    windows_per_image: Annotated[int, typer.Option(help="Training windows sampled per image per round.")] = 12,
    rounds: Annotated[int, typer.Option(help="Rounds of freshly augmented windows.")] = 2,
    threads: Annotated[int, typer.Option(help="torch threads (0 = all cores).")] = 0,
    version: Annotated[str, typer.Option(help="Model version written to the card.")] = "1",
) -> None:
    """Train the SOARTC ViT on CPU, export it to ONNX, choose its thresholds on validation, write its card."""
    try:
        from stream_service.training.ship import ship
        from stream_service.training.train import TrainConfig, set_threads, train
    except ImportError as exc:
        typer.echo(f"error: training needs torch and onnx: pip install 'stream-service[train]' ({exc})", err=True)
        raise typer.Exit(1) from exc
    from stream_service.errors import StreamServiceError

    set_threads(threads)
    cfg = TrainConfig(
        seed=seed,
        val_groups=tuple(g.strip() for g in val_groups.split(",") if g.strip()),
        minutes=minutes,
        train_windows_per_image=windows_per_image,
        rounds=rounds,
    )
    try:
        result = train(manifest, cfg)
        card = ship(result, manifest, out, name=out.name, version=version)
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    vit = card.validation["vit"]
    typer.echo(
        f"model {card.name} {card.version} -> {out}: threshold {card.threshold.value:.4f}, validation crop AUROC "
        f"{vit['crop_auroc']:.4f}, miss {vit['crop_miss_rate']:.4f}, false alarms {vit['crop_false_alarm_rate']:.4f}, "
        f"highlight precision {vit['full_highlight_precision']:.3f}, box recall {vit['full_box_recall']:.3f}"
    )


@app.command("evaluate")
def evaluate_command(
    manifest: Annotated[Path, typer.Argument(help="Inspection manifest (JSON Lines).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for predictions.jsonl, masks/ and metrics.json.")],
    method: Annotated[Literal["vit", "baseline"], typer.Option(help="The ViT, or the classical baseline.")] = "vit",
    model: Annotated[Path, typer.Option(help="Model folder (card.json + model.onnx).")] = DEFAULT_MODEL,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option(help="Compute device.")] = "cpu",
) -> None:
    """Run every pair of a manifest through the live pipeline's code path and write predictions and metrics."""
    import json

    from stream_service.errors import StreamServiceError
    from stream_service.evaluation import evaluate
    from stream_service.model import InspectionModel
    from stream_service.model_card import resolve_model_dir

    try:
        loaded = InspectionModel.load(resolve_model_dir(model), device=device)
        figures = evaluate(manifest, out, loaded, method=method, device=device)
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    typer.echo(json.dumps(figures, indent=1))


def main() -> None:
    """Console-script entry point."""
    app()
