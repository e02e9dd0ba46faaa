"""The run loop of ``stream-service run`` (with a supervisor) and of ``stream-service dashboard`` (without).

One ``RunLoop`` owns what the command holds while the pipeline runs: the supervisor of the stage
processes (None for the dashboard alone), a SUB socket on ``transport.verdicts_pub``, the
``PipelineSummary`` counted from it and the dashboard. Each tick it polls the supervisor, drains the
SUB socket (verdicts into the summary, highlight pictures into the dashboard), publishes a status
snapshot to the dashboard once a second and hands one to ``report`` every ``every`` seconds. It never
prints: the command line renders what ``report`` receives.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_service.errors import ConfigError, MessageError
from stream_service.runtime.service import connectable
from stream_service.runtime.summary import PipelineSummary
from stream_service.runtime.supervisor import StageSpec, Supervisor, plan
from stream_service.settings import Settings

if TYPE_CHECKING:
    from stream_service.runtime.runner import StopEvent
    from stream_service.web.dashboard import Dashboard
    from stream_service.wire.transport import FrameReceiver

log = logging.getLogger(__name__)

# How long one tick waits for the first message; the rest of what is queued is drained without waiting.
TICK_S = 0.1
# The dashboard's figures are refreshed once a second.
DASHBOARD_EVERY_S = 1.0

Status = dict[str, Any]
Report = Callable[[Status, float], None]


@dataclass(frozen=True)
class RunPlan:
    """What ``run`` starts: the stage processes, where their logs go, and where verdicts are published."""

    specs: list[StageSpec]
    run_dir: Path
    endpoint: str
    temporary: bool = False  # run_dir was made for this run (a fresh folder under the temp dir)

    def clean_up(self, succeeded: bool) -> bool:
        """Remove a temporary run folder after a run that succeeded (a failed run keeps its logs to read);
        returns whether it was removed."""
        if not (self.temporary and succeeded):
            return False
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return True


def prepare_run(settings: Settings, config: Path | None, run_dir: Path | None) -> RunPlan:
    """Check what every stage needs before starting any (``ConfigError``, ``ModelError``,
    ``GoldenReferenceError``, ``JournalError`` now, not after ``supervisor.max_restarts`` restarts), and plan
    the processes."""
    from stream_service.model.card import load_card, resolve_model_dir
    from stream_service.runtime.journal import Journal
    from stream_service.stages.features import camera_reference

    specs = plan(settings, config)
    refuse_endpoints_in_use(settings)
    load_card(resolve_model_dir(settings.inference.model))
    for camera in settings.cameras:
        camera_reference(camera)
    if settings.journal.enabled:
        Journal(settings.journal).close()  # made, or checked: a corrupt file is refused before anything starts
    folder = run_dir if run_dir is not None else Path(tempfile.mkdtemp(prefix="stream-service-run-"))
    return RunPlan(specs, folder, connectable(settings.transport.verdicts_pub), temporary=run_dir is None)


def refuse_endpoints_in_use(settings: Settings) -> None:
    """``ConfigError`` naming the setting and the endpoint when another process (another pipeline on the same
    endpoints) already listens where this pipeline's stages would bind: starting anyway would have its
    stages restart in a loop, pull the other pipeline's frames and print its verdicts as their own. (A taken
    dashboard port is not refused here: the pipeline runs on without its dashboard, and says so.)"""
    from stream_service.wire.transport import endpoint_in_use

    t = settings.transport
    binds = {"transport.features_out": t.features_out, "transport.verdicts_pub": t.verdicts_pub}
    for i, camera in enumerate(settings.cameras):
        binds[f"transport.capture_out (camera {camera.id})"] = t.capture_endpoint(i, camera.id)
    for key, endpoint in binds.items():
        why = endpoint_in_use(endpoint)
        if why is not None:
            raise ConfigError(
                f"{key}: expected a free endpoint, found {endpoint} in use ({why}); is another `stream-service "
                "run` using these endpoints? Stop it, or give this pipeline other ports"
            )


def open_subscriber(settings: Settings, endpoint: str, highlights: bool) -> FrameReceiver:
    """A SUB socket on the verdicts (and, for a dashboard, the highlights) published at ``endpoint``."""
    from stream_service.wire.transport import FrameReceiver

    topics = ["verdicts.", "status.", "highlights."] if highlights else ["verdicts.", "status."]
    return FrameReceiver(endpoint, kind="sub", topics=topics, hwm=settings.transport.publish_hwm, linger_ms=0)


class RunLoop:
    """Supervisor, verdict subscriber, summary and dashboard, ticking together (see the module docstring)."""

    def __init__(
        self,
        subscriber: FrameReceiver,
        supervisor: Supervisor | None = None,
        dashboard: Dashboard | None = None,
        clock: Callable[[], float] = time.monotonic,
        camera_stale_s: float = 5.0,
    ) -> None:
        self.subscriber, self.supervisor, self.dashboard = subscriber, supervisor, dashboard
        self.summary = PipelineSummary(stale_s=camera_stale_s)
        self._clock = clock
        self.started = clock()

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self.started

    def snapshot(self) -> Status:
        """Everything the summary and the dashboard show, now."""
        stages = self.supervisor.stages if self.supervisor is not None else []
        return self.summary.snapshot(stages, time.monotonic_ns(), self.elapsed_s)

    def final(self) -> str:
        """The closing summary, as the terminal shows it."""
        stages = self.supervisor.stages if self.supervisor is not None else []
        return self.summary.render(stages, time.monotonic_ns(), self.elapsed_s)

    def failed_stages(self) -> list[str]:
        """``"<stage>: <reason>"`` of each stage process that is ``failed`` (retried, but not running)."""
        stages = self.supervisor.stages if self.supervisor is not None else []
        return [f"{st.name}: {st.reason}" for st in stages if st.state == "failed"]

    def failed_cameras(self) -> list[str]:
        """``"<camera>: <reason>"`` of each camera whose capture has given up on it (state ``failed``)."""
        cameras = self.snapshot()["health"]["cameras"]
        return [f"{cid}: {h['reason']}" for cid, h in cameras.items() if h["state"] == "failed"]

    def drain(self, timeout_s: float = TICK_S) -> int:
        """Take every message queued on the subscriber (waiting up to ``timeout_s`` for the first)."""
        from stream_service.web.dashboard import take

        taken = 0
        while True:
            try:
                message = self.subscriber.receive(timeout_s)
            except MessageError:
                continue  # counted and logged by the receiver
            if message is None:
                return taken
            take(message, self.summary, self.dashboard, time.monotonic_ns())
            taken += 1
            timeout_s = 0.0

    def run(
        self,
        stop: StopEvent,
        duration_s: float | None = None,
        every_s: float | None = None,
        report: Report | None = None,
    ) -> int:
        """Tick until ``stop`` or ``duration_s``; ``report(status, elapsed_s)`` is called every ``every_s``
        seconds. A failing stage does not end the loop: the supervisor retries it and the health shows it."""
        if self.supervisor is not None:
            self.supervisor.start()
        next_dashboard = self.started + DASHBOARD_EVERY_S
        next_report = self.started + every_s if every_s is not None else float("inf")
        while not stop.is_set():
            if self.supervisor is not None:
                self.supervisor.poll()
            self.drain()
            now = self._clock()
            status = None  # this tick's snapshot, computed once for the dashboard and the report
            if now >= next_dashboard:
                next_dashboard += DASHBOARD_EVERY_S
                if self.dashboard is not None:
                    status = self.snapshot()
                    self.dashboard.publish(status, stages=self.supervisor.stages if self.supervisor else ())
            if report is not None and every_s is not None and now >= next_report:
                next_report += every_s
                report(status or self.snapshot(), now - self.started)
            if duration_s is not None and now - self.started >= duration_s:
                break
        return 0

    def close(self) -> None:
        """Stop the stages (captures first, with the supervisor's deadline), then the sockets and the dashboard."""
        from stream_service.wire.transport import terminate_context

        if self.supervisor is not None:
            self.supervisor.stop()
        self.subscriber.close()
        if self.dashboard is not None:
            self.dashboard.close()
        terminate_context()

    def __enter__(self) -> RunLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
