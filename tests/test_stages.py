"""The stages in memory: capture messages and loop, soartc features, infer verdicts and highlights.

No sockets, no ONNX: the infer stage runs a fake window model whose fail probability is the opened
difference in the window, so that the whole chain can be checked against the synthetic ground truth.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

from stream_service.errors import CameraError, FrameShapeError, InputError, MessageError, ModelError
from stream_service.model.references import build_reference, save_reference
from stream_service.runtime.runner import MemorySink, MemorySource, StageStats, run_stage
from stream_service.settings import CameraSettings, HighlightSettings, InferenceSettings, Settings
from stream_service.sources.camera import SourceCounters
from stream_service.sources.synthetic import SyntheticCamera
from stream_service.stages.capture import CaptureStage, CaptureStats, run_capture
from stream_service.stages.features import FeaturesStage, camera_reference, synthetic_reference
from stream_service.stages.inference import InferenceStage, to_frame_regions
from stream_service.vision.inspection import FeatureExtractor
from stream_service.vision.tokens import CHANNEL_NAMES, FeatureSpec
from stream_service.wire.messages import (
    FEATURES_ARRAYS,
    ArraySpec,
    CameraStatus,
    FeaturesHeader,
    FrameHeader,
    Highlight,
    Message,
    Stamp,
    Verdict,
    encode,
)

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
SIZE = 256
OPEN_DIFF = [i for i, name in enumerate(CHANNEL_NAMES) if name.endswith(".open_diff")]


def synthetic_camera(camera_id: str = "cam0", **source: Any) -> CameraSettings:
    params = {"kind": "synthetic", "width": SIZE, "height": SIZE, "seed": 3, "defect_rate": 0.5} | source
    return CameraSettings.model_validate({"id": camera_id, "source": params})


def settings_for(*cameras: CameraSettings) -> Settings:
    return Settings(cameras=list(cameras))


class FakeModel:
    """A window model: fail probability 0.9 where a window holds opened difference, attention on it."""

    def __init__(self) -> None:
        self.card = SimpleNamespace(
            name="fake",
            version="7",
            features=SimpleNamespace(block=16, channels=list(CHANNEL_NAMES)),
            window=SimpleNamespace(grid=16, stride=12),
            threshold=SimpleNamespace(value=0.5),
            highlight=SimpleNamespace(attention=1.0, magnitude=0.0, max_elongation=1e6, min_area=0),
        )

    def run(self, windows_nggc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        opened = windows_nggc[..., OPEN_DIFF].max(axis=-1)  # (N, g, g)
        probs = np.where(opened.max(axis=(1, 2)) > 0.1, 0.9, 0.1).astype(np.float32)
        weight = opened + 1e-6
        return probs, (weight / weight.sum(axis=(1, 2), keepdims=True)).astype(np.float32)


def features_stage(*cameras: CameraSettings) -> FeaturesStage:
    return FeaturesStage.from_settings(settings_for(*cameras), FeatureSpec(), None)


def inference_stage(send_mask: bool = False, clock_ns: Any = time.time_ns) -> InferenceStage:
    highlight = HighlightSettings(send_mask=send_mask)
    return InferenceStage(FakeModel(), InferenceSettings(), highlight, clock_ns=clock_ns)  # type: ignore[arg-type]


def frame_message(camera: CameraSettings, frames: int = 1, **options: Any) -> list[Message]:
    """The capture stage's messages for the first ``frames`` frames of a synthetic camera."""
    stage, source = CaptureStage(camera), SyntheticCamera(SIZE, SIZE, seed=3, **options)
    out = []
    for _ in range(frames):
        frame, truth = source.next_frame()
        topic, header, arrays = stage.frame_message(frame, truth, time.time_ns())
        out.append(Message(topic, header, [np.asarray(a) for a in arrays]))
    return out


def through(stage: Any, message: Message, stage_name: str | None = None) -> list[Message]:
    """``message`` through ``stage`` via the runner's in-memory sink (encode, decode, stamps)."""
    sink = MemorySink()
    outputs = stage.process(*message)
    for topic, header, arrays in outputs:
        if stage_name is not None and isinstance(header, FrameHeader | FeaturesHeader):
            header = header.model_copy(
                update={"stamps": (*header.stamps, Stamp(stage=stage_name, t_ns=time.time_ns()))}
            )
        sink.send(topic, header, arrays)
    return sink.messages


# -- capture ------------------------------------------------------------------------------------------------
def test_capture_messages_are_stamped_numbered_and_carry_synthetic_truth() -> None:
    camera = synthetic_camera(defect_rate=1.0)
    stage = CaptureStage(camera)
    frame = np.zeros((SIZE, SIZE), np.uint8)
    truth = {"label": "fail", "boxes": [[10, 20, 30, 40, 2]]}
    for seq in range(3):
        topic, header, arrays = stage.frame_message(frame, truth, 1000 + seq)  # type: ignore[arg-type]
        assert isinstance(header, FrameHeader)
        assert (topic, header.seq, header.capture_ns, header.shape, header.dtype) == (
            "frames.cam0",
            seq,
            1000 + seq,
            (SIZE, SIZE),
            "uint8",
        )
        assert header.stamps == (Stamp(stage="capture", t_ns=1000 + seq),)
        assert header.truth == truth and arrays[0] is frame
    off = CaptureStage(synthetic_camera(truth=False))
    assert off.frame_message(frame, truth, 0)[1].truth is None  # type: ignore[arg-type, union-attr]


def test_capture_resizes_to_frame_size_and_scales_the_truth() -> None:
    camera = CameraSettings.model_validate(
        {"id": "c", "source": {"kind": "synthetic", "width": 200, "height": 100}, "frame_size": [100, 50]}
    )
    _, header, arrays = CaptureStage(camera).frame_message(
        np.zeros((100, 200), np.uint8),
        {"label": "fail", "boxes": [[20, 10, 59, 29, 1]]},
        0,
    )
    assert arrays[0].shape == (50, 100)
    assert header.truth == {"label": "fail", "boxes": [[10, 5, 29, 14, 1]]}  # type: ignore[union-attr]


@pytest.mark.parametrize("frame", [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32)], ids=["bgr", "float"])
def test_capture_refuses_frames_that_are_not_gray_uint8(frame: np.ndarray) -> None:
    with pytest.raises(CameraError, match="expected a uint8 gray"):
        CaptureStage(synthetic_camera()).frame_message(frame, None, 0)


class FlakySource:
    """Frames, then a CameraError (the camera vanished) after ``fail_after`` reads, once."""

    name = "flaky"
    problem = None

    def __init__(self, frames: int, fail_after: int | None = None) -> None:
        self.counters = SourceCounters()
        self.left, self.fail_after, self.reads = frames, fail_after, 0
        self.closed = False

    @property
    def finished(self) -> bool:
        return self.left <= 0

    def read(self, out: Any = None) -> np.ndarray | None:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise CameraError("camera flaky: expected frames, found that it stopped delivering")
        if self.left <= 0:
            return None
        self.left -= 1
        return np.zeros((8, 8), np.uint8)

    def close(self) -> None:
        self.closed = True


class RefusingSink:
    """A sink whose queue is full every other frame (the never-blocking sender's drop); statuses always go."""

    def __init__(self) -> None:
        self.sent: list[FrameHeader] = []
        self.statuses: list[CameraStatus] = []
        self.calls = 0

    def send(self, topic: str, header: Any, arrays: Sequence[Any] = ()) -> bool:
        if isinstance(header, CameraStatus):
            self.statuses.append(header)
            return True
        self.calls += 1
        if self.calls % 2 == 0:
            return False
        self.sent.append(header)
        return True


def test_capture_loop_counts_drops_and_reopens_a_vanished_camera() -> None:
    sources = [FlakySource(frames=10, fail_after=4), FlakySource(frames=6)]
    opened: list[FlakySource] = []

    def open_camera() -> FlakySource:
        opened.append(sources[len(opened)])
        return opened[-1]

    stop, sink, stats = threading.Event(), RefusingSink(), CaptureStats()
    camera = CameraSettings.model_validate({"id": "c", "source": {"kind": "folder", "path": "."}, "reference": "r"})
    worker = threading.Thread(
        target=run_capture,
        args=(CaptureStage(camera), open_camera, sink, stop),
        kwargs={"retry_s": 0.05, "stats": stats},
    )
    worker.start()
    deadline = time.monotonic() + 10
    while not stats.finished and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    worker.join(5)
    assert not worker.is_alive()
    assert stats.finished and stats.opens == 2 and stats.camera_errors == 1
    assert stats.frames == 10 and stats.sent + stats.dropped == 10 and stats.dropped == 5
    assert sources[0].closed and sources[1].closed
    assert [h.seq for h in sink.sent] == [0, 2, 4, 6, 8]


# -- soartc: references and features --------------------------------------------------------------------------
def test_synthetic_reference_is_recomputed_deterministically_from_the_settings() -> None:
    camera = synthetic_camera()
    ref = camera_reference(camera)
    np.testing.assert_array_equal(ref.image_hw, SyntheticCamera(SIZE, SIZE, seed=3).reference())
    np.testing.assert_array_equal(ref.image_hw, synthetic_reference(camera.source))  # type: ignore[arg-type]
    assert (ref.reference_id, ref.version, ref.dark_object) == ("synthetic-seed3-256x256", "1", True)
    other = camera_reference(synthetic_camera(seed=4)).image_hw
    assert not np.array_equal(ref.image_hw, other)


def test_a_stored_reference_is_loaded_with_its_own_polarity(tmp_path: Path) -> None:
    board = SyntheticCamera(SIZE, SIZE, seed=3).reference()
    save_reference(build_reference([board, board], reference_id="line-a", version=3, polarity="dark-object"), tmp_path)
    camera = CameraSettings.model_validate(
        {
            "id": "usb",
            "source": {"kind": "device", "index": 0},
            "reference": str(tmp_path),
            "polarity": "bright-object",
        }
    )
    ref = camera_reference(camera)
    assert (ref.reference_id, ref.version, ref.dark_object) == ("line-a", "3", True)
    np.testing.assert_allclose(ref.image_hw.astype(int), board.astype(int), atol=1)


def test_features_stage_output_matches_the_in_process_extractor() -> None:
    camera = synthetic_camera()
    message = frame_message(camera, defect_rate=1.0)[0]
    message = Message(message.topic, message.header.model_copy(update={"dropped": 2}), message.arrays)
    (out,) = through(features_stage(camera), message)
    header = out.header
    assert isinstance(header, FeaturesHeader) and out.topic == "features.cam0"
    assert [a.name for a in header.arrays] == list(FEATURES_ARRAYS)
    assert [(a.shape, a.dtype) for a in header.arrays] == [
        ((SIZE, SIZE), "uint8"),
        ((16, 16, 24), "float32"),
        ((SIZE, SIZE), "uint8"),
        ((SIZE, SIZE), "uint8"),
    ]
    assert (header.reference_id, header.reference_version) == ("synthetic-seed3-256x256", "1")
    assert header.truth == message.header.truth and header.dropped == 2  # type: ignore[union-attr]
    assert header.stamps == message.header.stamps  # type: ignore[union-attr]
    extractor = FeatureExtractor(SyntheticCamera(SIZE, SIZE, seed=3).reference(), FeatureSpec(), True)
    expected = extractor.extract(message.arrays[0])
    np.testing.assert_array_equal(out.arrays[0], expected.aligned_hw)
    np.testing.assert_array_equal(out.arrays[1], expected.features.tokens_hwc)
    np.testing.assert_array_equal(out.arrays[2], expected.features.open_diff_hw)
    assert header.registration.dx == pytest.approx(expected.registration.dx)


def test_a_wrong_size_frame_is_counted_and_its_loss_reported_with_the_next_frame() -> None:
    camera = synthetic_camera()
    good = frame_message(camera)[0]
    bad_header = FrameHeader(camera_id="cam0", seq=7, capture_ns=0, shape=(100, 120), dtype="uint8", dropped=3)
    source = MemorySource(
        [
            encode("frames.cam0", bad_header, [np.zeros((100, 120), np.uint8)]),
            Message(good.topic, good.header.model_copy(update={"seq": 8}), good.arrays),
            encode(
                "frames.cam9",
                bad_header.model_copy(update={"camera_id": "cam9", "shape": (SIZE, SIZE)}),
                [good.arrays[0]],
            ),
            [b"frames.cam0", b"{not json"],
        ]
    )
    sink, stop, stats = MemorySink(), threading.Event(), StageStats()
    worker = threading.Thread(
        target=run_stage,
        args=(features_stage(camera), source, sink, stop),
        kwargs={"poll_timeout_s": 0.02, "stats": stats},
    )
    worker.start()
    deadline = time.monotonic() + 20
    while stats.received + sum(stats.rejected.values()) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    worker.join(5)
    assert stats.errors == {"FrameShapeError": 1, "MessageError": 1}
    assert stats.rejected == {"header json": 1} and stats.sent == 1
    (out,) = sink.messages
    assert out.header.seq == 8 and out.header.dropped == 1 + 3  # type: ignore[union-attr]
    assert out.header.stamps[-1].stage == "soartc"  # type: ignore[union-attr]


def test_features_stage_errors_name_the_frame_and_the_reference() -> None:
    camera = synthetic_camera()
    stage = features_stage(camera)
    header = FrameHeader(camera_id="cam0", seq=5, capture_ns=0, shape=(100, 120), dtype="uint8")
    with pytest.raises(FrameShapeError, match=r"frame 5 of camera cam0: expected \(256, 256\) uint8 like reference"):
        stage.process("frames.cam0", header, [np.zeros((100, 120), np.uint8)])
    with pytest.raises(MessageError, match=r"camera_id: expected one of \['cam0'\], found 'cam9'"):
        stage.process("frames.cam9", header.model_copy(update={"camera_id": "cam9"}), [np.zeros((1, 1), np.uint8)])


# -- infer ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dx", "dy", "box", "expected"),
    [
        (0.0, 0.0, (10, 20, 30, 40), (10, 20, 30, 40)),
        (1.6, -2.2, (10, 20, 30, 40), (12, 18, 32, 38)),
        (-3.0, 0.0, (1, 0, 5, 5), (0, 0, 2, 5)),
        (5.0, 5.0, (250, 250, 255, 255), (255, 255, 255, 255)),
    ],
)
def test_regions_move_by_the_registration_into_captured_frame_pixels(
    dx: float, dy: float, box: tuple[int, int, int, int], expected: tuple[int, int, int, int]
) -> None:
    from stream_service.vision.highlight import Region as Found

    (region,) = to_frame_regions([Found(*box, score=0.5, area=9)], dx, dy, (SIZE, SIZE))
    assert (region.x1, region.y1, region.x2, region.y2, region.area) == (*expected, 9)


def features_message(defect_rate: float = 1.0, dropped: int = 0) -> Message:
    camera = synthetic_camera()
    frame = frame_message(camera, defect_rate=defect_rate)[0]
    frame = Message(frame.topic, frame.header.model_copy(update={"dropped": dropped}), frame.arrays)
    (out,) = through(features_stage(camera), frame, "soartc")
    return out


def test_infer_publishes_a_verdict_and_a_highlight_jpeg() -> None:
    message = features_message(dropped=1)
    clock = iter([message.header.stamps[-1].t_ns + 5_000_000])  # type: ignore[union-attr]
    stage = inference_stage(clock_ns=lambda: next(clock))
    verdict_msg, highlight_msg = through(stage, message)
    verdict, highlight = verdict_msg.header, highlight_msg.header
    assert isinstance(verdict, Verdict) and isinstance(highlight, Highlight)
    assert (verdict_msg.topic, highlight_msg.topic) == ("verdicts.cam0", "highlights.cam0")
    assert (verdict.model_id, verdict.model_version) == ("fake", "7")
    assert (verdict.reference_id, verdict.reference_version) == ("synthetic-seed3-256x256", "1")
    assert verdict.truth == message.header.truth and verdict.dropped == 1  # type: ignore[union-attr]
    assert set(verdict.latency_ms) == {"soartc", "infer", "end_to_end"}
    assert verdict.latency_ms["infer"] == pytest.approx(5.0)
    assert verdict.latency_ms["end_to_end"] == pytest.approx(verdict.latency_ms["soartc"] + 5.0)
    assert (highlight.seq, [a.name for a in highlight.arrays]) == (verdict.seq, ["jpeg"])
    picture = cv2.imdecode(np.asarray(highlight_msg.arrays[0]), cv2.IMREAD_COLOR)
    assert picture.shape == (SIZE, SIZE, 3)


def test_infer_gives_every_verdict_an_id_and_a_utc_time_and_its_highlight_the_same_id() -> None:
    message = features_message()
    made_ns = 1_796_226_000_123_456_789  # 2026-12-02T15:40:00.123Z
    stage = inference_stage(clock_ns=lambda: made_ns)
    outputs = [through(stage, message) for _ in range(3)]  # the same frame three times (a capture restart)
    ids = [v.header.verdict_id for v, _ in outputs]  # type: ignore[union-attr]
    assert len(set(ids)) == 3 and ids == sorted(ids)
    assert all(h.header.verdict_id == v.header.verdict_id for v, h in outputs)  # type: ignore[union-attr]
    assert {v.header.time for v, _ in outputs} == {"2026-12-02T15:40:00.123Z"}  # type: ignore[union-attr]


def test_infer_sends_the_raw_mask_on_request() -> None:
    _, highlight_msg = through(inference_stage(send_mask=True), features_message())
    assert [a.name for a in highlight_msg.header.arrays] == ["jpeg", "mask"]  # type: ignore[union-attr]
    mask = highlight_msg.arrays[1]
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}


def test_infer_rejects_other_messages_and_reports_the_frames_it_lost() -> None:
    stage = inference_stage()
    frame = FrameHeader(camera_id="cam0", seq=1, capture_ns=0, shape=(2, 2), dtype="uint8")
    with pytest.raises(MessageError, match="expected 'features'"):
        stage.process("frames.cam0", frame, [np.zeros((2, 2), np.uint8)])
    message = features_message(dropped=2)
    header = message.header
    assert isinstance(header, FeaturesHeader)
    broken = header.model_copy(update={"arrays": header.arrays[:2]})
    with pytest.raises(MessageError, match="features arrays"):
        stage.process(message.topic, broken, message.arrays[:2])
    verdict = stage.process(message.topic, header.model_copy(update={"seq": header.seq + 1}), message.arrays)[0][1]
    assert verdict.dropped == (1 + 2) + 2  # type: ignore[union-attr]


def test_the_chain_finds_synthetic_defects_and_its_verdicts_match_the_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "schemas" / "verdict.v1.json").read_text())
    camera = synthetic_camera()
    soartc, infer = features_stage(camera), inference_stage()
    hits = fails = 0
    for message in frame_message(camera, frames=12, defect_rate=1.0):
        (features,) = through(soartc, message, "soartc")
        verdict = through(infer, features)[0].header
        assert isinstance(verdict, Verdict)
        jsonschema.validate(json.loads(verdict.model_dump_json()), schema)
        boxes = verdict.truth["boxes"] if verdict.truth else []
        if boxes and verdict.verdict == "fail":
            fails += 1
            hits += any(
                r.x1 <= b[2] + 8 and b[0] <= r.x2 + 8 and r.y1 <= b[3] + 8 and b[1] <= r.y2 + 8
                for r in verdict.regions
                for b in boxes
            )
    assert fails >= 9 and hits >= fails - 1


def test_the_verdict_goes_out_before_its_picture_is_drawn() -> None:
    stage = inference_stage()
    drawn: list[str] = []
    real = stage._picture

    def picture(*args: Any) -> Any:
        drawn.append("picture")
        return real(*args)

    stage._picture = picture  # type: ignore[method-assign]
    outputs = stage.process(*features_message())
    assert drawn == [] and isinstance(outputs[0][1], Verdict)  # the verdict is ready, no JPEG yet
    assert isinstance(outputs[1][1], Highlight) and drawn == ["picture"]
    assert outputs[1] is outputs[1] and drawn == ["picture"]  # drawn once


def test_the_picture_and_the_mask_are_in_the_verdicts_captured_frame_pixels() -> None:
    message = features_message()
    header = message.header
    assert isinstance(header, FeaturesHeader)

    def registered(dx: float, dy: float) -> Message:
        update = {"registration": header.registration.model_copy(update={"dx": dx, "dy": dy})}
        return Message(message.topic, header.model_copy(update=update), message.arrays)

    verdict_msg, highlight_msg = through(inference_stage(send_mask=True), registered(6.2, -4.0))
    _, plain_msg = through(inference_stage(send_mask=True), registered(0.0, 0.0))
    verdict, mask, plain = verdict_msg.header, highlight_msg.arrays[1], plain_msg.arrays[1]
    assert isinstance(verdict, Verdict) and verdict.regions and plain.any()
    np.testing.assert_array_equal(mask[: SIZE - 4, 6:], plain[4:, : SIZE - 6])  # moved by (+6, -4) like the regions
    ys, xs = np.nonzero(mask)
    inside = np.zeros(mask.shape, bool)
    for r in verdict.regions:
        inside[r.y1 : r.y2 + 1, r.x1 : r.x2 + 1] = True
    assert inside[ys, xs].all()  # every highlighted pixel lies in one of the verdict's regions


# -- fail safe and hostile input at the infer stage -----------------------------------------------------------
def with_arrays(message: Message, **arrays: np.ndarray) -> Message:
    """``message`` (features) with some payloads replaced by ``arrays`` (by name), the header to match."""
    header = message.header
    assert isinstance(header, FeaturesHeader)
    named = dict(zip(FEATURES_ARRAYS, message.arrays, strict=True)) | arrays
    specs = tuple(
        ArraySpec.model_validate({"name": n, "shape": a.shape, "dtype": str(a.dtype)}) for n, a in named.items()
    )
    return Message(message.topic, header.model_copy(update={"arrays": specs}), list(named.values()))


class NanModel(FakeModel):
    def run(self, windows_nggc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, attention = super().run(windows_nggc)
        return np.full_like(probs, np.nan), attention


class BrokenModel(FakeModel):
    def run(self, windows_nggc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise ModelError("model run: expected outputs for 9 windows, found Fail: CUDA error")


def nan_tokens(message: Message, fraction: float) -> np.ndarray:
    tokens = np.array(message.arrays[1], np.float32)
    flat = tokens.reshape(-1)
    flat[: max(1, int(flat.size * fraction))] = np.nan if fraction == 1.0 else np.inf
    return tokens


@pytest.mark.parametrize(
    ("case", "subject"),
    [
        ("tokens all NaN", "features"),
        ("one token infinite", "features"),
        ("model outputs NaN", "model output"),
        ("the model run fails", "model run"),
        ("registration shift past max_shift_px", "registration"),
    ],
)
def test_what_the_model_cannot_score_is_a_fail_with_a_reason_never_a_pass(case: str, subject: str) -> None:
    message = features_message(defect_rate=0.0)  # a clean board: the model would pass it
    assert through(inference_stage(), message)[0].header.verdict == "pass"  # type: ignore[union-attr]
    models = {"model outputs NaN": NanModel, "the model run fails": BrokenModel}
    model = models.get(case, FakeModel)()
    stage = InferenceStage(model, InferenceSettings(), HighlightSettings(), max_shift_px=16.0)  # type: ignore[arg-type]
    if case.startswith("tokens") or case.startswith("one token"):
        message = with_arrays(message, tokens=nan_tokens(message, 1.0 if "NaN" in case else 0.0))
    elif case.startswith("registration"):
        header = message.header
        assert isinstance(header, FeaturesHeader)
        moved = header.registration.model_copy(update={"dx": 40.0})
        message = Message(message.topic, header.model_copy(update={"registration": moved}), message.arrays)
    verdict_msg, highlight_msg = through(stage, message)  # encoded and decoded: valid on the wire
    verdict = verdict_msg.header
    assert isinstance(verdict, Verdict)
    assert (verdict.verdict, verdict.score, verdict.regions) == ("fail", 1.0, ())
    assert verdict.reason is not None and verdict.reason.startswith(f"{subject}: expected")
    assert stage.unscored == {subject: 1}
    assert cv2.imdecode(np.asarray(highlight_msg.arrays[0]), cv2.IMREAD_COLOR).shape == (SIZE, SIZE, 3)
    json_schema = json.loads((REPO / "schemas" / "verdict.v1.json").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(verdict.model_dump_json()), json_schema)


def test_features_that_do_not_fit_their_frame_are_refused_before_the_model() -> None:
    message = features_message()
    stage = inference_stage()
    cases = {
        "a 0x0 aligned frame": with_arrays(message, aligned=np.zeros((0, 0), np.uint8)),
        "a 1-D aligned frame": with_arrays(message, aligned=np.zeros(SIZE * SIZE, np.uint8)),
        "a token grid too small": with_arrays(message, tokens=np.zeros((2, 2, len(CHANNEL_NAMES)), np.float32)),
        "a token grid too large": with_arrays(message, tokens=np.zeros((160, 16, len(CHANNEL_NAMES)), np.float32)),
        "float64 tokens": with_arrays(message, tokens=np.asarray(message.arrays[1], np.float64)),
        "masks of another size": with_arrays(message, diff=np.zeros((SIZE, SIZE - 1), np.uint8)),
    }
    for case, bad in cases.items():
        with pytest.raises(InputError, match="expected") as info:
            stage.process(*bad)
        assert "found" in str(info.value), case
    assert through(stage, message)[0].header.dropped == len(cases)  # type: ignore[union-attr]


def test_features_of_another_size_than_the_cameras_configured_one_are_refused() -> None:
    message = features_message()
    header = message.header
    assert isinstance(header, FeaturesHeader)
    sized = {"cam0": (SIZE, SIZE)}
    stage = InferenceStage(FakeModel(), InferenceSettings(), HighlightSettings(), frame_shapes=sized)  # type: ignore[arg-type]
    assert through(stage, message)[0].header.reason is None  # type: ignore[union-attr]
    small = SIZE // 2
    resized = with_arrays(
        message,
        aligned=np.zeros((small, small), np.uint8),
        tokens=np.zeros((small // 16, small // 16, len(CHANNEL_NAMES)), np.float32),
        open_diff=np.zeros((small, small), np.uint8),
        diff=np.zeros((small, small), np.uint8),
    )
    resized = Message(resized.topic, resized.header.model_copy(update={"shape": (small, small)}), resized.arrays)
    assert through(inference_stage(), resized)[0].header.reason is None  # type: ignore[union-attr]
    with pytest.raises(InputError, match=r"expected \(256, 256\) as configured, found \(128, 128\)"):
        stage.process(*resized)


# -- a running infer stage on real loopback sockets, under the crashers -----------------------------------
def raw_features(message: Message, text: bytes | None = None, **changes: Any) -> list[bytes]:
    """The wire parts of a features ``message``, its header JSON with top-level ``changes`` (or ``text``)."""
    parts = [bytes(p) for p in encode(message.topic, message.header, message.arrays)]
    parts[1] = text if text is not None else json.dumps(json.loads(parts[1]) | changes).encode()
    return parts


def test_a_running_infer_stage_counts_every_crasher_and_keeps_serving_real_frames() -> None:
    from stream_service.wire.transport import FrameReceiver, FrameSender, open_socket

    good = features_message(defect_rate=0.0)
    header_json = json.loads(bytes(encode(good.topic, good.header, good.arrays)[1]))
    receiver = FrameReceiver(
        "tcp://127.0.0.1:*", bind=True, hwm=64, linger_ms=0, max_message_bytes=1 << 20, cameras={"cam0"}
    )
    publisher = FrameSender("tcp://127.0.0.1:*", kind="pub", bind=True, hwm=100, linger_ms=0)
    subscriber = FrameReceiver(publisher.endpoint, kind="sub", topics=["verdicts."], hwm=100, linger_ms=0)
    peer = open_socket("push", receiver.endpoint, bind=False, hwm=64, linger_ms=0)
    stage = InferenceStage(FakeModel(), InferenceSettings(), HighlightSettings(), max_shift_px=16.0)  # type: ignore[arg-type]
    stop, stats = threading.Event(), StageStats()
    thread = threading.Thread(
        target=run_stage, args=(stage, receiver, publisher, stop), kwargs={"stats": stats}, daemon=True
    )
    thread.start()

    def verdicts_until(seq: int) -> list[Verdict]:
        got: list[Verdict] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            message = subscriber.receive(0.2)
            if message is not None and isinstance(message.header, Verdict):
                got.append(message.header)
                if message.header.seq == seq:
                    return got
            if seq < 0:  # warming up: keep feeding good frames until the subscription is live
                peer.send_multipart(raw_features(good, seq=0))
                if got:
                    return got
        raise AssertionError(f"no verdict {seq}; got {[v.seq for v in got]}")

    try:
        verdicts_until(-1)
        received_before = stats.received  # warm-up frames may still be queued
        header_json["seq"], header_json["registration"]["dx"] = 0, 0.0
        with_seq = json.dumps(header_json, separators=(",", ":")).encode()
        crashers = [
            raw_features(good, b"[" * 100_000),
            raw_features(good, with_seq.replace(b'"seq":0', b'"seq":' + b"9" * 5000)),
            raw_features(good, with_seq.replace(b'"dx":0.0', b'"dx":Infinity')),
            raw_features(good, shape=[SIZE]),  # a shape of one dimension
            raw_features(good, camera_id="cam9"),
            [bytes(p) for p in encode(*with_arrays(good, aligned=np.zeros((0, 0), np.uint8)))],
        ]
        assert b'"seq":0' in with_seq and b'"dx":0.0' in with_seq
        for parts in crashers:
            peer.send_multipart(parts)
        unscorable = with_arrays(good, tokens=np.full_like(np.asarray(good.arrays[1]), np.nan))
        peer.send_multipart(raw_features(unscorable, seq=100))
        peer.send_multipart(raw_features(good, seq=101))
        verdicts = {v.seq: v for v in verdicts_until(101)}
        assert thread.is_alive()
        assert (verdicts[100].verdict, verdicts[100].score) == ("fail", 1.0)
        assert verdicts[100].reason is not None and "finite token values" in verdicts[100].reason
        assert verdicts[101].verdict == "pass" and verdicts[101].reason is None
        assert stats.rejected == {
            "header size": 1,
            "header json": 1,
            "header field 'registration'": 1,
            "header field 'shape'": 1,
            "camera_id": 1,
        }
        assert stats.errors == {"InputError": 1}  # the 0x0 aligned frame
        assert stats.received - received_before >= 3  # the 0x0 frame, the unscorable, the good one (and warm-up)
    finally:
        stop.set()
        thread.join(10)
        for closable in (peer, subscriber, receiver, publisher):
            closable.close()
