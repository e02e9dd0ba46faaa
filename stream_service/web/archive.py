"""Highlight pictures kept for the record (``stream-service subscribe --save-highlights DIR``).

The infer stage publishes each verdict and then its highlight (a JPEG) on the same PUB socket. An
``HighlightArchive`` is told every verdict a subscriber receives and writes the matching highlight,
when it arrives, as ``DIR/<camera>/<verdict_id>-<pass|fail>.jpg`` (with ``fails_only``, the fails
only): unique across capture restarts, infer restarts and hosts, and in time order when listed; a
verdict of schema 1.0/1.1 (no id) as ``<camera>-<seq>-<pass|fail>.jpg``. It is the evidence a quality
engineer or an MES record needs next to the verdict. Files are written whole (a temporary name, then a
rename), so a reader never sees half a picture. A highlight whose
verdict this subscriber did not receive is not saved (its verdict is unknown).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from stream_service.errors import InputError
from stream_service.wire.messages import Highlight, Message, Verdict, highlight_jpeg

_REMEMBERED = 1000  # verdicts kept while their highlights are on their way


class HighlightArchive:
    def __init__(self, directory: Path, fails_only: bool = False) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--save-highlights: expected a writable directory, found {directory} ({exc})") from exc
        self.directory = directory
        self.fails_only = fails_only
        self.saved = 0
        # (camera, verdict_id or seq) -> verdict; a highlight names its verdict's id (schema 1.2)
        self._waiting: OrderedDict[tuple[str, str | int], str] = OrderedDict()

    def verdict(self, verdict: Verdict) -> None:
        """Remember ``verdict`` until its highlight arrives (unless it is a pass and only fails are kept)."""
        if self.fails_only and verdict.verdict != "fail":
            return
        self._waiting[(verdict.camera_id, verdict.verdict_id or verdict.seq)] = verdict.verdict
        while len(self._waiting) > _REMEMBERED:
            self._waiting.popitem(last=False)

    def highlight(self, message: Message) -> Path | None:
        """Save the JPEG of a highlight message whose verdict is waiting; the file written, or None."""
        header = message.header
        if not isinstance(header, Highlight):
            return None
        verdict = self._waiting.pop((header.camera_id, header.verdict_id or header.seq), None)
        jpeg = highlight_jpeg(message)
        if verdict is None or jpeg is None:
            return None
        folder = self.directory / header.camera_id
        folder.mkdir(exist_ok=True)
        stem = header.verdict_id or f"{header.camera_id}-{header.seq:08d}"
        path = folder / f"{stem}-{verdict}.jpg"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(jpeg)
        os.replace(tmp, path)
        self.saved += 1
        return path

    @property
    def pending(self) -> int:
        """Verdicts whose highlight has not arrived yet."""
        return len(self._waiting)
