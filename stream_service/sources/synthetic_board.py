"""The synthetic PCB board: layout and rendering.

Pure: NumPy and OpenCV drawing, seeded NumPy generators, no clocks or files.

A board is a list of vector primitives (traces, pads, vias, pours, drill holes) in pixels at DeepPCB's
scale (about 48 px/mm), laid out at random without overlaps, rendered at ``SUPERSAMPLE`` x resolution and
area-averaged into a copper coverage map in [0, 1] on a canvas a little larger than the frame. The clean
image is the coverage thresholded at 0.5: copper 0 on white 255, binarised like DeepPCB. The defects of
``stream_service.sources.synthetic`` are drawn with the same primitives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from stream_service.errors import ConfigError
from stream_service.vision.arrays import F32, F64, U8

SUPERSAMPLE = 4
# Defects and their boxes stay this far inside the frame, so a box never leaves it after a shift; a board
# is at least twice this plus a little on each side, so that defects have room.
INSET = 28
_TRACE_WIDTHS = (12.0, 14.0, 16.0, 20.0, 24.0, 28.0, 36.0)


@dataclass(frozen=True)
class Line:
    """A trace: polyline vertices ``(N, 2)`` (x, y) with round caps and joins, ``width`` pixels wide."""

    points: F64
    width: float


@dataclass(frozen=True)
class Disc:
    center: Point
    radius: float


@dataclass(frozen=True)
class Polygon:
    """A filled polygon, vertices ``(N, 2)`` (x, y)."""

    points: F64


Primitive = Line | Disc | Polygon
Point = tuple[float, float]
Op = tuple[Primitive, int]  # a primitive and the value drawn: 255 adds copper, 0 removes it


def draw(
    image: U8, primitive: Primitive, value: int, scale: float = 1, origin: Point = (0, 0), grow: float = 0
) -> None:
    """Draw ``primitive`` into ``image`` (in place) at ``scale`` pixels per unit with ``origin`` at pixel
    (0, 0), inflated by ``grow`` units on every side."""
    if isinstance(primitive, Disc):
        cx, cy = primitive.center
        center = (round((cx - origin[0]) * scale), round((cy - origin[1]) * scale))
        cv2.circle(image, center, max(1, round((primitive.radius + grow) * scale)), value, -1, cv2.LINE_8)
        return
    pts = np.round((primitive.points - np.asarray(origin)) * scale).astype(np.int32)
    if isinstance(primitive, Line):
        thickness = max(1, round((primitive.width + 2 * grow) * scale))
        cv2.polylines(image, [pts], False, value, thickness, cv2.LINE_8)
        return
    cv2.fillPoly(image, [pts], value, cv2.LINE_8)
    if grow > 0:
        cv2.polylines(image, [pts], True, value, max(1, round(2 * grow * scale)), cv2.LINE_8)


def _bounds(p: Primitive) -> tuple[float, float, float, float]:
    if isinstance(p, Disc):
        (cx, cy), r = p.center, p.radius
        return cx - r, cy - r, cx + r, cy + r
    pad = p.width / 2 if isinstance(p, Line) else 0.0
    lo, hi = p.points.min(axis=0) - pad, p.points.max(axis=0) + pad
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def roi(ops: list[Op], pad: float, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The pixel box ``(x0, y0, x1, y1)``, end-exclusive and clipped to ``shape``, around ``ops`` grown by ``pad``."""
    b = np.array([_bounds(p) for p, _ in ops])
    x0 = max(0, math.floor(b[:, 0].min() - pad))
    y0 = max(0, math.floor(b[:, 1].min() - pad))
    x1 = min(shape[1], math.ceil(b[:, 2].max() + pad) + 1)
    y1 = min(shape[0], math.ceil(b[:, 3].max() + pad) + 1)
    return x0, y0, x1, y1


def _offset_polyline(points: F64, distance: float) -> F64:
    """The polyline ``(N, 2)`` offset sideways by ``distance`` with mitred joins (parallel bus traces)."""
    u = np.diff(points, axis=0)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    normals = np.stack([-u[:, 1], u[:, 0]], axis=1)
    out = points.copy()
    out[0] += normals[0] * distance
    out[-1] += normals[-1] * distance
    for i in range(1, len(points) - 1):
        m = normals[i - 1] + normals[i]
        m /= np.linalg.norm(m)
        out[i] += m * distance / float(m @ normals[i])
    return out


def blob(
    center: F64, radius: float, rng: np.random.Generator, elongation: float = 1.0, roughness: float = 0.25
) -> Polygon:
    """An irregular, optionally elongated and rotated blob (spurious copper, pin-holes, bites)."""
    n = 14
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False) + rng.uniform(0, 2 * math.pi / n)
    r = radius * (1 + roughness * rng.uniform(-1, 1, n))
    local = np.stack([r * np.cos(t) * elongation, r * np.sin(t)], axis=1)
    a = rng.uniform(0, math.pi)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return Polygon(local @ rot.T + center)


def _octagon(x0: float, y0: float, w: float, h: float, chamfer: float) -> Polygon:
    """A ``w x h`` rectangle at (x0, y0) with its corners cut by ``chamfer`` (pads, pours)."""
    xs = np.array([chamfer, w - chamfer, w, w, w - chamfer, chamfer, 0, 0]) + x0
    ys = np.array([0, 0, chamfer, h - chamfer, h, h, h - chamfer, chamfer]) + y0
    return Polygon(np.stack([xs, ys], axis=1))


def _octilinear(a: F64, b: F64, rng: np.random.Generator) -> F64:
    """A path from ``a`` to ``b`` made of horizontal/vertical runs and one 45-degree run."""
    d = b - a
    k = min(abs(d[0]), abs(d[1]))
    diag = np.sign(d) * k
    straight = d - diag
    f = rng.uniform(0.2, 0.8)
    if rng.random() < 0.5:
        return np.array([a, a + straight * f, a + straight * f + diag, b])
    return np.array([a, a + diag, b])


class SyntheticBoard:
    """A random PCB-like board in DeepPCB's look, rendered from ``seed``.

    ``margin`` pixels of board extend beyond the ``width x height`` frame on every side, so that a
    shifted frame still shows board. ``image`` is the clean frame, uint8 ``(height, width)``.
    """

    def __init__(self, width: int = 640, height: int = 640, seed: int = 0, margin: int = 8) -> None:
        if width < 2 * INSET + 16 or height < 2 * INSET + 16:
            raise ConfigError(f"synthetic board: expected width and height >= {2 * INSET + 16}, found {width}x{height}")
        self.width, self.height, self.margin = width, height, margin
        self.canvas_shape = (height + 2 * margin, width + 2 * margin)
        self._rng = np.random.default_rng(seed)
        self.copper: list[Primitive] = []
        self.holes: list[Disc] = []
        self.traces: list[Line] = []
        self._occupied = np.zeros(self.canvas_shape, np.uint8)
        self._layout()
        s = SUPERSAMPLE
        self.hires = np.zeros((self.canvas_shape[0] * s, self.canvas_shape[1] * s), np.uint8)
        for p in self.copper:
            draw(self.hires, p, 255, s)
        for h in self.holes:
            draw(self.hires, h, 0, s)
        self.coverage: F32 = downsample(self.hires)
        m = margin
        self.image: U8 = np.where(self.coverage[m : m + height, m : m + width] > 0.5, 0, 255).astype(np.uint8)

    # -- layout -------------------------------------------------------------------------------------
    def _layout(self) -> None:
        rng = self._rng
        ch, cw = self.canvas_shape
        target = rng.uniform(0.22, 0.45) * ch * cw
        makers = (self._pour, self._big_pad, self._bus, self._net)
        weights = np.array([0.04, 0.03, 0.48, 0.45])
        for _ in range(int(rng.integers(0, 3))):
            self._try_add(*self._pour(), clearance=rng.uniform(10, 20))
        for _ in range(1200):
            if np.count_nonzero(self._occupied) >= target:
                break
            maker = makers[rng.choice(len(makers), p=weights)]
            self._try_add(*maker(), clearance=rng.uniform(9, 22))
        # A few lone vias, as on real boards; not as filler.
        for _ in range(int(rng.integers(0, 40))):
            self._try_add(*self._via(), clearance=rng.uniform(9, 22))

    def _try_add(self, copper: list[Primitive], holes: list[Disc], clearance: float) -> bool:
        ops = [(p, 255) for p in copper]
        x0, y0, x1, y1 = roi(ops, clearance + 2, self.canvas_shape)
        if x1 <= x0 or y1 <= y0:
            return False
        footprint = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for p in copper:
            draw(footprint, p, 255, origin=(x0, y0), grow=clearance)
        if np.any(footprint & self._occupied[y0:y1, x0:x1]):
            return False
        for p in copper:
            draw(self._occupied, p, 255)
        self.copper += copper
        self.holes += holes
        self.traces += [p for p in copper if isinstance(p, Line)]
        return True

    def _point(self, inset: float = 0.0) -> F64:
        ch, cw = self.canvas_shape
        return np.array([self._rng.uniform(inset, cw - inset), self._rng.uniform(inset, ch - inset)])

    def _pad(self, at: F64, trace_width: float, radius: float | None = None) -> tuple[list[Primitive], list[Disc]]:
        rng = self._rng
        r = radius if radius is not None else trace_width / 2 + rng.uniform(5, 16)
        c = (float(at[0]), float(at[1]))
        hole = [Disc(c, r * rng.uniform(0.3, 0.5))] if rng.random() < 0.7 else []
        if rng.random() < 0.6:
            return [Disc(c, r)], hole
        return [_octagon(c[0] - r, c[1] - r, 2 * r, 2 * r, r * rng.uniform(0.0, 0.35))], hole

    def _net(self) -> tuple[list[Primitive], list[Disc]]:
        rng = self._rng
        w = float(rng.choice(_TRACE_WIDTHS))
        a = self._point()
        b = a + rng.uniform(-260, 260, 2)
        path = _octilinear(a, b, rng)
        copper: list[Primitive] = [Line(path, w)]
        holes: list[Disc] = []
        for end in (a, b):
            if rng.random() < 0.8:
                c, h = self._pad(end, w)
                copper += c
                holes += h
        return copper, holes

    def _bus(self) -> tuple[list[Primitive], list[Disc]]:
        """2-6 parallel traces with a 45-degree jog, ending in pads or running off the board."""
        rng = self._rng
        w = float(rng.choice(_TRACE_WIDTHS))
        pitch = w + rng.uniform(10, 26)
        n = int(rng.integers(2, 7))
        d0 = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])[rng.integers(4)]
        side = np.array([-d0[1], d0[0]]) * rng.choice([-1.0, 1.0])
        start = self._point() - d0 * rng.uniform(0, 300)
        p1 = start + d0 * rng.uniform(60, 300)
        p2 = p1 + (d0 + side) * rng.uniform(20, 120)
        end_dir = d0 if rng.random() < 0.6 else side
        path = np.array([start, p1, p2, p2 + end_dir * rng.uniform(60, 300)])
        copper: list[Primitive] = []
        holes: list[Disc] = []
        pad_r = min(w / 2 + rng.uniform(4, 14), pitch - w / 2 - 10)
        pads = rng.random() < 0.6
        for i in range(n):
            line = _offset_polyline(path, (i - (n - 1) / 2) * pitch)
            if pads:
                # Stagger the pads so that neighbours never touch.
                line[-1] += end_dir * (i % 2) * (2 * pad_r + 12)
            copper.append(Line(line, w))
            if pads:
                c, h = self._pad(line[-1], w, pad_r)
                copper += c
                holes += h
        return copper, holes

    def _pour(self) -> tuple[list[Primitive], list[Disc]]:
        rng = self._rng
        x0, y0 = self._point(-60)
        pw, ph = rng.uniform(100, 340, 2)
        holes = [
            Disc((x0 + rng.uniform(20, pw - 20), y0 + rng.uniform(20, ph - 20)), rng.uniform(6, 14))
            for _ in range(int(rng.integers(0, 5)))
        ]
        return [_octagon(x0, y0, pw, ph, rng.uniform(0, min(pw, ph) / 3))], holes

    def _big_pad(self) -> tuple[list[Primitive], list[Disc]]:
        return self._pad(self._point(), 0.0, self._rng.uniform(30, 150))

    def _via(self) -> tuple[list[Primitive], list[Disc]]:
        rng = self._rng
        r = rng.uniform(11, 20)
        c = self._point()
        center = (float(c[0]), float(c[1]))
        return [Disc(center, r)], [Disc(center, r * rng.uniform(0.35, 0.5))]


def downsample(hires: U8) -> F32:
    """Area-average a ``SUPERSAMPLE`` x mask (0/255) into coverage in [0, 1], float32 ``(H, W)``."""
    h, w = hires.shape[0] // SUPERSAMPLE, hires.shape[1] // SUPERSAMPLE
    return (cv2.resize(hires, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0).astype(np.float32)
