"""The wire contract: round trips, zero copy, every malformed case, and the committed verdict schema."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stream_service.errors import MessageError
from stream_service.wire.messages import (
    HEADER_KINDS,
    SCHEMA_VERSION,
    VERDICT_ID_PATTERN,
    ArraySpec,
    DType,
    FeaturesHeader,
    FrameHeader,
    HeaderLimits,
    Highlight,
    Region,
    Registration,
    Stamp,
    Verdict,
    VerdictIds,
    add_stamp,
    decode,
    decode_header,
    encode,
    highlight_header,
    highlight_jpeg,
    json_depth,
    parse_utc_time,
    payload_views,
    rejection_reason,
    topic_of,
    utc_time,
    verdict_json_schema,
    verdict_schema_text,
    verdict_time_ns,
)

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "schemas" / "verdict.v1.json"
DTYPES: tuple[str, ...] = get_args(DType)


def frame_header(**overrides: Any) -> FrameHeader:
    fields: dict[str, Any] = {"camera_id": "cam0", "seq": 7, "capture_ns": 1_700_000_000_000_000_000}
    fields |= {"shape": (4, 6), "dtype": "uint8"} | overrides
    return FrameHeader(**fields)


def verdict(**overrides: Any) -> Verdict:
    fields: dict[str, Any] = {
        "camera_id": "cam0",
        "seq": 7,
        "capture_ns": 1_700_000_000_000_000_000,
        "verdict": "fail",
        "score": 0.91,
        "threshold": 0.5,
        "model_id": "vit-soartc",
        "model_version": "1.2.0",
        "reference_id": "board-a",
        "reference_version": "3",
        "regions": [Region(x1=10, y1=20, x2=30, y2=40, score=0.8, area=441)],
        "latency_ms": {"soartc": 4.1, "infer": 6.3, "end_to_end": 12.0},
        "dropped": 2,
    }
    return Verdict(**(fields | overrides))


def good_parts() -> list[bytes]:
    array = np.arange(24, dtype=np.uint8).reshape(4, 6)
    return [bytes(part) for part in encode("frames.cam0", frame_header(), [array])]


def with_header(**changes: Any) -> list[bytes]:
    parts = good_parts()
    header = json.loads(parts[1])
    for key, value in changes.items():
        if value is None:
            header.pop(key, None)
        else:
            header[key] = value
    parts[1] = json.dumps(header).encode()
    return parts


# --- round trips -------------------------------------------------------------------------------------

camera_ids = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=12)
shapes = st.lists(st.integers(1, 7), min_size=2, max_size=3).map(tuple)  # (H, W) or (H, W, C)
stamps = st.lists(
    st.builds(Stamp, stage=st.sampled_from(["capture", "soartc"]), t_ns=st.integers(0, 2**62)), max_size=16
)


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    camera_id=camera_ids,
    seq=st.integers(0, 2**40),
    stamps=stamps,
    dropped=st.integers(0, 1000),
    truth=st.none() | st.just({"label": "fail", "boxes": [[1, 2, 3, 4, 0]]}),
)
def test_frame_round_trip_is_exact_and_zero_copy(
    shape: tuple[int, ...], dtype: str, camera_id: str, seq: int, stamps: list[Stamp], dropped: int, truth: Any
) -> None:
    rng = np.random.default_rng(seq)
    array = (rng.random(shape) * 100).astype(dtype)
    header = frame_header(
        camera_id=camera_id, seq=seq, shape=shape, dtype=dtype, stamps=stamps, dropped=dropped, truth=truth
    )

    parts = encode(topic_of(header), header, [array])
    assert len(parts) == 3
    assert np.shares_memory(np.frombuffer(parts[2], np.uint8), array) or array.size == 0  # no copy out

    wire = [bytes(part) for part in parts]
    topic, decoded, arrays = decode(wire)
    assert topic == f"frames.{camera_id}"
    assert decoded == header
    assert arrays[0].dtype == np.dtype(dtype) and arrays[0].shape == shape
    np.testing.assert_array_equal(arrays[0], array)
    assert not arrays[0].flags.writeable
    assert np.shares_memory(arrays[0], np.frombuffer(wire[2], np.uint8)) or array.size == 0  # no copy in


def test_features_verdict_and_highlight_round_trip() -> None:
    frame = np.zeros((8, 8), np.uint8)
    grid = np.ones((2, 2, 20), np.float32)
    features = FeaturesHeader(
        camera_id="cam1",
        seq=3,
        capture_ns=5,
        shape=(8, 8),
        dtype="uint8",
        arrays=(
            ArraySpec(name="registered", shape=(8, 8), dtype="uint8"),
            ArraySpec(name="features", shape=(2, 2, 20), dtype="float32"),
        ),
        registration=Registration(dx=0.5, dy=-1.0, confidence=0.9),
    )
    _, header, arrays = decode([bytes(p) for p in encode("features.cam1", features, [frame, grid])])
    assert header == features
    np.testing.assert_array_equal(arrays[1], grid)

    v = verdict()
    assert decode(encode("verdicts.cam0", v)) == ("verdicts.cam0", v, [])

    jpeg = b"\xff\xd8fake-jpeg\xff\xd9"
    mask = np.zeros((8, 8), np.uint8)
    highlight = highlight_header(v, jpeg, mask)
    _, header, arrays = decode(encode("highlights.cam0", highlight, [jpeg, mask]))
    assert header == highlight and arrays[0].tobytes() == jpeg and arrays[1].shape == (8, 8)


def test_add_stamp_appends_to_frames_and_leaves_verdicts() -> None:
    header = add_stamp(frame_header(), "soartc", 42)
    assert isinstance(header, FrameHeader)
    assert header.stamps[-1] == Stamp(stage="soartc", t_ns=42)
    assert add_stamp(verdict(), "infer", 42) == verdict()


def test_newer_minor_version_with_unknown_fields_is_accepted() -> None:
    _, header, _ = decode(with_header(schema_version="1.7", added_in_1_7={"anything": 1}))
    assert header.schema_version == "1.7"


# --- malformed messages ------------------------------------------------------------------------------

MALFORMED: list[tuple[str, list[bytes], str]] = [
    ("topic only", good_parts()[:1], "part count"),
    ("payload missing", good_parts()[:2], "part count"),
    ("extra payload", [*good_parts(), b"x"], "part count"),
    ("topic not utf-8", [b"\xff\xfe", *good_parts()[1:]], "topic"),
    ("bad json", [b"frames.cam0", b"{not json", good_parts()[2]], "header json"),
    ("json not an object", [b"frames.cam0", b"[1, 2]", good_parts()[2]], "header json"),
    ("unknown major version", with_header(schema_version="2.0"), "schema_version"),
    ("missing version", with_header(schema_version=None), "schema_version"),
    ("unknown kind", with_header(kind="telemetry"), "kind"),
    ("missing kind", with_header(kind=None), "kind"),
    ("unknown dtype", with_header(dtype="complex64"), "header field 'dtype'"),
    ("negative seq", with_header(seq=-1), "header field 'seq'"),
    ("bad camera id", with_header(camera_id="cam 0/.."), "header field 'camera_id'"),
    ("missing field", with_header(capture_ns=None), "header field 'capture_ns'"),
    ("payload too short", [*good_parts()[:2], good_parts()[2][:-1]], "payload size"),
    ("payload too long", [*good_parts()[:2], good_parts()[2] + b"\x00"], "payload size"),
    ("shape mismatch", with_header(shape=[5, 6]), "payload size"),
]


@pytest.mark.parametrize(("case", "parts", "reason"), MALFORMED, ids=[case for case, _, _ in MALFORMED])
def test_malformed_message_is_rejected_with_its_reason(case: str, parts: list[bytes], reason: str) -> None:
    with pytest.raises(MessageError) as info:
        decode(parts)
    assert rejection_reason(info.value) == reason
    assert "expected" in str(info.value) and "found" in str(info.value)


ENCODE_ERRORS: list[tuple[str, str, list[Any], str]] = [
    ("empty topic", "", [np.zeros((4, 6), np.uint8)], "topic"),
    ("NUL in topic", "frames.cam0\x00shm", [np.zeros((4, 6), np.uint8)], "topic"),
    ("no array", "frames.cam0", [], "arrays"),
    ("wrong shape", "frames.cam0", [np.zeros((6, 4), np.uint8)], "array 'frame'"),
    ("wrong dtype", "frames.cam0", [np.zeros((4, 6), np.float32)], "array 'frame'"),
    ("big-endian", "frames.cam0", [np.zeros((4, 6), ">u2")], "array 'frame'"),
]


@pytest.mark.parametrize(("case", "topic", "arrays", "reason"), ENCODE_ERRORS, ids=[c[0] for c in ENCODE_ERRORS])
def test_encode_refuses_arrays_that_do_not_match_the_header(
    case: str, topic: str, arrays: list[Any], reason: str
) -> None:
    header = frame_header(dtype="uint16") if case == "big-endian" else frame_header()
    with pytest.raises(MessageError) as info:
        encode(topic, header, arrays)
    assert rejection_reason(info.value) == reason


def test_non_contiguous_array_is_sent_contiguous() -> None:
    array = np.arange(48, dtype=np.uint8).reshape(4, 12)[:, ::2]
    _, _, arrays = decode([bytes(p) for p in encode("frames.cam0", frame_header(), [array])])
    np.testing.assert_array_equal(arrays[0], array)


# --- the verdict schema ------------------------------------------------------------------------------


def test_committed_verdict_schema_is_up_to_date() -> None:
    regenerate = (
        'python -c "from pathlib import Path; from stream_service.wire.messages import export_verdict_schema; '
        "export_verdict_schema(Path('schemas/verdict.v1.json'))\""
    )
    assert SCHEMA_FILE.is_file(), f"{SCHEMA_FILE} is missing; create it with: {regenerate}"
    assert SCHEMA_FILE.read_text(encoding="utf-8") == verdict_schema_text(), f"stale schema; run: {regenerate}"
    assert f"schema {SCHEMA_VERSION}" in verdict_json_schema()["description"]


def _validate(instance: dict[str, Any], schema: dict[str, Any]) -> None:
    """Validate with ``jsonschema`` when installed, else check it against the model and the schema's keys."""
    try:
        import jsonschema
    except ImportError:
        Verdict.model_validate(instance)
        missing = set(schema["required"]) - set(instance)
        if missing:
            raise ValueError(f"missing required fields {sorted(missing)}") from None
        return
    jsonschema.validate(instance, schema)


def test_a_verdict_validates_against_the_committed_schema() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    instance = json.loads(verdict().model_dump_json())
    _validate(instance, schema)
    assert {"verdict", "score", "regions", "latency_ms", "dropped", "schema_version"} <= set(schema["required"])

    incomplete = {k: v for k, v in instance.items() if k != "score"}
    with pytest.raises(Exception, match="score"):
        _validate(incomplete, schema)


def test_the_jpeg_of_a_highlight_message_and_of_nothing_else() -> None:
    picture = b"\xff\xd8picture\xff\xd9"
    v = verdict()
    message = decode(encode(topic_of(highlight_header(v, picture)), highlight_header(v, picture), [picture]))
    assert highlight_jpeg(message) == picture
    assert highlight_jpeg(decode(encode(topic_of(v), v))) is None


# --- verdict identity (schema 1.2) ---------------------------------------------------------------------------
def test_verdict_ids_are_uuid7_unique_and_in_time_order_even_when_the_clock_steps_back() -> None:
    ids = VerdictIds()
    t_ns = 1_796_000_000_123_456_789
    made = [ids.new(t_ns) for _ in range(3000)] + [ids.new(t_ns - 10**9)] + [ids.new(t_ns + 10**9)]
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(re.match(VERDICT_ID_PATTERN, i) for i in made)
    assert all(uuid.UUID(i).version == 7 for i in made)
    # the first 48 bits are the Unix milliseconds
    assert int(made[0].replace("-", "")[:12], 16) == t_ns // 1_000_000
    # two generators (two processes, two hosts) never collide
    other = VerdictIds()
    assert not set(made) & {other.new(t_ns) for _ in range(3000)}


@pytest.mark.parametrize(
    ("text", "t_ns"),
    [
        ("2026-12-02T15:40:00.123Z", 1796226000_123_000_000),
        ("2026-12-02T15:40:00Z", 1796226000_000_000_000),
        ("2026-12-02T16:40:00.5+01:00", 1796226000_500_000_000),
        ("2026-12-02T15:40:00", 1796226000_000_000_000),
    ],
)
def test_utc_times_parse_with_or_without_an_offset(text: str, t_ns: int) -> None:
    assert parse_utc_time(text) == t_ns


def test_utc_time_is_iso_8601_with_milliseconds_and_round_trips() -> None:
    assert utc_time(1796226000_123_999_999) == "2026-12-02T15:40:00.123Z"
    assert parse_utc_time(utc_time(1796226000_123_999_999)) == 1796226000_123_000_000


@pytest.mark.parametrize("old", ["1.0", "1.1"])
def test_a_1_2_decoder_accepts_verdicts_of_1_0_and_1_1_without_an_id(old: str) -> None:
    parts = encode("verdicts.cam0", verdict())
    obj = json.loads(bytes(parts[1]))
    obj = {k: v for k, v in obj.items() if k not in ("verdict_id", "time")} | {"schema_version": old}
    _, header, _ = decode([parts[0], json.dumps(obj).encode()])
    assert isinstance(header, Verdict) and header.verdict_id is None and header.time is None
    assert verdict_time_ns(header) is None


def test_a_verdict_with_an_id_and_its_highlight_carry_the_same_id() -> None:
    v = verdict(verdict_id=VerdictIds().new(1796226000_123_000_000), time="2026-12-02T15:40:00.123Z")
    _, decoded, _ = decode(encode(topic_of(v), v))
    assert isinstance(decoded, Verdict) and decoded.verdict_id == v.verdict_id
    assert verdict_time_ns(decoded) == 1796226000_123_000_000
    highlight = highlight_header(v, b"\xff\xd8\xff\xd9")
    assert highlight.verdict_id == v.verdict_id
    _validate(json.loads(v.model_dump_json()), json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))


@pytest.mark.parametrize(
    ("field", "value"),
    [("verdict_id", "not-a-uuid"), ("verdict_id", str(uuid.uuid4())), ("time", "yesterday")],
)
def test_a_malformed_verdict_id_or_time_is_rejected_naming_the_field(field: str, value: str) -> None:
    parts = encode("verdicts.cam0", verdict())
    obj = json.loads(bytes(parts[1])) | {field: value}
    with pytest.raises(MessageError, match=f"header field '{field}'"):
        decode([parts[0], json.dumps(obj).encode()])


# --- hostile input: what the crashers and a fuzzer send -------------------------------------------


def features_json(**changes: Any) -> bytes:
    """A valid features header (a 32x32 frame, 16-px blocks) as JSON, with top-level ``changes``."""
    header = FeaturesHeader(
        camera_id="cam0",
        seq=3,
        capture_ns=1_700_000_000_000_000_000,
        shape=(32, 32),
        dtype="uint8",
        arrays=(
            ArraySpec(name="aligned", shape=(32, 32), dtype="uint8"),
            ArraySpec(name="tokens", shape=(2, 2, 16), dtype="float32"),
            ArraySpec(name="open_diff", shape=(32, 32), dtype="uint8"),
            ArraySpec(name="diff", shape=(32, 32), dtype="uint8"),
        ),
        registration=Registration(dx=0.5, dy=-1.0, confidence=0.9),
    )
    return json.dumps(json.loads(header.model_dump_json()) | changes).encode()


CRASHERS: list[tuple[str, bytes, str]] = [
    ("'[' x 100,000", b"[" * 100_000, "header size"),
    ("'[' x 5,000", b"[" * 5_000, "header depth"),
    ("deep object", b'{"a":' * 40 + b"1" + b"}" * 40, "header depth"),
    ("deep truth", features_json(truth={"x": json.loads("[" * 40 + "]" * 40)}), "header depth"),
    ("5,000-digit seq", features_json().replace(b'"seq": 3', b'"seq": ' + b"9" * 5000), "header json"),
    ("4,000-digit seq", features_json().replace(b'"seq": 3', b'"seq": ' + b"9" * 4000), "header field 'seq'"),
    ("seq past int64", features_json(seq=2**63), "header field 'seq'"),
    ("negative capture_ns", features_json(capture_ns=-1), "header field 'capture_ns'"),
    ("dx: Infinity", features_json().replace(b'"dx": 0.5', b'"dx": Infinity'), "header field 'registration'"),
    ("dy: NaN", features_json().replace(b'"dy": -1.0', b'"dy": NaN'), "header field 'registration'"),
    ("a shape of one dimension", features_json(shape=[640]), "header field 'shape'"),
    ("a 0x0 frame", features_json(shape=[0, 0]), "header field 'shape'"),
    ("a frame side past the bound", features_json(shape=[70000, 4]), "header field 'shape'"),
    (
        "an array of 9 dimensions",
        features_json(arrays=[{"name": "a", "shape": [1] * 9, "dtype": "uint8"}]),
        "header field 'arrays'",
    ),
    ("too many stamps", features_json(stamps=[{"stage": "x", "t_ns": 1}] * 17), "header field 'stamps'"),
    (
        "a bad stamp deep in a list",
        features_json(stamps=[{"stage": "x", "t_ns": 1}] * 5 + [{"t_ns": 1}]),
        "header field 'stamps'",
    ),
]


@pytest.mark.parametrize(("case", "raw", "reason"), CRASHERS, ids=[c for c, _, _ in CRASHERS])
def test_hostile_headers_are_rejected_with_a_bounded_reason(case: str, raw: bytes, reason: str) -> None:
    with pytest.raises(MessageError) as info:
        decode_header(raw)
    assert rejection_reason(info.value) == reason
    assert "expected" in str(info.value) and "found" in str(info.value)


def test_the_header_limits_are_the_callers() -> None:
    raw = features_json()
    decode_header(raw, HeaderLimits(max_bytes=len(raw), max_depth=4))
    with pytest.raises(MessageError, match="header size: expected at most 100 bytes"):
        decode_header(raw, HeaderLimits(max_bytes=100))
    with pytest.raises(MessageError, match="header depth: expected JSON nested at most 3 deep"):
        decode_header(raw, HeaderLimits(max_depth=3))  # registration is 2 deep, arrays[].shape 3, a tree 4


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


def nesting(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((nesting(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((nesting(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_json_depth_is_the_nesting_of_the_value(value: Any) -> None:
    text = json.dumps(value).encode()
    assert json_depth(text) == nesting(value)
    assert json_depth(text, stop_above=1) == min(nesting(value), 2) or nesting(value) <= 1


FIELDS = sorted({field for model in HEADER_KINDS.values() for field in model.model_fields})


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["frame", "features", "verdict", "highlight", "status"]),
    changes=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
)
def test_decode_header_of_mutated_headers_raises_only_message_errors(kind: str, changes: dict[str, Any]) -> None:
    raw = json.loads(features_json()) | {"kind": kind} | changes
    try:
        decode_header(json.dumps(raw).encode())
    except MessageError as exc:
        assert rejection_reason(exc) in BOUNDED_REASONS or rejection_reason(exc).startswith("header field '")
        field = rejection_reason(exc).removeprefix("header field '").rstrip("'")
        assert field in FIELDS or field in BOUNDED_REASONS


BOUNDED_REASONS = {"header size", "header depth", "header json", "schema_version", "kind", "part count", "topic"}
BOUNDED_REASONS |= {"payload size", "payload shape"}


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(max_size=300) | st.text(alphabet='[]{}":,0123456789.eE-truefalsn \\', max_size=300).map(str.encode)
)
def test_decode_header_of_random_bytes_raises_only_message_errors(raw: bytes) -> None:
    try:
        decode_header(raw)
    except MessageError as exc:
        assert rejection_reason(exc) in BOUNDED_REASONS or rejection_reason(exc).startswith("header field '")


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=64), max_size=6),
    header=st.sampled_from([None, features_json(), json.dumps(json.loads(good_parts()[1])).encode()]),
)
def test_decode_of_random_parts_raises_only_message_errors(parts: list[bytes], header: bytes | None) -> None:
    if header is not None and len(parts) >= 2:
        parts[1] = header
    try:
        decode(parts)
    except MessageError as exc:
        assert rejection_reason(exc) in BOUNDED_REASONS or rejection_reason(exc).startswith("header field '")


@settings(max_examples=200, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 2**31 - 1), max_size=8), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    sizes=st.lists(st.integers(0, 64), min_size=0, max_size=5),
)
def test_payload_views_of_random_specs_and_parts_raise_only_message_errors(
    shapes: list[list[int]], dtype: str, sizes: list[int]
) -> None:
    specs = tuple(ArraySpec(name=f"a{i}", shape=tuple(s), dtype=dtype) for i, s in enumerate(shapes))  # type: ignore[arg-type]
    header = Highlight(camera_id="cam0", seq=0, capture_ns=0, arrays=specs)
    try:
        payload_views(header, [bytes(n) for n in sizes])
    except MessageError as exc:
        assert rejection_reason(exc) in BOUNDED_REASONS


def test_a_verdict_with_a_non_finite_score_is_not_a_verdict() -> None:
    with pytest.raises(ValidationError):
        verdict(score=float("nan"))
    raw = json.dumps(json.loads(verdict().model_dump_json()) | {"score": None}).encode()
    with pytest.raises(MessageError, match="header field 'score'"):
        decode_header(raw)


def test_an_unscored_verdict_carries_its_reason_and_the_schema_says_so() -> None:
    v = verdict(verdict="fail", score=1.0, regions=(), reason="features: expected finite token values, found NaN")
    assert decode(encode(topic_of(v), v)).header == v
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    _validate(json.loads(v.model_dump_json()), schema)
    assert "never a pass" in schema["properties"]["reason"]["description"]


HOSTILE_FOR_THE_SCAN = [
    b"[" * 40 + b'\\"' * 32000,  # a quote that never closes, retried from every quote by a naive pattern
    b"[" * 40 + b'"' + b"\\" * 64000,
    b'"[' * 32000,
    b"[" * 65536,
]


@pytest.mark.parametrize("raw", HOSTILE_FOR_THE_SCAN, ids=["escaped quotes", "backslashes", "quoted", "brackets"])
def test_the_depth_check_of_a_hostile_header_takes_milliseconds_not_seconds(raw: bytes) -> None:
    started = time.perf_counter()
    with pytest.raises(MessageError, match="header depth"):
        decode_header(raw)
    assert time.perf_counter() - started < 0.5  # 13 s with a pattern that needs the closing quote
