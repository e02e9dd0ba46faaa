"""``stream-service reference build|grab|show``: golden references from files or from a camera."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from stream_service.cli.app import ConfigOption, _fail, _load, reference_app


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
    from stream_service.model.references import build_reference_from_files, frame_paths

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
    from stream_service.model.references import SourceFrame, build_reference, save_reference
    from stream_service.runtime.service import camera_at
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
    from stream_service.model.references import load_reference

    try:
        ref = load_reference(directory)
    except StreamServiceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(ref.meta.model_dump_json(indent=2))
