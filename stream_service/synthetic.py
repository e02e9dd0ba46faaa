"""The synthetic PCB camera: DeepPCB-like boards with the six DeepPCB defect kinds.

Pure: NumPy and OpenCV drawing, seeded NumPy generators, no clocks or files.

A board is a list of vector primitives (traces, pads, vias, pours, drill holes) in pixels at DeepPCB's
scale (about 48 px/mm), rendered at ``SUPERSAMPLE`` x resolution and area-averaged into a copper
coverage map in [0, 1] on a canvas a little larger than the frame. The reference is the coverage
thresholded at 0.5: copper 0 on white 255, binarised like DeepPCB. A frame is the same coverage with
defects drawn into it, translated by a random sub-pixel shift, thresholded against a slowly varying
threshold field (the edge jitter of a real scan and binarisation: a threshold offset of t moves a
straight edge by t pixels), then given a drifting gain and offset and Gaussian noise.

Defect kinds follow DeepPCB's annotation codes: 1 open, 2 short, 3 mousebite, 4 spur,
5 spurious copper, 6 pin-hole. Boxes are inclusive pixel corners ``[x1, y1, x2, y2, kind]`` in the frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypedDict

import cv2
import numpy as np
import numpy.typing as npt

from stream_service.errors import ConfigError

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

SUPERSAMPLE = 4
OPEN, SHORT, MOUSEBITE, SPUR, SPURIOUS_COPPER, PIN_HOLE = 1, 2, 3, 4, 5, 6
DEFECT_KINDS = (OPEN, SHORT, MOUSEBITE, SPUR, SPURIOUS_COPPER, PIN_HOLE)
# Defects and their boxes stay this far inside the frame, so a box never leaves it after a shift.
_INSET = 28
# A defect must flip at least this many frame pixels to be annotated (DeepPCB boxes hold ~11% changes).
_MIN_CHANGED = 12
_TRACE_WIDTHS = (12.0, 14.0, 16.0, 20.0, 24.0, 28.0, 36.0)


class Truth(TypedDict):
    """Ground truth of one frame, in the inspection-manifest format."""

    label: Literal["pass", "fail"]
    boxes: list[list[int]]


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


def _blob(
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
        if width < 2 * _INSET + 16 or height < 2 * _INSET + 16:
            raise ConfigError(
                f"synthetic board: expected width and height >= {2 * _INSET + 16}, found {width}x{height}"
            )
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
        x0, y0, x1, y1 = _roi(ops, clearance + 2, self.canvas_shape)
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
        lo = board.margin + _INSET
        inside[lo : board.margin + board.height - _INSET, lo : board.margin + board.width - _INSET] = 1
        edge = (copper > 0) & (cv2.erode(copper, np.ones((3, 3), np.uint8)) == 0) & (inside > 0)
        self.edges = np.argwhere(edge)[:, ::-1].astype(np.float64)  # (N, 2) x, y
        self.bulk = np.argwhere((self.dist_in >= 6) & (inside > 0))[:, ::-1].astype(np.float64)
        self.free = np.argwhere((self.dist_out >= 12) & (inside > 0))[:, ::-1].astype(np.float64)
        lo_xy = np.array([lo, lo], np.float64)
        hi_xy = np.array([board.margin + board.width - _INSET, board.margin + board.height - _INSET], np.float64)
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
        x0, y0, x1, y1 = _roi(ops, grow + 2, self.copper.shape)
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for p, _ in ops:
            draw(mask, p, 1, origin=(x0, y0), grow=grow)
        return {int(v) for v in np.unique(self.labels[y0:y1, x0:x1][mask > 0])}

    def inside(self, p: F64) -> bool:
        lo, hi = self.inside_box
        return bool(np.all(p >= lo) and np.all(p < hi))


def _bounds(p: Primitive) -> tuple[float, float, float, float]:
    if isinstance(p, Disc):
        (cx, cy), r = p.center, p.radius
        return cx - r, cy - r, cx + r, cy + r
    pad = p.width / 2 if isinstance(p, Line) else 0.0
    lo, hi = p.points.min(axis=0) - pad, p.points.max(axis=0) + pad
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _roi(ops: list[Op], pad: float, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    b = np.array([_bounds(p) for p, _ in ops])
    x0 = max(0, math.floor(b[:, 0].min() - pad))
    y0 = max(0, math.floor(b[:, 1].min() - pad))
    x1 = min(shape[1], math.ceil(b[:, 2].max() + pad) + 1)
    y1 = min(shape[0], math.ceil(b[:, 3].max() + pad) + 1)
    return x0, y0, x1, y1


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
    x0, y0, x1, y1 = _roi(cut, 3, maps.copper.shape)
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
        (_blob(p - n * rng.uniform(0, 0.5 * r) + t * (i * 1.3 * r), r * rng.uniform(0.6, 1.0), rng, 1.3), 0)
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
    return [(_blob(c, r, rng, elongation), 255)]


def _pin_hole(maps: _BoardMaps, rng: np.random.Generator) -> list[Op] | None:
    """A small hole in copper."""
    if len(maps.bulk) == 0:
        return None
    c = maps.bulk[rng.integers(len(maps.bulk))]
    r, elongation = rng.uniform(3, 7), rng.uniform(1.0, 2.0)
    if maps.dist_in[int(c[1]), int(c[0])] < r * elongation * 1.3 + 2:
        return None
    return [(_blob(c, r, rng, elongation), 0)]


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
            x0, y0, x1, y1 = _roi(ops, 3, clean.shape)
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
