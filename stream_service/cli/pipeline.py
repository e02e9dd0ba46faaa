"""``stream-service run|capture|soartc|infer|dashboard|subscribe``: the pipeline and its subscribers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from stream_service.cli.app import ConfigOption, ExitWithParentOption, StatsOption, _fail, _load, app

if TYPE_CHECKING:
    from stream_service.runtime.service import Heartbeat, StageKind
    from stream_service.settings import Settings


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
    import sys
    import tempfile
    import time

    from stream_service.errors import ConfigError, MessageError, StreamServiceError
    from stream_service.model.card import load_card, resolve_model_dir
    from stream_service.runtime.service import connectable, install_stop_signals
    from stream_service.runtime.summary import PipelineSummary, format_status
    from stream_service.runtime.supervisor import Supervisor, plan
    from stream_service.stages.features import camera_reference
    from stream_service.web.dashboard import Dashboard, take
    from stream_service.wire.transport import FrameReceiver, terminate_context

    settings = _load(config)
    try:
        specs = plan(settings, config)
        # Fail now, not after max_restarts restarts of the stages that need them: the model and references.
        load_card(resolve_model_dir(settings.inference.model))
        for camera in settings.cameras:
            camera_reference(camera)
        endpoint = connectable(settings.transport.verdicts_pub)
        topics = ["verdicts.", "highlights."] if settings.dashboard.enabled else ["verdicts."]
        subscriber = FrameReceiver(endpoint, kind="sub", topics=topics, hwm=settings.transport.publish_hwm, linger_ms=0)
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    dashboard: Dashboard | None = None
    if settings.dashboard.enabled:
        try:
            dashboard = Dashboard(settings.dashboard.host, settings.dashboard.port)
        except ConfigError as exc:  # the pipeline matters more than its dashboard: run on without it
            typer.echo(f"error: {exc}; running without the dashboard", err=True)
    folder = run_dir if run_dir is not None else Path(tempfile.mkdtemp(prefix="stream-service-run-"))
    stop = threading.Event()
    install_stop_signals(stop)
    supervisor = Supervisor(specs, settings.supervisor, folder)
    summary = PipelineSummary()
    tty = sys.stdout.isatty()
    typer.echo(
        f"stream-service run: {len(specs)} processes ({', '.join(s.name for s in specs)}); verdicts on {endpoint}; "
        f"logs and heartbeats in {folder}" + (f"; dashboard on {dashboard.url}" if dashboard else ""),
        err=True,
    )
    started = time.monotonic()
    every = summary_every if summary_every is not None else (1.0 if tty else 60.0)
    next_report, next_summary, shown, code = started + 1.0, started + every, 0, 0
    try:
        supervisor.start()
        while not stop.is_set():
            supervisor.poll()
            if supervisor.failure is not None:
                typer.echo(f"error: {supervisor.failure}", err=True)
                code = 1
                break
            timeout = 0.1
            while True:
                try:
                    message = subscriber.receive(timeout)
                except MessageError:
                    continue  # counted and logged by the receiver
                if message is None:
                    break
                take(message, summary, dashboard, time.monotonic_ns())
                timeout = 0.0
            now = time.monotonic()
            status = None  # this tick's snapshot, computed once for the dashboard and the terminal
            if now >= next_report:
                next_report += 1.0
                if dashboard is not None:
                    status = summary.snapshot(supervisor.stages, time.monotonic_ns(), now - started)
                    dashboard.publish(status)
            if now >= next_summary:
                next_summary += every
                if tty:
                    status = status or summary.snapshot(supervisor.stages, time.monotonic_ns(), now - started)
                    block = format_status(status)
                    sys.stdout.write((f"\x1b[{shown}F\x1b[J" if shown else "") + block + "\n")
                    sys.stdout.flush()
                    shown = block.count("\n") + 1
                else:
                    typer.echo(f"[{now - started:5.0f} s] {summary.line(time.monotonic_ns())}")
            if duration is not None and now - started >= duration:
                break
    finally:
        supervisor.stop()
        subscriber.close()
        if dashboard is not None:
            dashboard.close()
        terminate_context()
    final = summary.render(supervisor.stages, time.monotonic_ns(), time.monotonic() - started)
    typer.echo((f"\x1b[{shown}F\x1b[J" if tty and shown else "") + final)
    raise typer.Exit(code)


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
) -> None:
    """Print verdicts as they arrive: a readable line each, or with --json the verdict JSON itself."""
    import time

    from stream_service.errors import MessageError, StreamServiceError
    from stream_service.runtime.service import connectable
    from stream_service.runtime.summary import PipelineSummary, verdict_line
    from stream_service.web.archive import HighlightArchive
    from stream_service.wire.messages import Highlight, Verdict
    from stream_service.wire.transport import FrameReceiver, terminate_context

    hwm = 1000
    if endpoint is None:
        settings = _load(config)
        endpoint, hwm = connectable(settings.transport.verdicts_pub), settings.transport.publish_hwm
    topics = [f"verdicts.{camera}"] if camera else ["verdicts."]
    if save_highlights is not None:
        topics.append(f"highlights.{camera}" if camera else "highlights.")
    try:
        archive = HighlightArchive(save_highlights, fails_only) if save_highlights is not None else None
        receiver = FrameReceiver(endpoint, kind="sub", topics=topics, hwm=hwm, linger_ms=0)
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    summary = PipelineSummary()
    last = time.monotonic()
    code = 0
    finishing: float | None = None  # after the last verdict: a moment for the highlights on their way
    try:
        while True:
            if count is not None and summary.total >= count:
                finishing = finishing or time.monotonic() + 2.0
                if archive is None or not archive.pending or time.monotonic() > finishing:
                    break
            try:
                message = receiver.receive(0.2)
            except MessageError:
                continue  # counted and logged by the receiver
            now = time.monotonic()
            if message is None:
                if now - last > timeout:
                    got = f"after {summary.total} verdict(s)" if summary.total else "nothing arrived"
                    typer.echo(
                        f"error: no verdict on {endpoint} for {timeout:g} s ({got}); is `stream-service run` running "
                        "and is the endpoint right?",
                        err=True,
                    )
                    code = 1
                    break
                continue
            verdict = message.header
            if isinstance(verdict, Highlight) and archive is not None:
                archive.highlight(message)
                continue
            if not isinstance(verdict, Verdict) or (camera is not None and verdict.camera_id != camera):
                continue
            if finishing is not None:
                continue  # past --count: only highlights now
            last = now
            summary.add(verdict, time.monotonic_ns())
            if archive is not None:
                archive.verdict(verdict)
            typer.echo(verdict.model_dump_json() if as_json else verdict_line(verdict))
    except KeyboardInterrupt:
        pass
    finally:
        receiver.close()
        terminate_context()
    if archive is not None:
        typer.echo(f"saved {archive.saved} highlight(s) under {archive.directory}", err=True)
    missed = sum(t.missed for t in summary.cameras.values())
    if missed:
        typer.echo(
            f"note: this subscriber missed {missed} verdict(s) (sequence gaps not reported as dropped)", err=True
        )
    raise typer.Exit(code)


@app.command("dashboard")
def dashboard_command(
    config: ConfigOption = None,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="Verdict PUB endpoint (default: transport.verdicts_pub).")
    ] = None,
) -> None:
    """Serve the live dashboard for a pipeline started stage by stage or on other hosts, until Ctrl-C."""
    import time

    from stream_service.errors import MessageError, StreamServiceError
    from stream_service.runtime.service import connectable, install_stop_signals
    from stream_service.runtime.summary import PipelineSummary
    from stream_service.web.dashboard import Dashboard, take
    from stream_service.wire.transport import FrameReceiver, terminate_context

    settings = _load(config)
    endpoint = endpoint or connectable(settings.transport.verdicts_pub)
    try:
        dashboard = Dashboard(settings.dashboard.host, settings.dashboard.port)
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    try:
        receiver = FrameReceiver(
            endpoint, kind="sub", topics=["verdicts.", "highlights."], hwm=settings.transport.publish_hwm, linger_ms=0
        )
    except StreamServiceError as exc:
        dashboard.close()
        raise _fail(exc) from exc
    stop = threading.Event()
    install_stop_signals(stop)
    typer.echo(f"stream-service dashboard: verdicts from {endpoint}; dashboard on {dashboard.url}", err=True)
    summary = PipelineSummary()
    started = time.monotonic()
    next_report = started
    try:
        while not stop.is_set():
            try:
                message = receiver.receive(0.2)
            except MessageError:
                message = None  # counted and logged by the receiver
            if message is not None:
                take(message, summary, dashboard, time.monotonic_ns())
            if (now := time.monotonic()) >= next_report:
                next_report = now + 1.0
                dashboard.publish(summary.snapshot([], time.monotonic_ns(), now - started))
    finally:
        receiver.close()
        dashboard.close()
        terminate_context()


def _serve(
    kind: StageKind,
    config: Path | None,
    stats: Path | None,
    exit_with_parent: bool,
    body: Callable[[Settings, threading.Event, Heartbeat], None],
) -> None:
    """Run one stage process until SIGTERM/SIGINT; exit 1 with the error when it cannot start."""
    from stream_service.errors import StreamServiceError
    from stream_service.runtime.service import Heartbeat, install_stop_signals

    settings = _load(config)
    stop = threading.Event()
    install_stop_signals(stop)
    name = stats.stem if stats is not None else kind
    heartbeat = Heartbeat(stats, name, kind, settings.supervisor.heartbeat_s, stop, exit_with_parent)
    try:
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
