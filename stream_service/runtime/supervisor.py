"""The supervisor: starts every stage of a pipeline as its own process, watches, restarts, stops them.

``plan(settings, config)`` lists the processes of one pipeline (``service`` draws the topology): the
infer process, ``soartc.workers`` soartc workers, one capture per camera, the bridges configured under
``bridges`` (``bridge-mqtt``, ``bridge-opcua``), each the ``stream-service
<stage>`` command of the same config, so what ``run`` starts is exactly what a line would start by
hand on several hosts.

``Supervisor`` runs them as child processes (``python -m stream_service.cli <stage> ...``), each in its
own session (a Ctrl-C in the terminal reaches the supervisor only, which then stops the stages in
order), with its output appended to ``<run_dir>/<name>.log``. Each stage writes a heartbeat with its
counters to ``<run_dir>/<name>.json`` every ``supervisor.heartbeat_s``. ``poll()``, called often:

- a stage that exited, or whose heartbeat is older than ``heartbeat_timeout_s`` (a hung process; it is
  killed), or that did not report running within ``startup_timeout_s``, is restarted after
  ``restart_backoff_s`` doubling with each failure in a row (at most ``_BACKOFF_FACTOR_MAX`` times);
- a failure in a row is one within ``STABLE_S`` of the stage's start: a stage that ran that long starts
  its count afresh; after ``max_restarts`` restarts in a row the stage is ``failed`` (its ``reason``
  names its exit code and its log) and is retried every ``restart_backoff_s * _BACKOFF_FACTOR_MAX``
  for as long as it takes: one camera's crashing stage never stops the others, and a stage that comes
  back (a camera fixed, a disk freed) is ``running`` again without a manual step.

``stop()`` sends SIGTERM to every stage (captures first, so no new frames enter), waits for them up to
``shutdown_deadline_s`` in all, then kills what is left. Stages started with ``--exit-with-parent``
also stop by themselves if the supervisor dies without stopping them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from stream_service.runtime.heartbeat import HeartbeatRecord, StageKind, read_heartbeat
from stream_service.runtime.service import check_topology
from stream_service.settings import Settings, SupervisorSettings

log = logging.getLogger(__name__)

# A stage that ran this long before dying starts its count of failures in a row afresh.
STABLE_S = 60.0
# The restart delay doubles with each failure in a row, up to this many times restart_backoff_s.
_BACKOFF_FACTOR_MAX = 16.0
_LOG_TAIL_BYTES = 2000
_ROTATE_EVERY_S = 5.0


def rotate_log(path: Path, max_bytes: int, backups: int) -> bool:
    """Once ``path`` is over ``max_bytes``: shift ``path.1..`` up (keeping ``backups``), copy it to
    ``path.1`` and truncate it in place. The stage keeps writing to its open descriptor, which appends
    (O_APPEND), so its next line lands at the start of the emptied file: nothing is lost or overwritten."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except OSError:
        return False
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
    if backups > 0:
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with path.open("r+b") as fh:
        fh.truncate(0)
    return True


CLI = (sys.executable, "-m", "stream_service.cli")


@dataclass(frozen=True)
class StageSpec:
    """One process of a pipeline: its name, its stage and its ``stream-service`` arguments."""

    name: str
    kind: StageKind
    args: tuple[str, ...]


def plan(settings: Settings, config: Path | None) -> list[StageSpec]:
    """The processes of the pipeline of ``settings`` (``config``: the file the stages load; None: the default)."""
    check_topology(settings)
    cfg = ("--config", str(config)) if config is not None else ()
    specs = [StageSpec("infer", "infer", ("infer", *cfg))]
    specs += [StageSpec(f"soartc-{i}", "soartc", ("soartc", *cfg)) for i in range(settings.soartc.workers)]
    specs += [StageSpec(f"capture-{c.id}", "capture", ("capture", *cfg, "--camera", c.id)) for c in settings.cameras]
    if settings.bridges.mqtt is not None:
        specs.append(StageSpec("bridge-mqtt", "bridge", ("bridge", "mqtt", *cfg)))
    if settings.bridges.opcua is not None:
        specs.append(StageSpec("bridge-opcua", "bridge", ("bridge", "opcua", *cfg)))
    return specs


@dataclass
class StageState:
    """What the supervisor knows of one stage process."""

    spec: StageSpec
    state: str = "pending"  # pending | starting | running | restarting | failed | stopped
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    running_since: float | None = None
    restarts: int = 0  # restarts so far
    failures: int = 0  # failures in a row
    next_start: float | None = 0.0
    exit_codes: list[int] = field(default_factory=list)
    heartbeat: HeartbeatRecord | None = None
    reason: str | None = None  # why it is failed

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class Supervisor:
    """Starts, watches, restarts and stops the processes of ``specs`` (see the module docstring)."""

    def __init__(
        self,
        specs: Sequence[StageSpec],
        settings: SupervisorSettings,
        run_dir: Path,
        *,
        command: Sequence[str] = CLI,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.command = tuple(command)
        self.env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self.stages = [StageState(spec) for spec in specs]
        self._clock, self._wall = clock, wall
        self._logs: dict[str, IO[bytes]] = {}
        self._stopped = False
        self._started: float | None = None
        self._next_rotation = 0.0
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(run_dir, 0o700)  # logs and heartbeats name files, hosts and counters: for this user only

    def heartbeat_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def start(self) -> None:
        """Start the stages that receive; the captures follow once those run (``poll``), so that no frame
        is sent while the soartc and infer stages are still loading and warming up (no start-up drops)."""
        self._started = self._clock()
        for st in self.stages:
            if st.spec.kind != "capture":
                self._launch(st)

    def _start_captures(self, now: float) -> None:
        """Launch the captures not yet started once every other stage runs (or ``startup_timeout_s`` passed)."""
        waiting = [st for st in self.stages if st.spec.kind == "capture" and st.state == "pending"]
        if not waiting or self._started is None:
            return
        ready = all(st.state == "running" for st in self.stages if st.spec.kind != "capture")
        if ready or now - self._started > self.settings.startup_timeout_s:
            for st in waiting:
                self._launch(st)

    def _launch(self, st: StageState) -> None:
        heartbeat = self.heartbeat_path(st.name)
        heartbeat.unlink(missing_ok=True)
        argv = [*self.command, *st.spec.args, "--stats", str(heartbeat), "--exit-with-parent"]
        out = self._logs.get(st.name)
        if out is None:
            fd = os.open(self.log_path(st.name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            out = self._logs[st.name] = os.fdopen(fd, "ab")
        if st.process is not None or st.exit_codes:
            st.restarts += 1
        # umask 077: what a stage creates (heartbeats, ipc socket files, journal) is its user's alone.
        st.process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, umask=0o077
        )
        st.state, st.started, st.running_since, st.next_start, st.heartbeat = (
            "failed" if st.state == "failed" else "starting",  # failed until it runs again
            self._clock(),
            None,
            None,
            None,
        )
        log.info("started %s (pid %d)", st.name, st.process.pid)

    def poll(self) -> None:
        """Reap dead stages, kill hung ones, restart them when their backoff has passed; rotate big logs."""
        if self._stopped:
            return
        now = self._clock()
        self._start_captures(now)
        if now >= self._next_rotation:
            self._next_rotation = now + _ROTATE_EVERY_S
            for st in self.stages:
                rotate_log(self.log_path(st.name), self.settings.log_max_bytes, self.settings.log_backups)
        for st in self.stages:
            if st.state == "pending":
                continue
            if st.process is None:
                if st.next_start is not None and now >= st.next_start:
                    self._launch(st)
                continue
            code = st.process.poll()
            if code is None:
                reason = self._check_heartbeat(st, now)
                if reason is None:
                    continue
                log.error("%s (pid %d): %s; killing it", st.name, st.process.pid, reason)
                st.process.kill()
                code = st.process.wait()
            self._died(st, code, now)

    def _check_heartbeat(self, st: StageState, now: float) -> str | None:
        """Why a live stage must be killed (None: it is fine)."""
        beat = self._read_heartbeat(st)
        if beat is not None:
            st.heartbeat = beat
            if st.running_since is None and beat.state == "running":
                st.state, st.running_since, st.reason = "running", now, None
        if st.running_since is None:
            if now - st.started > self.settings.startup_timeout_s:
                return f"not running after supervisor.startup_timeout_s = {self.settings.startup_timeout_s} s"
            return None
        age = self._wall() - st.heartbeat.t if st.heartbeat else float("inf")
        if age > self.settings.heartbeat_timeout_s:
            return (
                f"last heartbeat {age:.1f} s ago (supervisor.heartbeat_timeout_s = {self.settings.heartbeat_timeout_s})"
            )
        return None

    def _read_heartbeat(self, st: StageState) -> HeartbeatRecord | None:
        beat = read_heartbeat(self.heartbeat_path(st.name))
        return beat if beat is not None and beat.pid == st.pid else None

    def _died(self, st: StageState, code: int, now: float) -> None:
        st.exit_codes.append(code)
        st.process = None
        from stream_service.wire.shm_ring import remove_stale_rings

        # A killed capture cannot unlink its shared-memory ring: remove it before the stage starts anew.
        remove_stale_rings()
        if st.running_since is not None and now - st.started >= STABLE_S:
            st.failures = 0
        st.failures += 1
        tail = self.log_tail(st.name)
        delay = self.settings.restart_backoff_s * min(2.0 ** (st.failures - 1), _BACKOFF_FACTOR_MAX)
        if st.failures > self.settings.max_restarts:
            first = st.state != "failed"
            st.state, st.next_start = "failed", now + self.settings.restart_backoff_s * _BACKOFF_FACTOR_MAX
            st.reason = (
                f"stage {st.name} failed {st.failures} times in a row (last exit code {code}), more than "
                f"supervisor.max_restarts = {self.settings.max_restarts}; its log: {self.log_path(st.name)}; "
                f"retried every {self.settings.restart_backoff_s * _BACKOFF_FACTOR_MAX:g} s"
            )
            if first:
                log.error("%s%s", st.reason, f"\n{tail}" if tail else "")
            else:
                log.warning("%s exited with code %d again; still failed", st.name, code)
            return
        st.state, st.next_start = "restarting", now + delay
        log.error("%s exited with code %d; restarting in %.1f s. Log tail:\n%s", st.name, code, delay, tail)

    def log_tail(self, name: str, lines: int = 8) -> str:
        """The last ``lines`` lines of a stage's log."""
        try:
            with self.log_path(name).open("rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM every stage (captures first), wait up to ``shutdown_deadline_s``, kill the rest."""
        if self._stopped:
            return
        self._stopped = True
        deadline = self._clock() + self.settings.shutdown_deadline_s
        alive = [st for st in reversed(self.stages) if st.process is not None and st.process.poll() is None]
        for st in alive:
            assert st.process is not None
            try:
                st.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                continue
        for st in alive:
            assert st.process is not None
            try:
                st.process.wait(max(0.0, deadline - self._clock()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop within the deadline; killing it", st.name, st.process.pid)
                st.process.kill()
                st.process.wait()
        for st in self.stages:
            if st.process is not None:
                st.process.poll()
            if st.state != "failed":
                st.state = "stopped"
        for out in self._logs.values():
            out.close()
        self._logs.clear()
        from stream_service.wire.shm_ring import remove_stale_rings

        # A killed capture cannot unlink its shared-memory ring: remove the rings of dead processes.
        remove_stale_rings()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
