"""The journal replay contract: one JSON request, one JSON reply, over the infer stage's request/reply socket.

A client (``stream-service subscribe --since``, the dashboard's ``/api/verdicts``) sends a
``ReplayRequest``: the verdicts after ``since`` (a ``verdict_id``: strictly after it; or an ISO 8601
time: made at or after it), of one ``camera`` or all, at most ``limit`` of them. The infer stage answers
with a ``ReplayReply``: the verdicts in the order they were published, and ``more`` when the journal
holds more after the last one (ask again with ``since`` = its ``verdict_id``); or ``error``, whose text is
``"<thing>: expected <x>, found <y>"``, and no verdicts. The server caps ``limit`` at its
``journal.replay_limit``.

The reply is built from the journal's stored verdict JSON without parsing it (``reply_text``); the
client validates each verdict (``decode_reply``), so a verdict of any 1.x minor version replays.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream_service.errors import JournalError, MessageError
from stream_service.wire.messages import CameraId, Part, Verdict


class ReplayRequest(BaseModel):
    """What a client asks the journal for (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    since: str | None = Field(None, max_length=64, description="A verdict_id or an ISO 8601 time; None: the oldest.")
    camera: CameraId | None = None
    limit: int = Field(100, ge=1, description="The most verdicts wanted in this reply.")


class ReplayReply(BaseModel):
    """What the journal answers: verdicts in publishing order, whether more follow, or an error."""

    model_config = ConfigDict(frozen=True)

    verdicts: tuple[Verdict, ...] = ()
    more: bool = False
    error: str | None = None


def encode_request(request: ReplayRequest) -> bytes:
    return request.model_dump_json().encode()


def decode_request(raw: Part) -> ReplayRequest:
    """Parse a request; raises ``JournalError`` ``"replay request ...: expected ..., found ..."``."""
    try:
        return ReplayRequest.model_validate_json(bytes(raw))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "(the JSON)"
        found = repr(error.get("input"))[:80]
        raise JournalError(
            f"replay request field '{where}': expected a valid value ({error['msg']}), found {found}"
        ) from exc


def reply_text(verdicts_json: Sequence[str], more: bool) -> bytes:
    """A ``ReplayReply`` of stored verdict JSON texts, joined without parsing them."""
    return b'{"verdicts":[' + ",".join(verdicts_json).encode() + b'],"more":' + (b"true" if more else b"false") + b"}"


def error_text(message: str) -> bytes:
    return json.dumps({"verdicts": [], "more": False, "error": message}).encode()


def decode_reply(raw: Part) -> ReplayReply:
    """Parse a reply; raises ``MessageError`` ``"replay reply: expected ..., found ..."`` when malformed."""
    try:
        return ReplayReply.model_validate_json(bytes(raw))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise MessageError(
            f"replay reply at '{where}': expected a valid value ({error['msg']}), found {repr(error.get('input'))[:80]}"
        ) from exc
