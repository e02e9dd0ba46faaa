"""The ``stream-service`` Typer application and what its commands share: options, settings, errors.

Only the ``stream_service.cli`` package prints and chooses exit codes. Every command imports what it needs
inside its body, so ``stream-service --help`` starts instantly and never touches CUDA, ONNX Runtime or torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from stream_service.settings import Settings

app = typer.Typer(
    name="stream-service",
    help="Real-time visual inspection: cameras -> SOARTC -> ONNX ViT -> verdicts over ZeroMQ.",
    no_args_is_help=True,
    add_completion=False,
    # Plain help: Typer's rich panels print a "<bool>" metavar after every flag with the Click of today.
    rich_markup_mode=None,
)
reference_app = typer.Typer(
    help="Golden references: build, grab from a camera, inspect.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(reference_app, name="reference")


def _version(shown: bool) -> None:
    if shown:
        from stream_service import __version__

        typer.echo(f"stream-service {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


DEFAULT_MODEL = Path("models/soartc-vit")


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


# -- the pipeline: stages, supervisor, subscribers ---------------------------------------------------------
ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Settings YAML (default: the embedded configs/default.yaml).")
]
StatsOption = Annotated[
    Path | None,
    typer.Option("--stats", hidden=True, help="Write a JSON heartbeat with the counters here every heartbeat_s."),
]
ExitWithParentOption = Annotated[
    bool, typer.Option("--exit-with-parent", hidden=True, help="Stop when the parent process (supervisor) is gone.")
]


def _load(config: Path | None) -> Settings:
    from stream_service.errors import StreamServiceError
    from stream_service.settings import load_settings

    try:
        settings = load_settings(config)
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    root = logging.getLogger()
    if root.level != logging.DEBUG:  # --verbose wins over the settings' level
        root.setLevel(settings.logging.level)
    return settings
