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


def main() -> None:
    """Console-script entry point."""
    app()
