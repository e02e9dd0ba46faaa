"""``stream-service keys generate DIR``: the CURVE keys of a pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stream_service.cli.app import _fail, app

keys_app = typer.Typer(help="CURVE keys for every tcp hop: generate.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def generate_command(
    directory: Annotated[Path, typer.Argument(help="New folder for the keys (created 0700).")],
) -> None:
    """Make a server and a client key pair (secret files 0600) and authorized/ with the client's public key."""
    from stream_service.errors import StreamServiceError
    from stream_service.wire.transport import generate_keys

    try:
        made = generate_keys(directory)
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    for path in made:
        typer.echo(str(path))
    typer.echo(
        f"set `security: {{keys: {directory}}}` in the config of every host (a subscriber's host needs server.key, "
        "a client key pair and its public key in authorized/ on the pipeline's hosts)",
        err=True,
    )
