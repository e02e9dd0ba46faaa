"""The ``stream-service`` command line, one module per group of commands:

- ``app``: the Typer application, the options and helpers the commands share;
- ``reference``: golden references (build from files, grab from a camera, show);
- ``model``: train and evaluate the inspection model;
- ``pipeline``: run the pipeline, its stages one by one, the dashboard, subscribe to verdicts;
- ``bridge``: the plant-protocol bridges (MQTT).

Only this package prints and chooses exit codes.
"""

from __future__ import annotations

# Importing a module registers its commands, in this order in --help: the pipeline first.
# isort: off
from stream_service.cli import pipeline  # noqa: F401
from stream_service.cli import reference  # noqa: F401
from stream_service.cli import model  # noqa: F401
from stream_service.cli import keys  # noqa: F401
from stream_service.cli import bridge  # noqa: F401

# isort: on
from stream_service.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
