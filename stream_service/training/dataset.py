"""Training windows from an inspection manifest: registered SOARTC token features with labels.

A window is ``window`` x ``window`` tokens (256 x 256 pixels at block 16). Labels follow the dataset's
rule for crops: a window is a fail if a defect box lies wholly inside it, a pass if no box comes within
``margin`` pixels (8), and ambiguous otherwise (-1: no window label, but its token targets still
teach the attention). Token targets mark the tokens a box overlaps.

Augmentation imitates what a line does to frames: sub-pixel shifts (undone by the real registration,
which leaves its real residual), copper edges etched back or grown by up to a pixel (a new board's
etching differs from its golden reference's along every edge), brightness and contrast changes, blur and
sensor noise; plus the board's own symmetries (rotations by 90 degrees and flips) applied to reference and
frame together.

This module is pure NumPy/OpenCV (no torch), so its labelling is tested without the train extra.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from stream_service.quality.crops import box_inside, box_near
from stream_service.quality.manifest import Box, ManifestItem, read_gray
from stream_service.quality.metrics import MARGIN_PX, near_boxes
from stream_service.vision.registration import Registrar
from stream_service.vision.soartc import Calibration, to_unit
from stream_service.vision.tokens import FeatureSpec, forgive_jitter, raw_deviations, token_features

log = logging.getLogger(__name__)

# Registration limit of the training path; the live default (settings soartc.max_shift_px) is larger.
MAX_SHIFT_PX = 8.0
PASS, FAIL, AMBIGUOUS = 0, 1, -1


@dataclass(frozen=True)
class Augment:
    """Ranges of the line-like perturbations applied to the frame of a training window."""

    shift_px: float = 2.0
    gain: tuple[float, float] = (0.8, 1.2)
    offset: float = 0.06
    blur_sigma: float = 0.8
    noise_sigma: float = 0.03
    symmetries: bool = True
    # Up to this fraction of a pixel of copper etched back or grown along every edge of the frame, on half the
    # windows (0: never). Fractions blend the frame with its 3x3-eroded or -dilated self.
    etch_px: float = 0.0
    # This fraction of the windows (0: none) is made defect-free (``clean_frame``): pass windows from any
    # position that keep the tested board's own etching and registration residue (DeepPCB tiles hold 1 to 15
    # defects, so the positions clear of every box are few and always the same).
    clean_pass: float = 0.0
    # Up to this many pixels of copper grown or etched back by region (``regional_move``: a smooth field across
    # the window, faded to zero around its boxes), on half the windows (0: never). Unlike ``etch_px`` it
    # goes past the features' 1 px jitter tolerance: a new board's etching differs from its template's by
    # several pixels along whole edge segments.
    regional_etch_px: float = 0.0


NO_AUGMENT = Augment(
    shift_px=0.0, gain=(1.0, 1.0), offset=0.0, blur_sigma=0.0, noise_sigma=0.0, symmetries=False, etch_px=0.0
)
# Augment fields added after recipes were checkpointed, with the value that means "off": left out of a
# recipe's key at that value, so the checkpoints of earlier recipes still resume (training.cv).
LATER_FIELDS = {"clean_pass": 0.0, "regional_etch_px": 0.0}


def split_by_group(items: Sequence[ManifestItem], val_groups: Sequence[str]) -> tuple[list[ManifestItem], ...]:
    """(train, validation) split by board group, never by image (images of a board are near-duplicates)."""
    val = set(val_groups)
    train = [i for i in items if i.group not in val]
    valid = [i for i in items if i.group in val]
    return train, valid


def window_label(boxes: Sequence[Box], x0: int, y0: int, size: int, margin: int = MARGIN_PX) -> int:
    """FAIL if a box lies wholly inside the window at (x0, y0), PASS if none comes within margin, else AMBIGUOUS:
    the rule of the evaluation crops (``crops``), applied to training windows."""
    if any(box_inside(b, x0, y0, size) for b in boxes):
        return FAIL
    return AMBIGUOUS if any(box_near(b, x0, y0, size, margin) for b in boxes) else PASS


def token_targets(boxes: Sequence[Box], x0: int, y0: int, grid: int, block: int) -> npt.NDArray[np.uint8]:
    """(grid, grid) uint8: 1 for tokens of the window at (x0, y0) that a box overlaps."""
    out = np.zeros((grid, grid), np.uint8)
    for bx1, by1, bx2, by2, *_ in boxes:
        c1, c2 = (bx1 - x0) // block, (bx2 - x0) // block
        r1, r2 = (by1 - y0) // block, (by2 - y0) // block
        if c2 < 0 or r2 < 0 or c1 >= grid or r1 >= grid:
            continue
        out[max(r1, 0) : min(r2, grid - 1) + 1, max(c1, 0) : min(c2, grid - 1) + 1] = 1
    return out


_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def etch(frame_hw: npt.NDArray[np.float32], amount: float, grow: bool) -> npt.NDArray[np.float32]:
    """The frame with its bright phase grown (``grow``) or etched back along every edge by ``amount`` pixels
    (0..1): a blend of the frame with its 3x3-cross dilation or erosion, so only edge pixels change."""
    moved = cv2.dilate(frame_hw, _CROSS) if grow else cv2.erode(frame_hw, _CROSS)
    return np.asarray(frame_hw + np.float32(amount) * (moved - frame_hw), np.float32)


# The regional field: a (FIELD_GRID x FIELD_GRID) grid of amounts, cubic-interpolated across the image; it
# fades to zero from BOX_CLEAR to BOX_CLEAR + BOX_FADE px around each defect box.
FIELD_GRID = 4
BOX_CLEAR, BOX_FADE = 4, 12


def regional_move(
    copper_hw: npt.NDArray[np.bool_], amplitude: float, boxes: Sequence[Sequence[int]], rng: np.random.Generator
) -> npt.NDArray[np.bool_]:
    """The (H, W) copper mask grown (field > 0) or etched back (< 0) by up to ``amplitude`` px by region.

    The field is a smooth random map in [-amplitude, amplitude], zero near ``boxes`` (so defects stay as
    drawn); a pixel is copper when its signed distance to the copper edge (outside positive, +-0.5 at the
    edge pixels) is below the field, so edges move in whole pixels. A mask without both sides, or zero
    amplitude, comes back unchanged (and draws nothing from ``rng``).
    """
    if amplitude <= 0 or not copper_hw.any() or copper_hw.all():
        return copper_hw
    h, w = copper_hw.shape
    outside = cv2.distanceTransform((~copper_hw).astype(np.uint8), cv2.DIST_L2, 3)
    inside = cv2.distanceTransform(copper_hw.astype(np.uint8), cv2.DIST_L2, 3)
    signed = np.where(copper_hw, 0.5 - inside, outside - 0.5)
    coarse = rng.uniform(-amplitude, amplitude, (FIELD_GRID, FIELD_GRID)).astype(np.float32)
    field = np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), -amplitude, amplitude)
    if boxes:
        near = np.ones((h, w), np.uint8)
        for x1, y1, x2, y2, *_ in boxes:
            near[max(0, y1 - BOX_CLEAR) : y2 + BOX_CLEAR + 1, max(0, x1 - BOX_CLEAR) : x2 + BOX_CLEAR + 1] = 0
        away = cv2.distanceTransform(near, cv2.DIST_L2, 3)
        field = field * np.clip(away / BOX_FADE, 0.0, 1.0)
    return np.asarray(signed < field, np.bool_)


def _perturb(frame_hw: npt.NDArray[np.float32], aug: Augment, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    out = frame_hw
    if aug.etch_px > 0 and rng.random() < 0.5:
        out = etch(out, float(rng.uniform(0, aug.etch_px)), bool(rng.integers(2)))
    if aug.shift_px > 0:
        dx, dy = rng.uniform(-aug.shift_px, aug.shift_px, 2)
        m = np.array([[1, 0, dx], [0, 1, dy]], np.float32)
        size = (out.shape[1], out.shape[0])
        out = np.asarray(
            cv2.warpAffine(out, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT), np.float32
        )
    if aug.blur_sigma > 0:
        sigma = rng.uniform(0, aug.blur_sigma)
        if sigma > 0.2:
            out = np.asarray(cv2.GaussianBlur(out, (0, 0), sigma), np.float32)
    gain = rng.uniform(*aug.gain)
    offset = rng.uniform(-aug.offset, aug.offset)
    out = out * np.float32(gain) + np.float32(offset)
    if aug.noise_sigma > 0:
        out = out + rng.normal(0, rng.uniform(0, aug.noise_sigma), out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _symmetry(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(image, k)
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def _box_symmetry(boxes: Sequence[Box], size: int, k: int, flip: bool) -> list[Box]:
    """Boxes in a size x size crop after np.rot90(k) then a horizontal flip (same order as _symmetry)."""
    out: list[Box] = []
    for x1, y1, x2, y2, t in boxes:
        for _ in range(k % 4):  # np.rot90 turns counter-clockwise: (x, y) -> (y, size - 1 - x)
            x1, y1, x2, y2 = y1, size - 1 - x2, y2, size - 1 - x1
        if flip:
            x1, x2 = size - 1 - x2, size - 1 - x1
        out.append((x1, y1, x2, y2, t))
    return out


@dataclass(frozen=True)
class Window:
    """One training window: tokens (g, g, C) float16, token targets (g, g) uint8, label (PASS/FAIL/AMBIGUOUS)."""

    tokens: npt.NDArray[np.float16]
    targets: npt.NDArray[np.uint8]
    label: int


def align(
    reference_hw: npt.NDArray[np.float32], frame_hw: npt.NDArray[np.float32], spec: FeatureSpec | None = None
) -> npt.NDArray[np.float32]:
    """The frame aligned to the reference by the pipeline's own policy (``Registrar.align``), with the
    spec's front end (registration method, valid-region mask, local refinement: ``Registrar.front_end``;
    translation, no mask and no refinement without a spec)."""
    method = "translation" if spec is None or spec.registration is None else spec.registration
    registrar = Registrar(reference_hw, method, max_shift=MAX_SHIFT_PX)
    if spec is None:
        return registrar.align(frame_hw)[0]
    return registrar.front_end(frame_hw, valid_region=spec.valid_region, local_px=spec.local_px)[0]


def clean_frame(
    reference_hw: npt.NDArray[np.float32],
    frame_hw: npt.NDArray[np.float32],
    boxes: Sequence[Box],
    spec: FeatureSpec,
    margin: int = MARGIN_PX,
) -> npt.NDArray[np.float32]:
    """The frame with its defects removed: every box, grown by ``margin`` px, filled with the reference
    warped into the frame's coordinates (the registration's forward map), so that the part still sits where
    the camera saw it and everything outside the boxes (etching, local misregistration) stays the tested
    board's own. Boxes are in the window's pixel coordinates."""
    method = "translation" if spec.registration is None else spec.registration
    _, reg = Registrar(reference_hw, method, max_shift=MAX_SHIFT_PX).align(frame_hw)
    h, w = frame_hw.shape
    seen = (
        reference_hw
        if reg.method == "none"
        else np.asarray(
            cv2.warpAffine(reference_hw, reg.matrix(), (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE),
            np.float32,
        )
    )
    # near_boxes slices as the reference scorer does, so a box whose grown extent ends left of or above the
    # window (a negative slice end) would wrap around: such boxes are dropped first.
    reaching = [b for b in boxes if b[2] + margin + 1 > 0 and b[3] + margin + 1 > 0]
    return np.asarray(np.where(near_boxes((h, w), reaching, margin), seen, frame_hw), np.float32)


def make_window(
    reference_u8: npt.NDArray[np.uint8],
    frame_u8: npt.NDArray[np.uint8],
    boxes: Sequence[Box],
    x0: int,
    y0: int,
    spec: FeatureSpec,
    grid: int,
    aug: Augment,
    rng: np.random.Generator,
    dark_object: bool = True,
    clean: bool = False,
) -> Window:
    """Cut, perturb, register and featurise the window at (x0, y0) of a full reference/frame pair;
    ``clean``: with the defects removed first (``clean_frame``), a pass whatever the boxes."""
    size = grid * spec.block
    label = PASS if clean else window_label(boxes, x0, y0, size)
    local = [(x1 - x0, y1 - y0, x2 - x0, y2 - y0, t) for x1, y1, x2, y2, t in boxes]
    ref = to_unit(reference_u8[y0 : y0 + size, x0 : x0 + size], dark_object)
    frame = to_unit(frame_u8[y0 : y0 + size, x0 : x0 + size], dark_object)
    if clean:
        frame, local = clean_frame(ref, frame, local, spec), []
    if aug.symmetries:
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        ref, frame = _symmetry(ref, k, flip), _symmetry(frame, k, flip)
        local = _box_symmetry(local, size, k, flip)
    if aug.regional_etch_px > 0 and rng.random() < 0.5:
        # Copper is bright here (to_unit); pixels that change side take the binarised level of their new side.
        copper = frame > 0.5
        moved = regional_move(copper, float(rng.uniform(0, aug.regional_etch_px)), local, rng)
        frame = np.where(moved & ~copper, np.float32(1.0), np.where(copper & ~moved, np.float32(0.0), frame))
    frame = _perturb(frame, aug, rng)
    feats = token_features(ref, align(ref, frame, spec), spec)
    return Window(feats.tokens_hwc.astype(np.float16), token_targets(local, 0, 0, grid, spec.block), label)


def sample_origins(
    item: ManifestItem, shape: tuple[int, int], size: int, count: int, rng: np.random.Generator, tries: int = 60
) -> list[tuple[int, int]]:
    """Window origins for one image, in thirds: around a random box, clear of every box, anywhere.

    Pass windows are rare at random (DeepPCB tiles hold 1 to 15 defects), so a third of the windows
    are searched for among random positions that no box comes within 8 px of; an image without such
    a position gives random windows instead.
    """
    h, w = shape
    out: list[tuple[int, int]] = []
    for n in range(count):
        if n % 3 == 0 and item.boxes:
            x1, y1, x2, y2, _ = item.boxes[int(rng.integers(len(item.boxes)))]
            lo_x, hi_x = max(0, x2 - size + 1), min(x1, w - size)
            lo_y, hi_y = max(0, y2 - size + 1), min(y1, h - size)
            if lo_x <= hi_x and lo_y <= hi_y:
                out.append((int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))))
                continue
        if n % 3 == 1:
            for _ in range(tries):
                x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
                if window_label(item.boxes, x0, y0, size) == PASS:
                    break
            out.append((x0, y0))
            continue
        out.append((int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))))
    return out


def good_block_mask(boxes: Sequence[Box], shape: tuple[int, int], block: int) -> npt.NDArray[np.bool_]:
    """(h, w) bool: blocks that no box comes within MARGIN_PX of."""
    h, w = shape[0] // block, shape[1] // block
    near = near_boxes((h * block, w * block), boxes)
    return np.asarray(~near.reshape(h, block, w, block).any(axis=(1, 3)), bool)


def calibrate_spec(
    items: Sequence[ManifestItem], base: FeatureSpec, percentile: float = 99.0, gain: float = 2.0
) -> FeatureSpec:
    """The feature spec with calibration constants from the good blocks (no box within 8 px) of items.

    SOARTC.md allows "a high percentile of all good blocks": DeepPCB has no defect-free frames, but
    the blocks away from every box are good.
    """
    levels: dict[int, list[np.ndarray]] = {base.block: [], base.sub_block: []}
    for item in items:
        ref = to_unit(read_gray(item.reference), dark_object=True)
        frame = to_unit(read_gray(item.frame), dark_object=True)
        aligned = align(ref, frame, base)
        for block, store in levels.items():
            e = raw_deviations(ref, forgive_jitter(ref, aligned, base.tolerance_px), block, base.variant)
            store.append(e[good_block_mask(item.boxes, ref.shape, block)])

    def constants(block: int) -> Calibration:
        values = np.concatenate(levels[block])
        c = np.percentile(values, percentile, axis=0)
        return Calibration(
            (float(max(c[0], 1e-3)), float(max(c[1], 1e-3)), float(max(c[2], 1e-3))), gain, f"percentile-{percentile}"
        )

    return dataclasses.replace(base, calibration=constants(base.block), sub_calibration=constants(base.sub_block))


def build_windows(
    items: Sequence[ManifestItem],
    spec: FeatureSpec,
    grid: int,
    per_image: int,
    aug: Augment,
    seed: int,
) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.uint8], npt.NDArray[np.int8]]:
    """Sample windows from every item: (N, g, g, C) float16 tokens, (N, g, g) targets, (N,) labels."""
    rng = np.random.default_rng(seed)
    size = grid * spec.block
    tokens, targets, labels = [], [], []
    for item in items:
        ref_u8, frame_u8 = read_gray(item.reference), read_gray(item.frame)
        if ref_u8.shape[0] < size or ref_u8.shape[1] < size:
            log.warning("skipping %s: %s is smaller than a %d px window", item.id, ref_u8.shape, size)
            continue
        for x0, y0 in sample_origins(item, ref_u8.shape, size, per_image, rng):
            # rng is drawn for this only when asked, so that recipes without it sample the same windows as before.
            clean = aug.clean_pass > 0 and bool(rng.random() < aug.clean_pass)
            win = make_window(ref_u8, frame_u8, item.boxes, x0, y0, spec, grid, aug, rng, clean=clean)
            tokens.append(win.tokens)
            targets.append(win.targets)
            labels.append(win.label)
    return np.stack(tokens), np.stack(targets), np.asarray(labels, np.int8)
