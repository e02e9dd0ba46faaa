"""The loop of ``stream-service subscribe``: verdicts (and highlight pictures) from a PUB socket, counted.

``VerdictSubscriber.run`` hands each verdict of the wanted camera to a callback (the command line prints
it), keeps each highlight's JPEG in the archive when one is given, and stops after ``count`` verdicts (after
a short wait for the highlights still on their way) or when nothing arrived for ``timeout_s``.

With ``since`` (``subscribe --since ID|TIME``) it first replays the journal and then goes on live, with no
gap and no duplicate. The SUB socket is connected before (by the caller), so live verdicts published
during the replay wait in its queue. Then:

1. every verdict after ``since`` is asked from the journal (page by page) and handed on, in order;
2. live verdicts already handed on (their ids are remembered, the last ``remember`` of them) or made
   before ``since`` are skipped;
3. the first live verdict that is new, and any later one after a gap in its camera's sequence numbers
   that ``dropped`` does not explain, first trigger a catch-up: the journal is asked again for what
   follows the last verdict handed on. The infer stage journals a verdict before it publishes it, so
   the journal then holds the live verdict and everything before it: what the SUB socket missed while
   its subscription was on its way (or to its high-water mark) is handed on from the journal, in order,
   and the live copies that follow are skipped by (2).

Replayed verdicts have no highlight picture (the journal keeps verdicts only).
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from stream_service.errors import MessageError, StreamServiceError
from stream_service.runtime.summary import PipelineSummary, missed_between
from stream_service.wire.messages import VERDICT_ID_PATTERN, Highlight, Verdict, parse_utc_time, verdict_time_ns

if TYPE_CHECKING:
    from stream_service.runtime.replay import JournalClient
    from stream_service.web.archive import HighlightArchive
    from stream_service.wire.transport import FrameReceiver

log = logging.getLogger(__name__)

# After the last verdict of --count: how long the highlights of the verdicts received may still come.
FINISHING_S = 2.0
POLL_S = 0.2
# Replayed verdict ids remembered to skip their live copies: more than a SUB queue and the socket
# buffers ahead of it can hold.
REMEMBER = 20_000


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
        journal: JournalClient | None = None,
        since: str | None = None,
        remember: int = REMEMBER,
    ) -> None:
        self.receiver, self.camera, self.count, self.timeout_s, self.archive = (
            receiver,
            camera,
            count,
            timeout_s,
            archive,
        )
        self.summary = PipelineSummary()
        self.journal, self.since, self.remember = journal, since, remember
        self.replayed = 0  # verdicts handed on from the journal
        self._cursor = since  # the last verdict handed on (its id), or since itself
        self._handed: OrderedDict[str, None] = OrderedDict()  # ids of replayed verdicts, the newest last
        self._seq: dict[str, int] = {}  # the last sequence number handed on, per camera
        self._caught_up = False
        self._before = _start_test(since)
        self._on_verdict: Callable[[Verdict], None] = lambda _v: None

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
        self._on_verdict = on_verdict
        if self.since is not None:
            self._hand_on(self._replay())  # errors here (an unknown id, no journal) go to the caller
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
            if self.since is not None and (self._replayed_already(header) or self._done(None) is not None):
                continue  # handed on from the journal already, or a catch-up reached the count
            self._hand(header, live=True)

    def _replay(self) -> Iterable[Verdict]:
        if self.journal is None:
            raise StreamServiceError("--since: expected a journal to replay from, found none")
        return self.journal.after(self._cursor, self.camera)

    def _hand_on(self, replayed: Iterable[Verdict]) -> None:
        for verdict in replayed:
            if self.count is not None and self.summary.total >= self.count:
                return
            if verdict.verdict_id not in self._handed:
                self._hand(verdict, live=False)

    def _replayed_already(self, verdict: Verdict) -> bool:
        """Whether the live ``verdict`` was handed on from the journal (or precedes ``since``); catches up
        from the journal first when it is the first new live verdict or follows a gap (module docstring)."""
        if verdict.verdict_id is not None and verdict.verdict_id in self._handed:
            return True
        if self._before(verdict):
            return True
        gap = missed_between(self._seq.get(verdict.camera_id), verdict.seq, verdict.dropped)
        if not self._caught_up or gap:
            self._caught_up = True
            try:
                self._hand_on(self._replay())
            except StreamServiceError as exc:
                log.warning("catching up from the journal after %s: %s", self._cursor, exc)
        return verdict.verdict_id is not None and verdict.verdict_id in self._handed

    def _hand(self, verdict: Verdict, live: bool) -> None:
        self.summary.add(verdict, time.monotonic_ns())
        if live and self.archive is not None:
            self.archive.verdict(verdict)
        if verdict.verdict_id is not None:
            self._cursor = verdict.verdict_id
            if not live:
                self.replayed += 1
                self._handed[verdict.verdict_id] = None
                while len(self._handed) > self.remember:
                    self._handed.popitem(last=False)
        self._seq[verdict.camera_id] = verdict.seq
        self._on_verdict(verdict)


def _start_test(since: str | None) -> Callable[[Verdict], bool]:
    """Whether a live verdict was made before ``since`` (a verdict id or a time): the replay starts after it."""
    if since is None:
        return lambda _v: False
    if re.match(VERDICT_ID_PATTERN, since):
        # UUIDv7 strings sort in time order
        return lambda v: v.verdict_id is not None and v.verdict_id <= since
    try:
        t_ns = parse_utc_time(since)
    except ValueError:
        return lambda _v: False  # the journal refuses it with the reason first
    return lambda v: (made := verdict_time_ns(v)) is not None and made < t_ns
