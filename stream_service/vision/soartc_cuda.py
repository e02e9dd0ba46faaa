"""SOARTC on the GPU: one fused CuPy RawKernel, with device and pinned host buffers made once.

The only module that imports CuPy; ``stream_service.vision.soartc`` imports it lazily (``device="cuda"``),
so nothing else touches CUDA. Same definition and guards as the CPU kernel ``soartc._metrics_kernel``,
with float64 accumulation throughout (the CPU kernel sums the b terms of each block row in float32 first);
the two agree to a few float32 ulps, far inside SOARTC.md's 1e-5. Outside the [0, 1] input range one edge
differs: a pixel above about 1.8e19 overflows the CPU's float32 partial sums, which then reports the block
as non-finite, while this kernel computes it.
"""

from __future__ import annotations

import cupy
import numpy as np

from stream_service.errors import FrameShapeError, InputError
from stream_service.vision.arrays import F32
from stream_service.vision.soartc import (
    EPS_DARK,
    RHO_MAX,
    SOART2_EPS,
    TINY,
    VARIANT_CODES,
    Variant,
    _check_pair,
    grid_shape,
)

# 8 warps a CUDA block: enough resident warps to hide memory latency, few enough for any GPU.
THREADS = 256

# The block side and the constants come in as -D options, so the source is compiled once per block size
# (NVRTC, cached by CuPy) and the constants cannot drift from the CPU module's.
_SOURCE = r"""
constexpr int B = SOARTC_BLOCK;          // block side b, a compile-time constant so the loops unroll
// A group of G = min(B*B, 32) lanes handles one image block: one warp for b = 8 and 16, half a warp for
// b = 4 (two horizontally adjacent blocks share a warp, so each row read is one 32-byte sector).
// Groups never straddle warps, so every reduction is a warp shuffle: no shared memory, no __syncthreads.
constexpr int N = B * B;                 // pixels per image block
constexpr int G = N < 32 ? N : 32;       // lanes per image block
constexpr int P = N / G;                 // pixels per lane, kept in registers for the second pass

// Butterfly (xor) sum over the G lanes of a group. Every lane ends with the same bits (a + b == b + a
// exactly), so all lanes agree on the guards and on s without a broadcast.
__device__ __forceinline__ double group_sum(double v) {
#pragma unroll
    for (int m = G / 2; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}

extern "C" __global__ void soartc_metrics(
    const float* __restrict__ ref, const float* __restrict__ frame,
    const int width,        // W, the row pitch of both images, in pixels
    const int grid_w,       // w = W / B
    const int n_blocks,     // h * w
    const int variant,      // 0 v1.1, 1 v1, 2 soart2
    const double eps_dark, const double rho_max,
    float* __restrict__ beta_out, float* __restrict__ rho_out, float* __restrict__ y3_out)
{
    // 32-bit indices (the host checks the launch fits): 64-bit divisions would cost as much as the loads.
    const int tid = blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = tid % G;
    int blk = tid / G;
    const bool valid = blk < n_blocks;
    // Lanes past the last block redo the last one instead of returning: the shuffles name all 32 lanes.
    if (!valid) blk = n_blocks - 1;
    const int bi = blk / grid_w, bj = blk % grid_w;
    const long long origin = (long long)bi * B * width + bj * B;

    float x[P], y[P];
    double sxx = 0.0, syy = 0.0, sxy = 0.0, ax = 0.0, ay = 0.0;
#pragma unroll
    for (int k = 0; k < P; ++k) {
        const int p = lane + k * G;      // consecutive lanes read consecutive pixels of a row
        const long long i = origin + (long long)(p / B) * width + p % B;
        x[k] = ref[i];
        y[k] = frame[i];
        const double xd = x[k], yd = y[k];
        sxx += xd * xd;
        syy += yd * yd;
        sxy += xd * yd;
        ax += fabs(xd);
        ay += fabs(yd);
    }
    sxx = group_sum(sxx);
    syy = group_sum(syy);
    sxy = group_sum(sxy);
    ax = group_sum(ax);
    ay = group_sum(ay);

    // The closed form, in the CPU kernel's order of operations (so the float64 values match).
    const bool finite = isfinite(sxx) && isfinite(syy) && isfinite(sxy);
    double beta = 1.0, rho = 1.0, s = 1.0;
    if (!(sxx / N <= eps_dark)) {
        beta = sxy / sxx;
        const double sign = beta > 0.0 ? 1.0 : (beta < 0.0 ? -1.0 : 0.0);
        if (variant == 0) {
            rho = fabs(sxy) <= SOARTC_TINY ? rho_max : fmax(sqrt(sxx * syy) / fabs(sxy), 1.0);
            s = sign * sqrt(syy / sxx);
        } else if (variant == 1) {
            const double vol = fabs(beta) * ax;
            rho = vol > SOARTC_TINY ? ay / vol : rho_max;
            s = sign * ay / ax;
        } else {
            beta = 1.0;
            rho = (syy / N + SOARTC_SOART2_EPS) / (sxx / N + SOARTC_SOART2_EPS);
            s = rho;                     // the uncapped ratio, as on the CPU
        }
        rho = fmin(rho, rho_max);
    }

    // Second pass from registers: the block is read from memory once.
    double acc = 0.0;
#pragma unroll
    for (int k = 0; k < P; ++k) acc += fabs((double)y[k] - s * (double)x[k]);
    acc = group_sum(acc);

    if (valid && lane == 0) {
        beta_out[blk] = finite ? (float)beta : 0.0f;
        rho_out[blk] = finite ? (float)rho : (float)rho_max;
        y3_out[blk] = finite ? (float)(acc / N) : 1.0f;
    }
}
"""


class CudaSoartc:
    """SOARTC bound to one reference on the current CUDA device.

    The reference is uploaded once; the frame buffer, the (3, h, w) outputs and a pinned host staging
    buffer are allocated once per frame shape, and all work runs on the object's own ``stream``.
    Not thread-safe: one object per stage.

    Args:
        reference_hw: (H, W) float32 in [0, 1], polarity applied.
        block: block side b in pixels (4, 8 or 16).
        variant: "v1.1", "v1" or "soart2".
    """

    def __init__(
        self,
        reference_hw: F32,
        block: int = 8,
        variant: Variant = "v1.1",
        *,
        eps_dark: float = EPS_DARK,
        rho_max: float = RHO_MAX,
    ) -> None:
        _check_pair(reference_hw, reference_hw, block, variant)
        self.block = block
        self.variant: Variant = variant
        self.eps_dark = eps_dark
        self.rho_max = rho_max
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._kernel = cupy.RawKernel(
            _SOURCE,
            "soartc_metrics",
            # No fused multiply-add: the CPU kernel (Numba without fastmath) rounds each product.
            options=(
                f"-DSOARTC_BLOCK={block}",
                f"-DSOARTC_TINY={TINY!r}",
                f"-DSOARTC_SOART2_EPS={SOART2_EPS!r}",
                "--fmad=false",
            ),
        )
        # Recorded after each upload from the pinned buffer, so the host never overwrites it mid-copy.
        self._uploaded = cupy.cuda.Event(disable_timing=True)
        self.shape: tuple[int, int] = (0, 0)
        self.grid: tuple[int, int] = (0, 0)
        self.set_reference(reference_hw)

    def _allocate(self, shape: tuple[int, int]) -> None:
        h, w = grid_shape(shape, self.block)
        threads = h * w * min(self.block * self.block, 32)
        if threads > 2**31 - 1 - THREADS:
            raise FrameShapeError(f"SOARTC CUDA frame: expected under 2**31 threads' worth of pixels, found {shape}")
        self.shape = shape
        self.grid = (h, w)
        self._launch = ((threads + THREADS - 1) // THREADS,), (THREADS,)
        self._ref_d = cupy.empty(shape, np.float32)
        self._frame_d = cupy.empty(shape, np.float32)
        self._out_d = cupy.empty((3, h, w), np.float32)
        # Page-locked host memory is what lets the copies run asynchronously, at full bus speed.
        self._frame_h = _pinned(shape)
        self._out_h = _pinned((3, h, w))

    def set_reference(self, reference_hw: F32) -> None:
        """Swap the reference; buffers are reused when the shape matches and remade otherwise."""
        _check_pair(reference_hw, reference_hw, self.block, self.variant)
        shape = (reference_hw.shape[0], reference_hw.shape[1])
        if shape != self.shape:
            self.stream.synchronize()
            self._allocate(shape)
        self._upload(reference_hw, self._ref_d)
        self.stream.synchronize()

    def metrics_device(self, frame_hw: F32 | cupy.ndarray) -> tuple[cupy.ndarray, cupy.ndarray, cupy.ndarray]:
        """(beta, rho, y3) as CuPy (h, w) float32 arrays, computed asynchronously on ``self.stream``.

        ``frame_hw`` is an (H, W) float32 array on the host (uploaded through the pinned buffer) or on the
        device (used in place, after the caller's current stream). The results are views of the object's
        output buffer: synchronize ``self.stream`` before reading them elsewhere, and copy them before
        the next call overwrites them.
        """
        if frame_hw.shape != self.shape:
            raise FrameShapeError(f"SOARTC frame shape: expected the reference's {self.shape}, found {frame_hw.shape}")
        if frame_hw.dtype != np.float32:
            raise InputError(f"SOARTC frame: expected dtype float32 in [0, 1], found {frame_hw.dtype}")
        if isinstance(frame_hw, cupy.ndarray):
            self.stream.wait_event(cupy.cuda.get_current_stream().record())
            with self.stream:
                frame_d = cupy.ascontiguousarray(frame_hw)
        else:
            self._upload(frame_hw, self._frame_d)
            frame_d = self._frame_d
        h, w = self.grid
        beta, rho, y3 = self._out_d
        args = (
            self._ref_d,
            frame_d,
            np.int32(self.shape[1]),
            np.int32(w),
            np.int32(h * w),
            np.int32(VARIANT_CODES[self.variant]),
            np.float64(self.eps_dark),
            np.float64(self.rho_max),
            beta,
            rho,
            y3,
        )
        with self.stream:
            self._kernel(*self._launch, args)
        return beta, rho, y3

    def metrics(self, frame_hw: F32) -> tuple[F32, F32, F32]:
        """(beta, rho, y3) of a registered (H, W) float32 frame, each (h, w) float32 on the host."""
        self.metrics_device(frame_hw)
        self._out_d.get(stream=self.stream, out=self._out_h)
        self.stream.synchronize()
        # A copy: the pinned buffer is overwritten by the next frame.
        out = self._out_h.copy()
        return out[0], out[1], out[2]

    def host_frame(self) -> F32:
        """The pinned (H, W) float32 staging buffer, free to write once this returns.

        A frame written here (decoded or received in place) and passed to ``metrics`` or
        ``metrics_device`` is uploaded without the extra host copy.
        """
        self._uploaded.synchronize()
        return self._frame_h

    def _upload(self, image_hw: F32, dest: cupy.ndarray) -> None:
        self._uploaded.synchronize()
        if image_hw is not self._frame_h:
            np.copyto(self._frame_h, image_hw)
        dest.set(self._frame_h, stream=self.stream)
        self._uploaded.record(self.stream)


def _pinned(shape: tuple[int, ...]) -> F32:
    """An uninitialised float32 host array in page-locked memory (what ``cupyx.empty_pinned`` does)."""
    count = int(np.prod(shape))
    memory = cupy.cuda.alloc_pinned_memory(count * np.dtype(np.float32).itemsize)
    return np.ndarray(shape, np.float32, buffer=memory)
