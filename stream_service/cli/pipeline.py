"""``stream-service run|capture|soartc|infer|dashboard|subscribe``: the pipeline and its subscribers."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from stream_service.cli.app import ConfigOption, ExitWithParentOption, StatsOption, _fail, _load, app

KeysOption = Annotated[
    Path | None,
    typer.Option("--keys", help="CURVE keys folder (stream-service keys generate; default: security.keys)."),
]

if TYPE_CHECKING:
    from stream_service.runtime.heartbeat import Heartbeat, StageKind
    from stream_service.runtime.pipeline import RunLoop
    from stream_service.runtime.subscriber import VerdictSubscriber
    from stream_service.settings import Settings
    from stream_service.web.dashboard import Dashboard


@app.command("run")
def run_command(
    config: ConfigOption = None,
    duration: Annotated[
        float | None,
        typer.Option("--duration", min=0.1, help="Stop after this many seconds (default: run until stopped)."),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Folder for the stages' logs and heartbeats (default: a temp dir).")
    ] = None,
    summary_every: Annotated[
        float | None,
        typer.Option(
            "--summary-every",
            min=0.1,
            help="Seconds between summaries (default: 1 on a terminal, 60 into a log such as journald's).",
        ),
    ] = None,
) -> None:
    """Run the whole pipeline under a supervisor, with a live summary; Ctrl-C or SIGTERM stops it cleanly."""
    from stream_service.errors import StreamServiceError
    from stream_service.runtime.pipeline import RunLoop, open_subscriber, prepare_run
    from stream_service.runtime.service import apply_security, install_stop_signals
    from stream_service.runtime.supervisor import Supervisor

    settings = _load(config)
    try:
        apply_security(settings)
        planned = prepare_run(settings, config, run_dir)
        subscriber = open_subscriber(settings, planned.endpoint, highlights=settings.dashboard.enabled)
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    dashboard = _dashboard_or_none(settings)
    stop = threading.Event()
    install_stop_signals(stop)
    supervisor = Supervisor(planned.specs, settings.supervisor, planned.run_dir)
    typer.echo(
        f"stream-service run: {len(planned.specs)} processes ({', '.join(s.name for s in planned.specs)}); verdicts on "
        f"{planned.endpoint}; logs and heartbeats in {planned.run_dir}"
        + (f"; dashboard on {dashboard.url}" if dashboard else ""),
        err=True,
    )
    terminal = _Terminal(sys.stdout.isatty())
    with RunLoop(subscriber, supervisor, dashboard, camera_stale_s=settings.health.camera_stale_s) as loop:
        every = summary_every if summary_every is not None else (1.0 if terminal.tty else 60.0)
        code = loop.run(stop, duration, every, lambda status, elapsed: terminal.report(loop, status, elapsed))
        for stage in loop.failed_stages():
            typer.echo(f"error: stage {stage}", err=True)
            code = 1
        for camera in loop.failed_cameras():
            typer.echo(f"error: camera {camera}", err=True)
            code = 1
    terminal.final(loop.final())
    if not planned.clean_up(succeeded=code == 0) and planned.temporary:
        typer.echo(f"logs and heartbeats kept in {planned.run_dir}", err=True)
    raise typer.Exit(code)


class _Terminal:
    """The live summary: redrawn in place on a terminal, one line per report into a log."""

    def __init__(self, tty: bool) -> None:
        self.tty, self.shown = tty, 0

    def _clear(self) -> str:
        return f"\x1b[{self.shown}F\x1b[J" if self.tty and self.shown else ""

    def report(self, loop: RunLoop, status: dict[str, Any], elapsed_s: float) -> None:
        from stream_service.runtime.summary import format_status

        if not self.tty:
            typer.echo(f"[{elapsed_s:5.0f} s] {loop.summary.line(time.monotonic_ns())}")
            return
        block = format_status(status)
        sys.stdout.write(self._clear() + block + "\n")
        sys.stdout.flush()
        self.shown = block.count("\n") + 1

    def final(self, text: str) -> None:
        typer.echo(self._clear() + text)


def _dashboard_or_none(settings: Settings) -> Dashboard | None:
    """The dashboard when enabled; a taken port is reported and the pipeline runs on without it."""
    from stream_service.errors import ConfigError
    from stream_service.runtime.replay import JournalClient
    from stream_service.web.dashboard import Dashboard

    if not settings.dashboard.enabled:
        return None
    try:
        return Dashboard.from_settings(settings, journal=JournalClient.from_settings(settings))
    except ConfigError as exc:  # the pipeline matters more than its dashboard: run on without it
        typer.echo(f"error: {exc}; running without the dashboard", err=True)
        return None


@app.command("subscribe")
def subscribe_command(
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="Verdict PUB endpoint (default: transport.verdicts_pub).")
    ] = None,
    camera: Annotated[str | None, typer.Option("--camera", help="Only this camera's verdicts.")] = None,
    count: Annotated[int | None, typer.Option("--count", min=1, help="Exit 0 after this many verdicts.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One verdict JSON object per line (schemas/verdict.v1.json).")
    ] = False,
    config: ConfigOption = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Exit 1 when no verdict arrives for this many seconds.")
    ] = 60.0,
    save_highlights: Annotated[
        Path | None,
        typer.Option("--save-highlights", help="Also save each verdict's highlight JPEG under this directory."),
    ] = None,
    fails_only: Annotated[bool, typer.Option("--fails-only", help="With --save-highlights: fails only.")] = False,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="First replay the journal after this verdict_id, or from this ISO 8601 time "
            "(2026-12-02T15:40:00Z), then go on live: no gap, no duplicate.",
        ),
    ] = None,
    journal: Annotated[
        str | None, typer.Option("--journal", help="Journal replay endpoint (default: transport.journal_rep).")
    ] = None,
    keys: KeysOption = None,
) -> None:
    """Print verdicts as they arrive: a readable line each, or with --json the verdict JSON itself."""
    from stream_service.errors import StreamServiceError
    from stream_service.runtime.service import apply_security
    from stream_service.runtime.summary import verdict_line
    from stream_service.wire.transport import terminate_context

    settings = _load(config)
    try:
        apply_security(settings, keys)
        subscriber = _subscriber(
            settings, endpoint, camera, count, timeout, save_highlights, fails_only, since, journal
        )
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    silence, failure = None, None
    try:
        silence = subscriber.run(lambda v: typer.echo(v.model_dump_json() if as_json else verdict_line(v)))
    except KeyboardInterrupt:
        pass
    except StreamServiceError as exc:
        failure = exc
    finally:
        subscriber.receiver.close()
        terminate_context()
    if failure is not None:
        raise _fail(failure)
    _subscribe_notes(subscriber, silence, timeout)
    raise typer.Exit(0 if silence is None else 1)


def _subscriber(
    settings: Settings,
    endpoint: str | None,
    camera: str | None,
    count: int | None,
    timeout: float,
    save_highlights: Path | None,
    fails_only: bool,
    since: str | None,
    journal: str | None,
) -> VerdictSubscriber:
    """The SUB socket (connected first, so that live verdicts queue during a replay) and its loop."""
    from stream_service.runtime.replay import JournalClient
    from stream_service.runtime.service import connectable
    from stream_service.runtime.subscriber import VerdictSubscriber, subscribe_topics
    from stream_service.web.archive import HighlightArchive
    from stream_service.wire.transport import FrameReceiver

    hwm = 1000 if endpoint is not None else settings.transport.publish_hwm
    endpoint = endpoint or connectable(settings.transport.verdicts_pub)
    archive = HighlightArchive(save_highlights, fails_only) if save_highlights is not None else None
    topics = subscribe_topics(camera, highlights=archive is not None)
    receiver = FrameReceiver(endpoint, kind="sub", topics=topics, hwm=hwm, linger_ms=0)
    client = JournalClient.from_settings(settings, journal) if since is not None else None
    return VerdictSubscriber(receiver, camera, count, timeout, archive, journal=client, since=since)


def _subscribe_notes(subscriber: VerdictSubscriber, silence: str | None, timeout: float) -> None:
    """What ``subscribe`` says on stderr at the end: silence, pictures saved, replayed and missed verdicts."""
    endpoint = subscriber.receiver.endpoint
    if silence is not None:
        typer.echo(
            f"error: no verdict on {endpoint} for {timeout:g} s ({silence}); is `stream-service run` running "
            "and is the endpoint right?",
            err=True,
        )
    if subscriber.archive is not None:
        typer.echo(f"saved {subscriber.archive.saved} highlight(s) under {subscriber.archive.directory}", err=True)
    if subscriber.since is not None:
        typer.echo(f"replayed {subscriber.replayed} verdict(s) from the journal", err=True)
    if subscriber.missed:
        typer.echo(
            f"note: this subscriber missed {subscriber.missed} verdict(s) (sequence gaps not reported as dropped)",
            err=True,
        )


@app.command("dashboard")
def dashboard_command(
    config: ConfigOption = None,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="Verdict PUB endpoint (default: transport.verdicts_pub).")
    ] = None,
    journal: Annotated[
        str | None,
        typer.Option("--journal", help="Journal replay endpoint for /api/verdicts (default: transport.journal_rep)."),
    ] = None,
    keys: KeysOption = None,
) -> None:
    """Serve the live dashboard for a pipeline started stage by stage or on other hosts, until Ctrl-C."""
    from stream_service.errors import StreamServiceError
    from stream_service.runtime.pipeline import RunLoop, open_subscriber
    from stream_service.runtime.replay import JournalClient
    from stream_service.runtime.service import apply_security, connectable, install_stop_signals
    from stream_service.web.dashboard import Dashboard

    settings = _load(config)
    endpoint = endpoint or connectable(settings.transport.verdicts_pub)
    try:
        dashboard = Dashboard.from_settings(settings, journal=JournalClient.from_settings(settings, journal))
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    try:
        apply_security(settings, keys)
        subscriber = open_subscriber(settings, endpoint, highlights=True)
    except StreamServiceError as exc:
        dashboard.close()
        raise _fail(exc) from exc
    stop = threading.Event()
    install_stop_signals(stop)
    typer.echo(f"stream-service dashboard: verdicts from {endpoint}; dashboard on {dashboard.url}", err=True)
    with RunLoop(subscriber, dashboard=dashboard, camera_stale_s=settings.health.camera_stale_s) as loop:
        loop.run(stop)


def _serve(
    kind: StageKind,
    config: Path | None,
    stats: Path | None,
    exit_with_parent: bool,
    body: Callable[[Settings, threading.Event, Heartbeat], None],
) -> None:
    """Run one stage process until SIGTERM/SIGINT; exit 1 with the error when it cannot start."""
    from stream_service.errors import StreamServiceError
    from stream_service.runtime.heartbeat import Heartbeat
    from stream_service.runtime.service import apply_security, install_stop_signals

    settings = _load(config)
    stop = threading.Event()
    install_stop_signals(stop)
    name = stats.stem if stats is not None else kind
    heartbeat = Heartbeat(stats, name, kind, settings.supervisor.heartbeat_s, stop, exit_with_parent)
    try:
        apply_security(settings)
        body(settings, stop, heartbeat)
    except StreamServiceError as exc:
        raise _fail(exc) from exc


@app.command("capture")
def capture_command(
    config: ConfigOption = None,
    camera: Annotated[str | None, typer.Option("--camera", help="Camera id (default: the only camera).")] = None,
    stats: StatsOption = None,
    exit_with_parent: ExitWithParentOption = False,
) -> None:
    """Capture one camera: read, stamp and push its frames (never blocks; drops are counted)."""
    from stream_service.runtime.service import serve_capture

    _serve("capture", config, stats, exit_with_parent, lambda s, stop, hb: serve_capture(s, camera, stop, hb))


@app.command("soartc")
def soartc_command(
    config: ConfigOption = None,
    camera: Annotated[
        list[str] | None, typer.Option("--camera", help="Only these cameras (repeatable; default: all).")
    ] = None,
    stats: StatsOption = None,
    exit_with_parent: ExitWithParentOption = False,
) -> None:
    """A soartc worker: registration and SOARTC features of the frames of every (or the given) camera."""
    from stream_service.runtime.service import serve_soartc

    _serve("soartc", config, stats, exit_with_parent, lambda s, stop, hb: serve_soartc(s, camera, stop, hb))


@app.command("infer")
def infer_command(
    config: ConfigOption = None,
    stats: StatsOption = None,
    exit_with_parent: ExitWithParentOption = False,
) -> None:
    """The infer stage: the ViT, verdicts and highlights, published on transport.verdicts_pub."""
    from stream_service.runtime.service import serve_infer

    _serve("infer", config, stats, exit_with_parent, serve_infer)
