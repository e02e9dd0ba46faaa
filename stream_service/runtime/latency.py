"""Latency from stamps: per-stage durations, end to end, sliding-window percentiles, frame rate.

Stamps are wall-clock ``time.time_ns()`` values appended by each stage when it sends (see
``messages``). The duration of a stage is the time from the previous stamp to its own: its queueing,
transport and processing together. End to end is from the first (capture) stamp to ``now_ns``, the
publish of the verdict. Across hosts the figures include the clocks' synchronisation error and can be
slightly negative; they are reported as measured. Everything here is pure: times come in as arguments.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from stream_service.errors import ConfigError
from stream_service.wire.messages import Stamp

END_TO_END = "end_to_end"
_NS_PER_MS = 1e6


def stage_durations_ms(stamps: Sequence[Stamp]) -> dict[str, float]:
    """``{stage: ms}`` between each stamp and the one before it (the first stamp has no duration)."""
    durations: dict[str, float] = {}
    for before, after in pairwise(stamps):
        durations[after.stage] = durations.get(after.stage, 0.0) + (after.t_ns - before.t_ns) / _NS_PER_MS
    return durations


def latency_breakdown(stamps: Sequence[Stamp], now_ns: int, stage: str | None = None) -> dict[str, float]:
    """Per-stage durations, ``stage``'s own (last stamp to ``now_ns``) when given, and ``"end_to_end"``.

    ``{}`` when there are no stamps. This is what a verdict's ``latency_ms`` holds, with ``stage`` the
    publishing stage and ``now_ns`` the publish time.
    """
    if not stamps:
        return {}
    durations = stage_durations_ms(stamps)
    if stage is not None:
        durations[stage] = durations.get(stage, 0.0) + (now_ns - stamps[-1].t_ns) / _NS_PER_MS
    durations[END_TO_END] = (now_ns - stamps[0].t_ns) / _NS_PER_MS
    return durations


@dataclass(frozen=True)
class Percentiles:
    """Latency percentiles in ms over the ``count`` samples of the window."""

    p50: float
    p95: float
    p99: float
    count: int


class LatencyTracker:
    """Sliding windows of the last ``window`` samples per stage, summarised as p50/p95/p99."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ConfigError(f"latency window: expected >= 1 samples, found {window}")
        self.window = window
        self._samples: dict[str, deque[float]] = {}

    def add(self, latency_ms: Mapping[str, float]) -> None:
        """Record one frame's ``{stage: ms}``."""
        for stage, ms in latency_ms.items():
            samples = self._samples.get(stage)
            if samples is None:
                samples = self._samples[stage] = deque(maxlen=self.window)
            samples.append(ms)

    def percentiles(self) -> dict[str, Percentiles]:
        """``{stage: Percentiles}`` over the current windows."""
        result = {}
        for stage, samples in self._samples.items():
            p50, p95, p99 = np.percentile(np.fromiter(samples, np.float64, len(samples)), [50, 95, 99])
            result[stage] = Percentiles(float(p50), float(p95), float(p99), len(samples))
        return result

    def snapshot(self) -> dict[str, dict[str, float]]:
        """``percentiles()`` as plain dicts, for metrics and JSON."""
        return {
            stage: {"p50": p.p50, "p95": p.p95, "p99": p.p99, "count": p.count}
            for stage, p in self.percentiles().items()
        }


class FpsCounter:
    """Frames per second over the last ``window_s`` seconds of ``tick`` times (monotonic ns)."""

    def __init__(self, window_s: float, max_events: int = 100_000) -> None:
        if window_s <= 0 or max_events < 2:
            raise ConfigError(f"fps window: expected > 0 s and >= 2 events, found {window_s} s, {max_events}")
        self._window_ns = int(window_s * 1e9)
        self._ticks: deque[int] = deque(maxlen=max_events)

    def tick(self, t_ns: int) -> None:
        """Record one frame at ``t_ns``."""
        self._ticks.append(t_ns)
        self._prune(t_ns)

    def fps(self, now_ns: int) -> float:
        """Rate of the ticks within the window ending at ``now_ns``; 0.0 with fewer than two."""
        self._prune(now_ns)
        if len(self._ticks) < 2 or self._ticks[-1] == self._ticks[0]:
            return 0.0
        return (len(self._ticks) - 1) * 1e9 / (self._ticks[-1] - self._ticks[0])

    def _prune(self, now_ns: int) -> None:
        while self._ticks and self._ticks[0] < now_ns - self._window_ns:
            self._ticks.popleft()
