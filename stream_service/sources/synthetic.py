"""The synthetic PCB camera: DeepPCB-like boards with the six DeepPCB defect kinds.

Pure: NumPy and OpenCV drawing, seeded NumPy generators, no clocks or files.

The board (``stream_service.sources.synthetic_board``) is a copper coverage map in [0, 1] on a canvas a little
larger than the frame; the reference is its clean image. A frame is the same coverage with defects drawn
into it, translated by a random sub-pixel shift, thresholded against a slowly varying threshold field (the
edge jitter of a real scan and binarisation: a threshold offset of t moves a straight edge by t pixels),
then given a drifting gain and offset and Gaussian noise.

Defect kinds follow DeepPCB's annotation codes: 1 open, 2 short, 3 mousebite, 4 spur,
5 spurious copper, 6 pin-hole. Boxes are inclusive pixel corners ``[x1, y1, x2, y2, kind]`` in the frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, TypedDict

import cv2
import numpy as np
import numpy.typing as npt

from stream_service.errors import ConfigError
from stream_service.sources.synthetic_board import (
    INSET,
    SUPERSAMPLE,
    Line,
    Op,
    Polygon,
    SyntheticBoard,
    blob,
    downsample,
    draw,
    roi,
)
from stream_service.vision.arrays import F32, F64, U8

__all__ = [
    "DEFECT_KINDS",
    "MOUSEBITE",
    "OPEN",
    "PIN_HOLE",
    "SHORT",
    "SPUR",
    "SPURIOUS_COPPER",
    "SyntheticBoard",
    "SyntheticCamera",
    "Truth",
]

OPEN, SHORT, MOUSEBITE, SPUR, SPURIOUS_COPPER, PIN_HOLE = 1, 2, 3, 4, 5, 6
DEFECT_KINDS = (OPEN, SHORT, MOUSEBITE, SPUR, SPURIOUS_COPPER, PIN_HOLE)
# A defect must flip at least this many frame pixels to be annotated (DeepPCB boxes hold ~11% changes).
_MIN_CHANGED = 12


class Truth(TypedDict):
    """Ground truth of one frame, in the inspection-manifest format."""

    label: Literal["pass", "fail"]
    boxes: list[list[int]]


class _BoardMaps:
    """What the defect proposers need to know about a clean board, computed once (canvas pixels)."""

    def __init__(self, board: SyntheticBoard) -> None:
        copper = (board.coverage > 0.5).astype(np.uint8)
        self.copper = copper
        _, labels = cv2.connectedComponents(copper, connectivity=8)
        self.labels: npt.NDArray[np.int32] = labels.astype(np.int32)
        self.dist_in = cv2.distanceTransform(copper, cv2.DIST_L2, 5)
        self.dist_out = cv2.distanceTransform(1 - copper, cv2.DIST_L2, 5)
        smooth = cv2.GaussianBlur(board.coverage, (0, 0), 1.5)
        gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
        norm = np.hypot(gx, gy) + 1e-9
        # Outward normal of the copper: towards decreasing coverage.
        self.normal_x, self.normal_y = -gx / norm, -gy / norm
        inside = np.zeros_like(copper)
        lo = board.margin + INSET
        inside[lo : board.margin + board.height - INSET, lo : board.margin + board.width - INSET] = 1
        edge = (copper > 0) & (cv2.erode(copper, np.ones((3, 3), np.uint8)) == 0) & (inside > 0)
        self.edges = np.argwhere(edge)[:, ::-1].astype(np.float64)  # (N, 2) x, y
        self.bulk = np.argwhere((self.dist_in >= 6) & (inside > 0))[:, ::-1].astype(np.float64)
        self.free = np.argwhere((self.dist_out >= 12) & (inside > 0))[:, ::-1].astype(np.float64)
        lo_xy = np.array([lo, lo], np.float64)
        hi_xy = np.array([board.margin + board.width - INSET, board.margin + board.height - INSET], np.float64)
        self.inside_box = (lo_xy, hi_xy)
        self.segments = [
            (line, line.points[i], line.points[i + 1]) for line in board.traces for i in range(len(line.points) - 1)
        ]

    def is_copper(self, p: F64) -> bool:
        x, y = math.floor(p[0] + 0.5), math.floor(p[1] + 0.5)
        h, w = self.copper.shape
        return 0 <= x < w and 0 <= y < h and bool(self.copper[y, x])

    def label(self, p: F64) -> int:
        return int(self.labels[math.floor(p[1] + 0.5), math.floor(p[0] + 0.5)])

    def labels_under(self, ops: list[Op], grow: float) -> set[int]:
        """Component labels of the clean copper under the primitives inflated by ``grow``."""
        x0, y0, x1, y1 = roi(ops, grow + 2, self.copper.shape)
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for p, _ in ops:
            draw(mask, p, 1, origin=(x0, y0), grow=grow)
        return {int(v) for v in np.unique(self.labels[y0:y1, x0:x1][mask > 0])}

    def inside(self, p: F64) -> bool:
        lo, hi = self.inside_box
        return bool(np.all(p >= lo) and np.all(p < hi))


def _rotate(v: F64, degrees: float) -> F64:
    a = math.radians(degrees)
    return np.array([v[0] * math.cos(a) - v[1] * math.sin(a), v[0] * math.sin(a) + v[1] * math.cos(a)])


def _edge_point(maps: _BoardMaps, rng: np.random.Generator) -> tuple[F64, F64] | None:
    if len(maps.edges) == 0:
        return None
    p = maps.edges[rng.integers(len(maps.edges))]
    y, x = int(p[1]), int(p[0])
    return p, np.array([maps.normal_x[y, x], maps.normal_y[y, x]], np.float64)


def _open(maps: _BoardMaps, rng: np.random.Generator) -> list[Op] | None:
    """A gap cut across a trace, with ragged, slanted sides."""
    if not maps.segments:
        return None
    line, a, b = maps.segments[rng.integers(len(maps.segments))]
    length = float(np.linalg.norm(b - a))
    w = line.width
    if length < 2 * w + 12:
        return None
    u = (b - a) / length
    v = np.array([-u[1], u[0]])
    c = a + u * rng.uniform(w + 6, length - w - 6)
    if not maps.inside(c):
        return None
    gap, half, skew = rng.uniform(4, 12), w / 2 + 3, rng.uniform(-0.6, 0.6)
    corners = np.array(
        [
            c - v * half + u * (skew * gap - gap / 2),
            c - v * half + u * (skew * gap + gap / 2),
            c + v * half + u * (gap / 2 - skew * gap),
            c + v * half - u * (gap / 2 + skew * gap),
        ]
    )
    cut: list[Op] = [(Polygon(corners + rng.uniform(-1.5, 1.5, corners.shape)), 0)]
    # The cut may remove copper of this trace only: it must not bite a pad, a joint or a neighbour.
    x0, y0, x1, y1 = roi(cut, 3, maps.copper.shape)
    own = np.zeros((y1 - y0, x1 - x0), np.uint8)
    draw(own, Line(np.array([a, b]), w + 2), 1, origin=(x0, y0))
    region = np.zeros_like(own)
    draw(region, cut[0][0], 1, origin=(x0, y0), grow=2)
    stray = maps.copper[y0:y1, x0:x1] & region & (1 - own)
    return None if np.any(stray) else cut


def _short(maps: _BoardMaps, rng: np.random.Generator) -> list[Op] | None:
    """A copper bridge from a copper edge to the neighbouring copper of another net."""
    found = _edge_point(maps, rng)
    if found is None:
        return None
    p, n = found
    own = maps.label(p)
    for k in range(2, 34):
        q = p + n * k
        if maps.is_copper(q):
            if maps.label(q) == own or k < 5 or not maps.inside(q):
                return None
            t = np.array([-n[1], n[0]])
            mid = (p + q) / 2 + t * rng.uniform(-2, 2)
            bridge: list[Op] = [(Line(np.array([p - n * 2, mid, q + n * 2]), rng.uniform(3, 8)), 255)]
            return bridge if maps.labels_under(bridge, 3) <= {0, own, maps.label(q)} else None
    return None


def _mousebite(maps: _BoardMaps, rng: np.random.Generator) -> list[Op] | None:
    """One to three small bites out of a copper edge, never through the copper."""
    found = _edge_point(maps, rng)
    if found is None:
        return None
    p, n = found
    r = rng.uniform(3, 7)
    if not all(maps.is_copper(p - n * k) for k in np.arange(1, 2.6 * r + 2)):
        return None
    t = np.array([-n[1], n[0]])
    bites: list[Op] = [
        (blob(p - n * rng.uniform(0, 0.5 * r) + t * (i * 1.3 * r), r * rng.uniform(0.6, 1.0), rng, 1.3), 0)
        for i in range(int(rng.integers(1, 4)))
    ]
    return bites if maps.labels_under(bites, 1) <= {0, maps.label(p)} else None


def _spur(maps: _BoardMaps, rng: np.random.Generator) -> list[Op] | None:
    """A tapered copper protrusion from a copper edge into free space."""
    found = _edge_point(maps, rng)
    if found is None:
        return None
    p, n = found
    d = _rotate(n, rng.uniform(-30, 30))
    length, base, tip_width = rng.uniform(7, 18), rng.uniform(5, 12), rng.uniform(0.3, 0.7)
    if any(maps.is_copper(p + d * k) for k in np.arange(2, length + 8)):
        return None
    t = np.array([-d[1], d[0]])
    tip = p + d * length
    pts = np.array(
        [
            p - d * 2 - t * base / 2,
            tip - t * base * tip_width / 2,
            tip + t * base * tip_width / 2,
            p - d * 2 + t * base / 2,
        ]
    )
    spur: list[Op] = [(Polygon(pts + rng.uniform(-1, 1, pts.shape)), 255)]
    return spur if maps.labels_under(spur, 4) <= {0, maps.label(p)} else None


def _spurious_copper(maps: _BoardMaps, rng: np.random.Generator) -> list[Op] | None:
    """An isolated copper blob in free space."""
    if len(maps.free) == 0:
        return None
    c = maps.free[rng.integers(len(maps.free))]
    r, elongation = rng.uniform(3.5, 9), rng.uniform(1.0, 3.0)
    if maps.dist_out[int(c[1]), int(c[0])] < r * elongation * 1.3 + 6:
        return None
    return [(blob(c, r, rng, elongation), 255)]


def _pin_hole(maps: _BoardMaps, rng: np.random.Generator) -> list[Op] | None:
    """A small hole in copper."""
    if len(maps.bulk) == 0:
        return None
    c = maps.bulk[rng.integers(len(maps.bulk))]
    r, elongation = rng.uniform(3, 7), rng.uniform(1.0, 2.0)
    if maps.dist_in[int(c[1]), int(c[0])] < r * elongation * 1.3 + 2:
        return None
    return [(blob(c, r, rng, elongation), 0)]


_PROPOSERS: dict[int, Callable[[_BoardMaps, np.random.Generator], list[Op] | None]] = dict(
    zip(DEFECT_KINDS, (_open, _short, _mousebite, _spur, _spurious_copper, _pin_hole), strict=True)
)


class SyntheticCamera:
    """A camera looking at one synthetic board: defects at ``defect_rate``, edge jitter, shifts, lighting drift.

    ``defect_rate`` is the probability that a frame holds at least one defect (1 to ``max_defects``);
    ``shift_px`` the largest random sub-pixel translation per axis; ``jitter`` the edge jitter amplitude in
    pixels (threshold field standard deviation); ``lighting_drift`` the largest relative drift of the gain
    and offset (a slow random walk); ``noise`` the standard deviation of Gaussian noise in gray levels.
    """

    def __init__(
        self,
        width: int = 640,
        height: int = 640,
        seed: int = 0,
        defect_rate: float = 0.5,
        max_defects: int = 3,
        shift_px: float = 2.0,
        jitter: float = 0.3,
        lighting_drift: float = 0.05,
        noise: float = 2.0,
    ) -> None:
        checks = {
            "defect_rate": 0 <= defect_rate <= 1,
            "max_defects": max_defects >= 1,
            "shift_px": shift_px >= 0,
            "jitter": 0 <= jitter <= 1,
            "lighting_drift": 0 <= lighting_drift <= 0.5,
            "noise": noise >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"synthetic camera: {name} out of range, found {locals()[name]!r}")
        self.width, self.height = width, height
        self.defect_rate, self.max_defects = defect_rate, max_defects
        self.shift_px, self.jitter, self.lighting_drift, self.noise = shift_px, jitter, lighting_drift, noise
        self.board = SyntheticBoard(width, height, seed, margin=math.ceil(shift_px) + 2)
        self._maps = _BoardMaps(self.board)
        self._rng = np.random.default_rng([seed, 1])
        self._light = np.zeros(2)
        self.frame_index = -1
        self.last_shift: tuple[float, float] = (0.0, 0.0)
        self.last_truth: Truth = {"label": "pass", "boxes": []}

    def reference(self) -> U8:
        """The clean render: the board unshifted, without jitter, defects, drift or noise, uint8 ``(H, W)``."""
        return self.board.image.copy()

    def next_frame(self) -> tuple[U8, Truth]:
        """The next frame, uint8 ``(H, W)``, and its ground truth (boxes in frame pixels, inclusive)."""
        rng = self._rng
        self.frame_index += 1
        coverage = self.board.coverage
        placed: list[tuple[int, tuple[int, int, int, int]]] = []
        if rng.random() < self.defect_rate:
            coverage = coverage.copy()
            for _ in range(int(rng.integers(1, self.max_defects + 1))):
                found = self._place(coverage, [box for _, box in placed], rng)
                if found is not None:
                    placed.append(found)
        dx, dy = (float(v) for v in rng.uniform(-self.shift_px, self.shift_px, 2))
        m = self.board.margin
        # Board point (x, y) appears at frame (x - margin + dx, y - margin + dy).
        warp = np.array([[1, 0, dx - m], [0, 1, dy - m]], np.float32)
        shifted = cv2.warpAffine(
            coverage, warp, (self.width, self.height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        background = shifted <= self._threshold(rng)
        self._light = np.clip(self._light * 0.98 + rng.normal(0, 0.1, 2), -1, 1)
        gain = 1 - self.lighting_drift * (1 + self._light[0]) / 2
        offset = 255 * self.lighting_drift * (1 + self._light[1]) / 4
        image = background.astype(np.float32) * np.float32(255 * gain) + np.float32(offset)
        if self.noise > 0:
            image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(self.noise)
        frame = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        boxes = []
        for kind, (x0, y0, x1, y1) in placed:
            fx0, fy0 = max(0, math.floor(x0 - m + dx)), max(0, math.floor(y0 - m + dy))
            fx1, fy1 = min(self.width - 1, math.ceil(x1 - m + dx)), min(self.height - 1, math.ceil(y1 - m + dy))
            boxes.append([fx0, fy0, fx1, fy1, kind])
        self.last_shift = (dx, dy)
        self.last_truth = {"label": "fail" if boxes else "pass", "boxes": boxes}
        return frame, {"label": self.last_truth["label"], "boxes": [list(b) for b in boxes]}

    def _threshold(self, rng: np.random.Generator) -> F32:
        """Binarisation threshold per pixel: 0.5 plus a smooth field (runs of edge flips) plus speckle."""
        if self.jitter == 0:
            return np.full((self.height, self.width), 0.5, np.float32)
        coarse = rng.standard_normal((self.height // 12 + 2, self.width // 12 + 2), dtype=np.float32)
        smooth = np.asarray(cv2.resize(coarse, (self.width, self.height), interpolation=cv2.INTER_CUBIC), np.float32)
        smooth += rng.standard_normal((self.height, self.width), dtype=np.float32) * np.float32(0.35)
        return np.asarray(np.clip(smooth * np.float32(self.jitter) + np.float32(0.5), 0.02, 0.98), np.float32)

    def _place(
        self, coverage: F32, taken: list[tuple[int, int, int, int]], rng: np.random.Generator
    ) -> tuple[int, tuple[int, int, int, int]] | None:
        """Draw one visible defect into ``coverage`` (in place) away from ``taken`` boxes; its kind and
        canvas box (inclusive), or None when no place was found."""
        first = DEFECT_KINDS[rng.integers(len(DEFECT_KINDS))]
        s, clean = SUPERSAMPLE, self.board.coverage
        for attempt in range(80):
            kind = first if attempt < 40 else DEFECT_KINDS[rng.integers(len(DEFECT_KINDS))]
            ops = _PROPOSERS[kind](self._maps, rng)
            if ops is None:
                continue
            x0, y0, x1, y1 = roi(ops, 3, clean.shape)
            if any(x0 < bx1 + 12 and bx0 < x1 + 12 and y0 < by1 + 12 and by0 < y1 + 12 for bx0, by0, bx1, by1 in taken):
                continue
            patch = self.board.hires[y0 * s : y1 * s, x0 * s : x1 * s].copy()
            for primitive, value in ops:
                draw(patch, primitive, value, s, origin=(x0, y0))
            new = downsample(patch)
            ys, xs = np.nonzero((new > 0.5) != (clean[y0:y1, x0:x1] > 0.5))
            if len(xs) < _MIN_CHANGED:
                continue
            coverage[y0:y1, x0:x1] = new
            pad = int(rng.integers(6, 12))  # DeepPCB's boxes leave a margin around the defect
            x0, y0 = x0 - pad, y0 - pad
            return kind, (
                x0 + int(xs.min()),
                y0 + int(ys.min()),
                x0 + int(xs.max()) + 2 * pad,
                y0 + int(ys.max()) + 2 * pad,
            )
        return None
