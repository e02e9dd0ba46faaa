"""The client side of the journal replay: ask the infer stage's journal for the verdicts after an id or a time.

``JournalClient.page`` is one request (``wire.replay``) on ``transport.journal_rep``; ``JournalClient.after``
pages through everything after ``since`` (asking again after the last verdict of each page). Used by
``stream-service subscribe --since`` (``runtime.subscriber``) and the dashboard's ``/api/verdicts``, so
both work from any host that reaches the endpoint.
"""

from __future__ import annotations

from collections.abc import Iterator

from stream_service.errors import JournalError
from stream_service.settings import Settings
from stream_service.wire.messages import Verdict
from stream_service.wire.replay import ReplayReply, ReplayRequest, decode_reply, encode_request


class JournalClient:
    """Requests to the journal at ``endpoint``; each waits at most ``timeout_ms`` for its reply."""

    def __init__(self, endpoint: str, timeout_ms: int, page_size: int) -> None:
        self.endpoint, self.timeout_ms, self.page_size = endpoint, timeout_ms, page_size

    @classmethod
    def from_settings(cls, settings: Settings, endpoint: str | None = None) -> JournalClient:
        """A client of ``endpoint`` (default: ``transport.journal_rep``, a wildcard bind made loopback)."""
        from stream_service.runtime.service import connectable

        j = settings.journal
        return cls(endpoint or connectable(settings.transport.journal_rep), j.replay_timeout_ms, j.replay_limit)

    def page(self, since: str | None, camera: str | None = None, limit: int | None = None) -> ReplayReply:
        """One reply: at most ``limit`` (default ``page_size``) verdicts after ``since``.

        Raises ``JournalError`` with the journal's own error text (an unknown id, a bad time), and
        ``TransportError`` when no reply comes in time."""
        from stream_service.wire.transport import request

        body = encode_request(ReplayRequest(since=since, camera=camera, limit=limit or self.page_size))
        reply = decode_reply(request(self.endpoint, body, timeout_ms=self.timeout_ms))
        if reply.error is not None:
            raise JournalError(f"journal at {self.endpoint}: {reply.error}")
        return reply

    def after(self, since: str | None, camera: str | None = None) -> Iterator[Verdict]:
        """Every verdict after ``since`` in publishing order, page by page, until the journal has no more."""
        while True:
            reply = self.page(since, camera)
            yield from reply.verdicts
            if not reply.more or not reply.verdicts:
                return
            since = reply.verdicts[-1].verdict_id
