"""The ``stream-service`` command line. Only this module prints and chooses exit codes.

Every command imports what it needs inside its body, so ``stream-service --help`` starts instantly and
never touches CUDA, ONNX Runtime or torch.
"""

from __future__ import annotations

import logging

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


def main() -> None:
    """Console-script entry point."""
    app()
