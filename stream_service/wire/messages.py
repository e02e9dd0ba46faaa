"""The wire contract: header models, the verdict JSON Schema, and the pure multipart codec.

A message on the wire is a ZeroMQ multipart ``[topic, header, payload...]``:

- ``topic``: UTF-8, ``<prefix>.<camera_id>`` (``frames.cam0``, ``verdicts.cam0``); subscribers filter
  on its prefix;
- ``header``: the JSON of one frozen header model below, carrying ``kind`` and ``schema_version``;
- ``payload``: one part per ``ArraySpec`` of the header (``array_specs()``), the raw C-contiguous bytes
  of the array, never pickled. ``encode`` hands out memoryviews of the arrays (no copy) and ``decode``
  returns ``np.frombuffer`` views of the received parts (no copy, read-only: stages must not mutate
  what they receive).

Versioning and compatibility. ``SCHEMA_VERSION`` is ``"MAJOR.MINOR"``. Within a major version the
contract only grows: new fields are optional (have defaults), no field is removed, renamed or changes
type or meaning, so a decoder accepts any minor version of its major and ignores fields it does not
know. A breaking change bumps the major; a decoder rejects a major it does not know. History: 1.0 the
first contract; 1.1 adds ``FeaturesHeader.reference_version``; 1.2 adds ``Verdict.verdict_id`` (a UUIDv7
string: unique across restarts and hosts, ordered by time) and ``Verdict.time`` (ISO 8601 UTC, when the
verdict was made), ``Highlight.verdict_id`` (the verdict it belongs to) and the ``status`` kind
(``CameraStatus``). A 1.0 or 1.1 verdict decodes with both as ``None``. The verdict, the public contract for
integrators, is exported as JSON Schema to ``schemas/verdict.v<MAJOR>.json`` (``export_verdict_schema``); a
test keeps the committed file equal to the generated one.

Timestamps are wall-clock ``time.time_ns()``: a monotonic clock is per host (and per boot), so it
cannot measure latency between stages that run on different hosts; wall clocks there must be
NTP/PTP-synchronised, and the error of that synchronisation bounds the cross-host latency figures.

Every decoding failure raises ``MessageError`` whose text is ``"<thing>: expected <x>, found <y>"``;
``rejection_reason`` returns the ``<thing>`` so that rejections can be counted per reason. A peer
chooses what it sends, so the ``<thing>`` never holds its values (only names of this contract): the
reasons stay a short, fixed list however hostile the input. Bounds: a header is at most
``HeaderLimits.max_bytes`` long and nested at most ``max_depth`` deep (checked before ``json.loads``
recurses), integers fit int64 and are non-negative, floats are finite, frame shapes are ``(H, W)`` or
``(H, W, C)`` with sides of 1 to ``MAX_SIDE`` pixels.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError

from stream_service.errors import MessageError

SCHEMA_VERSION = "1.2"
SCHEMA_MAJOR = 1

Array = npt.NDArray[Any]
Part = bytes | bytearray | memoryview
DType = Literal["uint8", "int8", "uint16", "int16", "uint32", "int32", "float16", "float32", "float64", "bool"]
CameraId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Camera id, [A-Za-z0-9_-]{1,64}.")]
Shape = Annotated[tuple[Annotated[int, Field(ge=0, le=2**31 - 1)], ...], Field(max_length=8)]
MAX_SIDE = 65535
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
FrameShape = Annotated[tuple[Side, ...], Field(min_length=2, max_length=3, description="(H, W) or (H, W, C).")]
# Counts and wall-clock nanoseconds: what an int64 holds, never negative.
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
VERDICT_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
VerdictId = Annotated[str, Field(pattern=VERDICT_ID_PATTERN, description="UUIDv7 (RFC 9562), lower-case.")]
UtcTime = Annotated[
    str,
    Field(
        pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$",
        description='ISO 8601 UTC, e.g. "2026-12-02T15:40:00.123Z".',
    ),
]

TOPIC_PREFIXES: dict[str, str] = {
    "frame": "frames",
    "features": "features",
    "verdict": "verdicts",
    "highlight": "highlights",
    "status": "status",
}


class _Model(BaseModel):
    # extra="ignore": a newer minor version may add fields this decoder does not know yet.
    # allow_inf_nan=False: JSON's Infinity/NaN are refused where the contract says float.
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)


class Stamp(_Model):
    """One stage's pass: the stage name and the wall-clock ``time.time_ns()`` when it sent the message."""

    stage: str = Field(max_length=64)
    t_ns: Count


class ArraySpec(_Model):
    """Name, shape and dtype of one payload part."""

    name: str
    shape: Shape
    dtype: DType

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class Registration(_Model):
    """Translation of the frame onto its reference, in pixels, and the phase-correlation confidence."""

    dx: float
    dy: float
    confidence: float


class _Header(_Model):
    schema_version: str = Field(SCHEMA_VERSION, pattern=r"^\d+\.\d+$", description="MAJOR.MINOR.")
    camera_id: CameraId
    seq: Count = Field(description="Frame sequence number, per camera.")
    capture_ns: Count = Field(description="Wall-clock capture time, time.time_ns().")

    def array_specs(self) -> tuple[ArraySpec, ...]:
        """The payload parts that follow the header, in order."""
        return ()


class FrameHeader(_Header):
    """A captured frame: one payload, the frame ``(H, W) or (H, W, C)``."""

    kind: Literal["frame"] = "frame"
    shape: FrameShape
    dtype: DType
    stamps: tuple[Stamp, ...] = Field((), max_length=16)
    dropped: Count = Field(0, description="Frames of this camera dropped since the previous message.")
    truth: dict[str, Any] | None = Field(None, description='Synthetic ground truth: {"label", "boxes"}.')
    reference_id: str | None = None

    def array_specs(self) -> tuple[ArraySpec, ...]:
        return (ArraySpec(name="frame", shape=self.shape, dtype=self.dtype),)


# The payload of a features message, in this order (the soartc stage writes it, the infer stage reads it):
#   aligned    (H, W) uint8       the frame registered onto the reference (what the highlight is drawn on)
#   tokens     (h, w, C) float32  the token features the ViT reads (``vision.tokens.CHANNEL_NAMES``)
#   open_diff  (H, W) uint8       the opened difference mask (1 = set), the highlight's pixels
#   diff       (H, W) uint8       the raw difference mask (1 = set)
FEATURES_ARRAYS = ("aligned", "tokens", "open_diff", "diff")


class FeaturesHeader(_Header):
    """A registered frame and its SOARTC feature grid; ``shape``/``dtype`` describe the captured frame.

    ``arrays`` names the payload parts: ``FEATURES_ARRAYS``, in that order."""

    kind: Literal["features"] = "features"
    shape: FrameShape
    dtype: DType
    stamps: tuple[Stamp, ...] = Field((), max_length=16)
    dropped: Count = 0
    truth: dict[str, Any] | None = None
    reference_id: str | None = None
    reference_version: str | None = Field(None, description="Version of the reference (schema 1.1).")
    arrays: tuple[ArraySpec, ...] = Field(max_length=8)
    registration: Registration

    def array_specs(self) -> tuple[ArraySpec, ...]:
        return self.arrays


class Region(_Model):
    """A highlighted defect region: inclusive pixel corners in the frame, score and area in pixels."""

    x1: NonNegativeInt
    y1: NonNegativeInt
    x2: NonNegativeInt
    y2: NonNegativeInt
    score: float
    area: NonNegativeInt


class Verdict(_Header):
    """The verdict on one frame: the public contract for integrators (``verdict_json_schema``)."""

    model_config = ConfigDict(
        json_schema_serialization_defaults_required=True,
        title="Verdict",
    )

    kind: Literal["verdict"] = "verdict"
    verdict_id: VerdictId | None = Field(None, description="Unique across restarts and hosts, time-ordered (1.2).")
    time: UtcTime | None = Field(None, description="When the verdict was made, ISO 8601 UTC (1.2).")
    verdict: Literal["pass", "fail"]
    score: float = Field(description="Model score of the frame; fail when score >= threshold.")
    threshold: float
    model_id: str
    model_version: str
    reference_id: str
    reference_version: str
    regions: tuple[Region, ...] = Field((), description="Defect regions, in frame pixels.")
    latency_ms: dict[str, float] = Field(
        default_factory=dict, description='Per-stage latency of this frame, and "end_to_end" (capture to publish).'
    )
    dropped: Count = Field(0, description="Frames of this camera dropped since the previous verdict.")
    truth: dict[str, Any] | None = None
    reason: str | None = Field(
        None,
        max_length=2000,
        description=(
            "Why the frame could not be scored (non-finite features or model outputs, a failed model run, a "
            "failed registration). "
            'Fail safe: such a frame is always verdict "fail" with score 1.0 and no regions, never a pass; '
            "null when the model scored the frame."
        ),
    )


class Highlight(_Header):
    """The highlight for a verdict: a JPEG payload (``jpeg``, 1-D uint8) and optionally the raw ``mask``."""

    kind: Literal["highlight"] = "highlight"
    verdict_id: VerdictId | None = Field(None, description="The verdict_id of its verdict (1.2).")
    arrays: tuple[ArraySpec, ...] = Field(max_length=8)

    def array_specs(self) -> tuple[ArraySpec, ...]:
        return self.arrays


CameraState = Literal["starting", "online", "reconnecting", "failed"]


class CameraStatus(_Header):
    """A camera's health, sent by its capture when it changes (and again every ``health.status_every_s``),
    passed on by the stages and published as ``status.<camera>``.

    ``seq`` is the camera's next frame number and ``capture_ns`` the time of this status (wall clock, ns).
    """

    kind: Literal["status"] = "status"
    state: CameraState
    reason: str | None = Field(None, max_length=2000, description="What is wrong, and what to do (when not online).")
    since_ns: Count = Field(description="Wall-clock time the state began, time.time_ns().")
    last_frame_ns: Count | None = Field(None, description="Wall-clock time of the camera's newest frame.")
    frames: Count = Field(0, description="Frames read from the camera so far by this capture.")


Header = FrameHeader | FeaturesHeader | Verdict | Highlight | CameraStatus
HEADER_KINDS: dict[
    str, type[FrameHeader] | type[FeaturesHeader] | type[Verdict] | type[Highlight] | type[CameraStatus]
] = {
    "frame": FrameHeader,
    "features": FeaturesHeader,
    "verdict": Verdict,
    "highlight": Highlight,
    "status": CameraStatus,
}


class Message(NamedTuple):
    """A decoded message: ``topic, header, arrays = message``."""

    topic: str
    header: Header
    arrays: list[Array]


class VerdictIds:
    """UUIDv7 verdict ids (RFC 9562 section 5.7, with its method 3 of increased clock precision).

    48 bits of Unix milliseconds, 12 bits of the sub-millisecond fraction, 62 random bits: unique
    across processes and hosts without coordination, and in time order as strings. Within one
    generator every id is greater than the one before, even when the wall clock steps back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def new(self, t_ns: int) -> str:
        """The id of a verdict made at wall-clock ``t_ns`` (``time.time_ns()``)."""
        ms, sub_ns = divmod(t_ns, 1_000_000)
        stamp = (ms & (2**48 - 1)) << 12 | sub_ns * 4096 // 1_000_000  # 60 bits: milliseconds, fraction
        with self._lock:
            # Never repeat or go back within one generator: step past the last id (a carry moves the ms).
            stamp = max(stamp, self._last + 1)
            self._last = stamp
        time_part = (stamp >> 12) << 16 | 0x7 << 12 | (stamp & 0xFFF)
        rand = int.from_bytes(os.urandom(8), "big") & (2**62 - 1)
        return str(uuid.UUID(int=time_part << 64 | 0b10 << 62 | rand))


def utc_time(t_ns: int) -> str:
    """``t_ns`` (``time.time_ns()``) as ISO 8601 UTC with milliseconds: ``2026-12-02T15:40:00.123Z``."""
    seconds, ns = divmod(t_ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{ns // 1_000_000:03d}Z"


def parse_utc_time(text: str) -> int:
    """An ISO 8601 time (``Z`` or an offset; no offset: UTC) as wall-clock nanoseconds since the epoch.

    Raises ``ValueError`` when ``text`` is not one."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith(("Z", "z")) else text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    since_epoch = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (since_epoch.days * 86400 + since_epoch.seconds) * 1_000_000_000 + since_epoch.microseconds * 1000


def _reject(thing: str, expected: object, found: object) -> MessageError:
    return MessageError(f"{thing}: expected {expected}, found {found}")


def rejection_reason(exc: MessageError) -> str:
    """The counted reason of a rejection: the ``<thing>`` of ``"<thing>: expected ..., found ..."``."""
    return str(exc).split(":", 1)[0]


def topic_of(header: Header) -> str:
    """``<prefix>.<camera_id>``, e.g. ``verdicts.cam0``."""
    return f"{TOPIC_PREFIXES[header.kind]}.{header.camera_id}"


def verdict_time_ns(verdict: Verdict) -> int | None:
    """The verdict's ``time`` as wall-clock nanoseconds (None for a verdict of schema 1.0/1.1)."""
    return None if verdict.time is None else parse_utc_time(verdict.time)


def highlight_header(verdict: Verdict, jpeg: Part, mask: Array | None = None) -> Highlight:
    """The header of the highlight of ``verdict`` for a JPEG of ``len(jpeg)`` bytes and an optional mask."""
    arrays = [ArraySpec(name="jpeg", shape=(memoryview(jpeg).nbytes,), dtype="uint8")]
    if mask is not None:
        arrays.append(ArraySpec.model_validate({"name": "mask", "shape": mask.shape, "dtype": str(mask.dtype)}))
    return Highlight(
        camera_id=verdict.camera_id,
        seq=verdict.seq,
        capture_ns=verdict.capture_ns,
        verdict_id=verdict.verdict_id,
        arrays=tuple(arrays),
    )


def highlight_jpeg(message: Message) -> bytes | None:
    """The JPEG bytes of a highlight message (its ``jpeg`` payload); None for any other message."""
    header = message.header
    if not isinstance(header, Highlight):
        return None
    names = [spec.name for spec in header.arrays]
    return bytes(message.arrays[names.index("jpeg")]) if "jpeg" in names else None


def add_stamp(header: Header, stage: str, t_ns: int) -> Header:
    """``header`` with ``Stamp(stage, t_ns)`` appended, for the kinds that carry stamps."""
    if isinstance(header, FrameHeader | FeaturesHeader):
        return header.model_copy(update={"stamps": (*header.stamps, Stamp(stage=stage, t_ns=t_ns))})
    return header


def encode(topic: str, header: Header, arrays: Sequence[Array | Part] = ()) -> list[bytes | memoryview]:
    """``[topic, header_json, *payloads]``; payloads are memoryviews of the arrays (no copy when C-contiguous).

    ``bytes`` stand for 1-D uint8 arrays (JPEG). Raises ``MessageError`` when the arrays do not match
    ``header.array_specs()`` in count, shape or dtype, or the topic is empty or holds a NUL byte.
    """
    if not topic or "\x00" in topic:
        raise _reject("topic", "a non-empty string without NUL", repr(topic))
    specs = header.array_specs()
    if len(arrays) != len(specs):
        raise _reject("arrays", f"{len(specs)} for {header.kind} {[s.name for s in specs]}", len(arrays))
    parts: list[bytes | memoryview] = [topic.encode(), header.model_dump_json().encode()]
    for spec, array in zip(specs, arrays, strict=True):
        a = np.frombuffer(array, np.uint8) if isinstance(array, bytes | bytearray | memoryview) else array
        if a.shape != spec.shape or a.dtype != np.dtype(spec.dtype):
            raise _reject(f"array '{spec.name}'", f"{spec.shape} {spec.dtype}", f"{a.shape} {a.dtype}")
        parts.append(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    return parts


@dataclass(frozen=True)
class HeaderLimits:
    """How large a header part may be (bytes) and how deeply its JSON may nest (arrays and objects)."""

    max_bytes: int = 65536
    max_depth: int = 32


# A string, or an unterminated one up to the end: the match never fails, so the scan stays linear (a
# pattern that requires the closing quote retries from every quote of '\\"' x 30,000: seconds per header).
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))


def json_depth(raw: bytes, stop_above: int | None = None) -> int:
    """How deeply the arrays and objects of the JSON text ``raw`` nest (strings skipped), without
    recursion: ``json.loads`` recurses once per level and dies of ``RecursionError`` on ``[`` x 100,000.
    With ``stop_above``, the scan stops once the depth exceeds it, and a result of at most ``stop_above``
    only says that the text is not deeper. Strings are delimited as ``json.loads`` delimits them; what
    follows an unterminated string is not counted, and ``json.loads`` never parses it either. Linear in
    ``len(raw)``, whatever it holds."""
    if raw.count(b"[") + raw.count(b"{") <= (stop_above or 0):
        return stop_above or 0  # cannot be deeper than its number of openings: the common, cheap case
    depth = deepest = 0
    for char in _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKET):
        depth += 1 if char in b"[{" else -1
        if depth > deepest:
            deepest = depth
            if stop_above is not None and deepest > stop_above:
                break
    return deepest


def decode_header(raw: Part, limits: HeaderLimits = HeaderLimits()) -> Header:
    """Parse and validate a header part: its size and depth within ``limits``, a JSON object, known major
    version, known kind, valid fields. Raises ``MessageError`` only, whatever ``raw`` holds."""
    text = bytes(raw)
    if len(text) > limits.max_bytes:
        raise _reject("header size", f"at most {limits.max_bytes} bytes", len(text))
    depth = json_depth(text, stop_above=limits.max_depth)
    if depth > limits.max_depth:
        raise _reject("header depth", f"JSON nested at most {limits.max_depth} deep", f"more than {limits.max_depth}")
    try:
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: bad JSON (JSONDecodeError) and integers past Python's int-string conversion limit.
        raise _reject("header json", "a UTF-8 JSON object", f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(obj, dict):
        raise _reject("header json", "a JSON object", type(obj).__name__)
    version = obj.get("schema_version")
    major = version.split(".", 1)[0] if isinstance(version, str) else None
    if major != str(SCHEMA_MAJOR):
        raise _reject("schema_version", f"major {SCHEMA_MAJOR} ('{SCHEMA_VERSION}')", repr(version))
    kind = obj.get("kind")
    model = HEADER_KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise _reject("kind", f"one of {sorted(HEADER_KINDS)}", repr(kind))
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        found = repr(error.get("input"))[:80]
        # The reason is the top-level field only: deeper locations hold list indices and dict keys a peer chose.
        field = str(error["loc"][0]) if error["loc"] else "(header)"
        raise _reject(f"header field '{field}'", f"a valid value at {where[:120]} ({error['msg']})", found) from exc


def payload_views(header: Header, payloads: Sequence[Part]) -> list[Array]:
    """Read-only zero-copy ``np.frombuffer`` views of ``payloads`` after checking their count and byte sizes."""
    specs = header.array_specs()
    if len(payloads) != len(specs):
        raise _reject("part count", f"{2 + len(specs)} for {header.kind}", 2 + len(payloads))
    arrays = []
    for spec, part in zip(specs, payloads, strict=True):
        view = memoryview(part)
        if view.nbytes != spec.nbytes:
            expected = f"{spec.nbytes} bytes for '{spec.name}' {spec.shape} {spec.dtype}"
            raise _reject("payload size", expected, view.nbytes)
        try:
            array = np.frombuffer(view, dtype=spec.dtype).reshape(spec.shape)
        except ValueError as exc:  # a shape NumPy cannot hold (too many elements once a side is 0)
            raise _reject("payload shape", f"a shape NumPy can hold for '{spec.name}'", spec.shape) from exc
        array.flags.writeable = False  # a receive buffer may be shared (ring slot): never write through it
        arrays.append(array)
    return arrays


def decode(parts: Sequence[Part], limits: HeaderLimits = HeaderLimits()) -> Message:
    """Validate ``[topic, header_json, *payloads]`` and return the header and zero-copy array views.

    Raises ``MessageError`` on a wrong part count, a topic that is not UTF-8, bad JSON, an unknown
    major version or kind, invalid header fields (including an unknown dtype) or a payload whose size
    is not ``prod(shape) * itemsize``.
    """
    if len(parts) < 2:
        raise _reject("part count", "at least 2 (topic, header)", len(parts))
    try:
        topic = bytes(parts[0]).decode()
    except UnicodeDecodeError as exc:
        raise _reject("topic", "UTF-8", repr(bytes(parts[0])[:40])) from exc
    header = decode_header(parts[1], limits)
    return Message(topic, header, payload_views(header, parts[2:]))


def verdict_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``Verdict`` as serialised on the wire."""
    schema = Verdict.model_json_schema(mode="serialization")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://stream-service.example/schemas/verdict.v{SCHEMA_MAJOR}.json",
        **schema,
        "description": (
            f"stream-service verdict, schema {SCHEMA_VERSION}. Within major version {SCHEMA_MAJOR} fields are "
            "only added (optional), never removed or changed; ignore unknown fields."
        ),
    }


def verdict_schema_text() -> str:
    """``verdict_json_schema()`` as the canonical text of ``schemas/verdict.v<MAJOR>.json``."""
    return json.dumps(verdict_json_schema(), indent=2, sort_keys=True) + "\n"


def export_verdict_schema(path: Path) -> None:
    """Write ``verdict_schema_text()`` to ``path`` (the repository keeps it in ``schemas/``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(verdict_schema_text(), encoding="utf-8")
