"""The loop of ``stream-service subscribe``: verdicts (and highlight pictures) from a PUB socket, counted.

``VerdictSubscriber.run`` hands each verdict of the wanted camera to a callback (the command line prints
it), keeps each highlight's JPEG in the archive when one is given, and stops after ``count`` verdicts (after
a short wait for the highlights still on their way) or when nothing arrived for ``timeout_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from stream_service.errors import MessageError
from stream_service.runtime.summary import PipelineSummary
from stream_service.wire.messages import Highlight, Verdict

if TYPE_CHECKING:
    from stream_service.web.archive import HighlightArchive
    from stream_service.wire.transport import FrameReceiver

# After the last verdict of --count: how long the highlights of the verdicts received may still come.
FINISHING_S = 2.0
POLL_S = 0.2


def subscribe_topics(camera: str | None, highlights: bool) -> list[str]:
    """The SUB prefixes for one camera (or every camera), with the highlights when they are kept."""
    topics = [f"verdicts.{camera}"] if camera else ["verdicts."]
    if highlights:
        topics.append(f"highlights.{camera}" if camera else "highlights.")
    return topics


class VerdictSubscriber:
    """One subscriber's loop over ``receiver`` (see the module docstring); ``summary`` counts what arrived."""

    def __init__(
        self,
        receiver: FrameReceiver,
        camera: str | None = None,
        count: int | None = None,
        timeout_s: float = 60.0,
        archive: HighlightArchive | None = None,
    ) -> None:
        self.receiver, self.camera, self.count, self.timeout_s, self.archive = (
            receiver,
            camera,
            count,
            timeout_s,
            archive,
        )
        self.summary = PipelineSummary()

    @property
    def missed(self) -> int:
        """Verdicts this subscriber missed: sequence gaps not reported as ``dropped``."""
        return sum(t.missed for t in self.summary.cameras.values())

    def _done(self, finishing: float | None) -> float | None:
        """None while more verdicts are wanted; else the time by which the last highlights must have come."""
        if self.count is None or self.summary.total < self.count:
            return None
        return finishing or time.monotonic() + FINISHING_S

    def run(self, on_verdict: Callable[[Verdict], None]) -> str | None:
        """Receive until ``count`` verdicts (returns None) or ``timeout_s`` of silence (returns what had
        arrived by then, as text: "after N verdict(s)" or "nothing arrived")."""
        last = time.monotonic()
        finishing: float | None = None
        while True:
            finishing = self._done(finishing)
            if finishing is not None and (
                self.archive is None or not self.archive.pending or time.monotonic() > finishing
            ):
                return None
            try:
                message = self.receiver.receive(POLL_S)
            except MessageError:
                continue  # counted and logged by the receiver
            now = time.monotonic()
            if message is None:
                if now - last > self.timeout_s:
                    return f"after {self.summary.total} verdict(s)" if self.summary.total else "nothing arrived"
                continue
            header = message.header
            if isinstance(header, Highlight) and self.archive is not None:
                self.archive.highlight(message)
                continue
            if not isinstance(header, Verdict) or (self.camera is not None and header.camera_id != self.camera):
                continue
            if finishing is not None:
                continue  # past --count: only highlights now
            last = now
            self.summary.add(header, time.monotonic_ns())
            if self.archive is not None:
                self.archive.verdict(header)
            on_verdict(header)
