"""The CUDA SOARTC kernel against the CPU kernel, and SoartcKernel's device selection.

GPU tests are marked ``gpu`` and skipped without CuPy and a CUDA device; the device-selection tests
for a machine without CUDA run everywhere else.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_service.errors import DeviceError, FrameShapeError, InputError
from stream_service.vision.soartc import (
    BLOCK_SIZES,
    EPS_DARK,
    RHO_MAX,
    VARIANTS,
    SoartcKernel,
    Variant,
    cuda_available,
    resolve_device,
    soartc_metrics,
)

HAS_CUDA = cuda_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CuPy and a CUDA GPU")
F32 = np.ndarray


@pytest.fixture(scope="module")
def cuda() -> ModuleType:
    pytest.importorskip("cupy")
    return pytest.importorskip("stream_service.vision.soartc_cuda")


def make_pair(rng: np.random.Generator, shape: tuple[int, int], block: int) -> tuple[F32, F32]:
    """A random reference and a noisy frame of it, with planted guard cases in the first block row.

    Planted blocks (where the grid is wide enough): a dark reference under a bright frame, a constant
    reference and frame, a black frame over a bright reference (|Sxy| = 0), a scaled copy, an
    identical block. Dark values stay far from the eps_dark threshold so that the summation order
    cannot flip the guard.
    """
    ref = rng.random(shape, dtype=np.float32)
    frame = np.clip(ref + rng.normal(0.0, 0.1, shape), 0.0, 1.0).astype(np.float32)
    planted = [
        (np.float32(0.003), rng.random((block, block), dtype=np.float32)),
        (np.float32(0.5), np.float32(0.25)),
        (None, np.float32(0.0)),
        (None, "scaled"),
        (None, "identical"),
    ]
    for k, (x, y) in enumerate(planted[: shape[1] // block]):
        cols = slice(k * block, (k + 1) * block)
        if x is not None:
            ref[:block, cols] = x
        if isinstance(y, str):
            frame[:block, cols] = ref[:block, cols] * (np.float32(0.7) if y == "scaled" else np.float32(1.0))
        else:
            frame[:block, cols] = y
    return ref, frame


def assert_matches_cpu(got: tuple[F32, F32, F32], ref: F32, frame: F32, block: int, variant: Variant) -> None:
    want = soartc_metrics(ref, frame, block, variant)
    for name, g, w in zip(("beta", "rho", "y3"), got, want, strict=True):
        assert isinstance(g, np.ndarray), name
        assert g.dtype == np.float32, name
        assert g.shape == w.shape, name
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"{name} b={block} {variant}")


@pytest.mark.gpu
@needs_cuda
class TestCudaSoartc:
    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("block", BLOCK_SIZES)
    def test_random_sizes_match_cpu(self, cuda: ModuleType, block: int, variant: Variant) -> None:
        rng = np.random.default_rng(1000 * block + VARIANTS.index(variant))
        for _ in range(4):
            # Sizes that are not multiples of the block test the crop; 1 x 1 grids the idle lanes.
            shape = (int(rng.integers(block, 12 * block)), int(rng.integers(block, 20 * block)))
            ref, frame = make_pair(rng, shape, block)
            kernel = cuda.CudaSoartc(ref, block, variant)
            assert_matches_cpu(kernel.metrics(frame), ref, frame, block, variant)

    @pytest.mark.parametrize("block", BLOCK_SIZES)
    def test_guard_values(self, cuda: ModuleType, block: int) -> None:
        rng = np.random.default_rng(block)
        ref, frame = make_pair(rng, (block, 5 * block), block)
        beta, rho, y3 = cuda.CudaSoartc(ref, block, "v1.1").metrics(frame)
        dark_diff = np.abs(frame[:, :block] - ref[:, :block]).mean(dtype=np.float64)
        np.testing.assert_allclose([beta[0, 0], rho[0, 0], y3[0, 0]], [1.0, 1.0, dark_diff], rtol=1e-5)
        np.testing.assert_allclose([beta[0, 1], rho[0, 1], y3[0, 1]], [0.5, 1.0, 0.0], atol=1e-6)
        assert rho[0, 2] == np.float32(RHO_MAX)
        np.testing.assert_allclose([beta[0, 3], rho[0, 3], y3[0, 3]], [0.7, 1.0, 0.0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([beta[0, 4], rho[0, 4], y3[0, 4]], [1.0, 1.0, 0.0], rtol=1e-6, atol=1e-7)

    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    @pytest.mark.parametrize("where", ["frame", "reference"])
    def test_non_finite_pixel_gives_max_difference(
        self, cuda: ModuleType, variant: Variant, bad: float, where: str
    ) -> None:
        rng = np.random.default_rng(7)
        ref, frame = make_pair(rng, (24, 40), 8)
        (frame if where == "frame" else ref)[13, 21] = bad
        got = cuda.CudaSoartc(ref, 8, variant).metrics(frame)
        assert [float(a[1, 2]) for a in got] == [0.0, np.float32(RHO_MAX), 1.0]
        assert_matches_cpu(got, ref, frame, 8, variant)

    def test_reuse_across_frames_and_references(self, cuda: ModuleType) -> None:
        rng = np.random.default_rng(3)
        ref, _ = make_pair(rng, (96, 136), 8)
        kernel = cuda.CudaSoartc(ref, 8, "v1.1")
        first_frame = np.clip(ref + rng.normal(0.0, 0.2, ref.shape), 0.0, 1.0).astype(np.float32)
        first = kernel.metrics(first_frame)
        kept = [a.copy() for a in first]
        for _ in range(5):
            frame = np.clip(ref + rng.normal(0.0, 0.2, ref.shape), 0.0, 1.0).astype(np.float32)
            assert_matches_cpu(kernel.metrics(frame), ref, frame, 8, "v1.1")
        for a, b in zip(first, kept, strict=True):
            np.testing.assert_array_equal(a, b)  # results are the caller's, not views of a reused buffer

        new_ref, frame = make_pair(rng, ref.shape, 8)
        kernel.set_reference(new_ref)
        assert_matches_cpu(kernel.metrics(frame), new_ref, frame, 8, "v1.1")
        other_ref, other_frame = make_pair(rng, (40, 56), 8)
        kernel.set_reference(other_ref)
        assert kernel.grid == (5, 7)
        assert_matches_cpu(kernel.metrics(other_frame), other_ref, other_frame, 8, "v1.1")

    def test_metrics_device_stays_on_the_gpu(self, cuda: ModuleType) -> None:
        import cupy

        rng = np.random.default_rng(4)
        ref, frame = make_pair(rng, (64, 80), 16)
        kernel = cuda.CudaSoartc(ref, 16, "v1")
        from_host = kernel.metrics(frame)
        frame_d = cupy.asarray(frame)
        out_d = kernel.metrics_device(frame_d)
        assert all(isinstance(a, cupy.ndarray) for a in out_d)
        kernel.stream.synchronize()
        for d, h in zip(out_d, from_host, strict=True):
            np.testing.assert_array_equal(cupy.asnumpy(d), h)
        # A strided device view is made contiguous, not read with the wrong pitch.
        wide_d = cupy.asarray(np.concatenate([frame, frame], axis=1))[:, : frame.shape[1]]
        out_d = kernel.metrics_device(wide_d)
        kernel.stream.synchronize()
        for d, h in zip(out_d, from_host, strict=True):
            np.testing.assert_array_equal(cupy.asnumpy(d), h)

    def test_frame_written_into_the_pinned_buffer(self, cuda: ModuleType) -> None:
        rng = np.random.default_rng(6)
        ref, frame = make_pair(rng, (48, 64), 4)
        kernel = cuda.CudaSoartc(ref, 4, "soart2")
        staging = kernel.host_frame()
        assert staging.shape == frame.shape and staging.dtype == np.float32
        staging[...] = frame
        assert_matches_cpu(kernel.metrics(staging), ref, frame, 4, "soart2")

    @pytest.mark.parametrize(
        ("frame", "error"),
        [
            (np.zeros((32, 40), np.float32), FrameShapeError),
            (np.zeros((32, 48), np.float64), InputError),
            (np.zeros((32, 48), np.uint8), InputError),
        ],
    )
    def test_rejects_bad_frames(self, cuda: ModuleType, frame: F32, error: type[Exception]) -> None:
        kernel = cuda.CudaSoartc(np.ones((32, 48), np.float32), 8)
        with pytest.raises(error):
            kernel.metrics(frame)

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_soartc_kernel_on_cuda_end_to_end(self, variant: Variant) -> None:
        rng = np.random.default_rng(5)
        ref, frame = make_pair(rng, (120, 200), 8)
        gpu = SoartcKernel(ref, 8, variant, device="cuda")
        cpu = SoartcKernel(ref, 8, variant, device="cpu")
        assert gpu.device == "cuda"
        assert_matches_cpu(gpu.metrics(frame), ref, frame, 8, variant)
        np.testing.assert_allclose(gpu.deviations(frame), cpu.deviations(frame), rtol=1e-5, atol=1e-5)
        with pytest.raises(FrameShapeError):
            gpu.metrics(frame[:, :-8])

    def test_auto_resolves_to_cuda(self) -> None:
        assert resolve_device("auto") == "cuda"

    @settings(max_examples=30, deadline=None)
    @given(
        block=st.sampled_from(BLOCK_SIZES),
        variant=st.sampled_from(VARIANTS),
        rows=st.integers(1, 9),
        cols=st.integers(1, 9),
        extra=st.integers(0, 3),
        seed=st.integers(0, 2**32 - 1),
        scale=st.sampled_from([1.0, 0.05, 0.001]),
    )
    def test_property_matches_cpu(
        self,
        cuda: ModuleType,
        block: int,
        variant: Variant,
        rows: int,
        cols: int,
        extra: int,
        seed: int,
        scale: float,
    ) -> None:
        rng = np.random.default_rng(seed)
        shape = (rows * block + extra, cols * block + extra)
        # scale 0.001 makes most blocks dark (mean x^2 ~ 3e-7 << eps_dark), 0.05 leaves them lit.
        ref = (rng.random(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)
        frame = rng.random(shape, dtype=np.float32)
        got = cuda.CudaSoartc(ref, block, variant, eps_dark=EPS_DARK).metrics(frame)
        assert_matches_cpu(got, ref, frame, block, variant)


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without CUDA")
def test_cuda_device_without_cuda_raises() -> None:
    with pytest.raises(DeviceError, match="cuda"):
        SoartcKernel(np.ones((16, 16), np.float32), 8, device="cuda")


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without CUDA")
def test_auto_device_resolves_to_cpu_without_cuda() -> None:
    assert resolve_device("auto") == "cpu"
    assert SoartcKernel(np.ones((16, 16), np.float32), 8, device="auto").device == "cpu"


@needs_cuda
def test_the_soartc_stage_judges_frames_on_the_gpu_as_on_the_cpu(cuda: ModuleType) -> None:
    """What the pipeline runs with ``soartc.device: cuda``: registration, GPU token features, the model."""
    from stream_service.model.card import resolve_model_dir
    from stream_service.model.session import InspectionModel
    from stream_service.settings import load_settings
    from stream_service.sources.synthetic import SyntheticCamera
    from stream_service.vision.inspection import Detector, FeatureExtractor
    from stream_service.vision.tokens import FeatureSpec

    model_dir = resolve_model_dir(load_settings(None).inference.model)
    if not (model_dir / "model.onnx").is_file():
        pytest.skip(f"the bundled model is missing ({model_dir})")
    model = InspectionModel.load(model_dir, "cpu", threads=1)
    spec: FeatureSpec = model.card.features.to_spec()
    camera = SyntheticCamera(640, 640, seed=5, defect_rate=0.7)
    on_gpu = FeatureExtractor(camera.reference(), spec, True, device="cuda")
    on_cpu = FeatureExtractor(camera.reference(), spec, True, device="cpu")
    assert all(k.device == "cuda" for k in on_gpu.kernels) and all(k.device == "cpu" for k in on_cpu.kernels)
    detector = Detector(model)
    for _ in range(6):
        frame, truth = camera.next_frame()
        gpu, cpu = on_gpu.extract(frame), on_cpu.extract(frame)
        np.testing.assert_array_equal(gpu.aligned_hw, cpu.aligned_hw)
        np.testing.assert_allclose(gpu.features.tokens_hwc, cpu.features.tokens_hwc, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(gpu.features.open_diff_hw, cpu.features.open_diff_hw)
        judged_gpu, judged_cpu = detector.detect(gpu.features), detector.detect(cpu.features)
        assert judged_gpu.verdict == judged_cpu.verdict, truth
        assert judged_gpu.score == pytest.approx(judged_cpu.score, abs=1e-4)
