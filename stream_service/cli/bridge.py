"""``stream-service bridge mqtt|opcua``: the pipeline's verdicts on plant protocols, each a process of its own."""

from __future__ import annotations

import typer

from stream_service.cli.app import ConfigOption, ExitWithParentOption, StatsOption, app
from stream_service.cli.pipeline import _serve

bridge_app = typer.Typer(
    help="Plant-protocol bridges: verdicts where PLCs, SCADA and MES listen.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(bridge_app, name="bridge")


@bridge_app.command("mqtt")
def mqtt_command(
    config: ConfigOption = None,
    stats: StatsOption = None,
    exit_with_parent: ExitWithParentOption = False,
) -> None:
    """Publish verdicts (QoS 1), camera status (retained, last will offline) and highlights to the MQTT broker
    of bridges.mqtt; after an outage, what the broker never acknowledged is replayed from the journal."""
    try:
        from stream_service.bridges.mqtt import serve_mqtt_bridge
    except ImportError as exc:
        typer.echo(f"error: the MQTT bridge needs paho-mqtt: pip install 'stream-service[mqtt]' ({exc})", err=True)
        raise typer.Exit(1) from exc
    _serve("bridge", config, stats, exit_with_parent, serve_mqtt_bridge)


@bridge_app.command("opcua")
def opcua_command(
    config: ConfigOption = None,
    stats: StatsOption = None,
    exit_with_parent: ExitWithParentOption = False,
) -> None:
    """Serve an OPC UA server of bridges.opcua: one object per camera (last verdict, score, threshold, regions,
    time, id, pass and fail counts, online state), for PLCs and SCADA to read or subscribe to."""
    try:
        from stream_service.bridges.opcua import serve_opcua_bridge
    except ImportError as exc:
        typer.echo(f"error: the OPC UA bridge needs asyncua: pip install 'stream-service[opcua]' ({exc})", err=True)
        raise typer.Exit(1) from exc

    _serve("bridge", config, stats, exit_with_parent, serve_opcua_bridge)
