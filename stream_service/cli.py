"""The ``stream-service`` command line. Only this module prints and chooses exit codes.

Every command imports what it needs inside its body, so ``stream-service --help`` starts instantly and
never touches CUDA, ONNX Runtime or torch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

if TYPE_CHECKING:
    from stream_service.service import Heartbeat, StageKind
    from stream_service.settings import Settings

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


@reference_app.command("grab")
def reference_grab(
    config: ConfigOption = None,
    camera: Annotated[str | None, typer.Option("--camera", help="Camera id (default: the only one).")] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory to write the reference into (default: the camera's `reference`)."),
    ] = None,
    count: Annotated[int, typer.Option("--frames", min=1, help="Good frames to average.")] = 16,
    every: Annotated[float, typer.Option("--every", min=0.0, help="Seconds between the frames taken.")] = 0.5,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Give up after this many seconds.")] = 120.0,
    reference_id: Annotated[str | None, typer.Option("--id", help="Reference id (default: the camera id).")] = None,
    version: Annotated[int, typer.Option("--version", min=1, help="Reference version.")] = 1,
    registration: Annotated[
        Literal["translation", "affine", "none"],
        typer.Option("--registration", help="How frames 2..N are aligned to the first."),
    ] = "translation",
) -> None:
    """Build a golden reference straight from a configured camera: good parts in view, N frames averaged."""
    import hashlib

    from stream_service.errors import ConfigError, StreamServiceError
    from stream_service.references import SourceFrame, build_reference, save_reference
    from stream_service.service import camera_at
    from stream_service.stages.capture import grab

    settings = _load(config)
    try:
        index, cam = camera_at(settings, camera)
        out = out or cam.reference
        if out is None:
            raise ConfigError(f"--out: expected a directory (camera {cam.id} has no `reference` to default to)")
        typer.echo(f"camera {cam.id}: taking {count} frames, {every:g} s apart; keep good parts in view", err=True)
        frames = grab(cam, count, every, timeout)
        sources = [
            SourceFrame(path=f"camera:{cam.id}#{i}", sha256=hashlib.sha256(f.tobytes()).hexdigest())
            for i, f in enumerate(frames)
        ]
        ref = build_reference(
            frames,
            reference_id=reference_id or cam.id,
            version=version,
            polarity=cam.polarity,
            registration=registration,
            sources=sources,
        )
        save_reference(ref, out)
    except StreamServiceError as exc:
        raise _fail(exc) from exc
    meta = ref.meta
    typer.echo(
        f"reference {meta.id} v{meta.version}: {meta.frame_count} frames of camera {cam.id}, shape "
        f"{meta.shape[0]}x{meta.shape[1]} (H x W), {meta.polarity}, max shift applied {meta.max_shift_px:.2f} px "
        f"-> {out}" + ("" if cam.reference == out else f"\nuse it: set cameras[{index}].reference: {out} in the config")
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
    ] = 26.0,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    val_groups: Annotated[str, typer.Option(help="Comma-separated validation board groups.")] = "group13000,group50600",
    windows_per_image: Annotated[int, typer.Option(help="Training windows sampled per image per round.")] = 12,
    rounds: Annotated[int, typer.Option(help="Rounds of freshly augmented windows.")] = 3,
    threads: Annotated[int, typer.Option(help="torch threads (0 = all cores).")] = 0,
    version: Annotated[str, typer.Option(help="Model version written to the card.")] = "1",
    from_checkpoint: Annotated[
        Path | None, typer.Option(help="Skip training: export and validate a checkpoint saved by an earlier run.")
    ] = None,
    notes: Annotated[
        Path | None, typer.Option(help="JSON list of earlier experiments to record in the model card.")
    ] = None,
) -> None:
    """Train the SOARTC ViT on CPU, export it to ONNX, choose its thresholds on validation, write its card."""
    import json

    try:
        from stream_service.training.ship import ship
        from stream_service.training.train import TrainConfig, load_checkpoint, save_checkpoint, set_threads, train
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
    checkpoint = Path("runs") / f"{out.name}-checkpoint.pt"
    try:
        if from_checkpoint is not None:
            result = load_checkpoint(from_checkpoint)
        else:
            result = train(manifest, cfg)
            save_checkpoint(result, checkpoint)
            typer.echo(f"trained in {result.seconds / 60:.1f} min; checkpoint {checkpoint}")
        experiments = json.loads(notes.read_text()) if notes is not None else []
        card = ship(result, manifest, out, name=out.name, version=version, experiments=experiments)
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


def _serve(
    kind: StageKind,
    config: Path | None,
    stats: Path | None,
    exit_with_parent: bool,
    body: Callable[[Settings, threading.Event, Heartbeat], None],
) -> None:
    """Run one stage process until SIGTERM/SIGINT; exit 1 with the error when it cannot start."""
    from stream_service.errors import StreamServiceError
    from stream_service.service import Heartbeat, install_stop_signals

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
    from stream_service.service import serve_capture

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
    from stream_service.service import serve_soartc

    _serve("soartc", config, stats, exit_with_parent, lambda s, stop, hb: serve_soartc(s, camera, stop, hb))


@app.command("infer")
def infer_command(
    config: ConfigOption = None,
    stats: StatsOption = None,
    exit_with_parent: ExitWithParentOption = False,
) -> None:
    """The infer stage: the ViT, verdicts and highlights, published on transport.verdicts_pub."""
    from stream_service.service import serve_infer

    _serve("infer", config, stats, exit_with_parent, serve_infer)


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

    from stream_service.dashboard import Dashboard, take
    from stream_service.errors import ConfigError, MessageError, StreamServiceError
    from stream_service.model_card import load_card, resolve_model_dir
    from stream_service.service import connectable, install_stop_signals
    from stream_service.stages.features import camera_reference
    from stream_service.summary import PipelineSummary
    from stream_service.supervisor import Supervisor, plan
    from stream_service.transport import FrameReceiver, terminate_context

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
            if now >= next_report:
                next_report += 1.0
                if dashboard is not None:
                    dashboard.publish(summary.snapshot(supervisor.stages, time.monotonic_ns(), now - started))
            if now >= next_summary:
                next_summary += every
                if tty:
                    block = summary.render(supervisor.stages, time.monotonic_ns(), now - started)
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


@app.command("dashboard")
def dashboard_command(
    config: ConfigOption = None,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="Verdict PUB endpoint (default: transport.verdicts_pub).")
    ] = None,
) -> None:
    """Serve the live dashboard for a pipeline started stage by stage or on other hosts, until Ctrl-C."""
    import time

    from stream_service.dashboard import Dashboard, take
    from stream_service.errors import MessageError, StreamServiceError
    from stream_service.service import connectable, install_stop_signals
    from stream_service.summary import PipelineSummary
    from stream_service.transport import FrameReceiver, terminate_context

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

    from stream_service.archive import HighlightArchive
    from stream_service.errors import MessageError, StreamServiceError
    from stream_service.messages import Highlight, Verdict
    from stream_service.service import connectable
    from stream_service.summary import PipelineSummary, verdict_line
    from stream_service.transport import FrameReceiver, terminate_context

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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
