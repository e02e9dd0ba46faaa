"""Crop manifests made from real DeepPCB pairs by the README's rule: PNG crops, shifted boxes, full frames."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from stream_service.quality.crops import MARGIN_PX, crop_origins, make_crop_manifest
from stream_service.quality.manifest import ManifestItem, load_manifest, read_gray
from stream_service.training.dataset import FAIL, PASS, window_label

SIZE = 256


@pytest.fixture(scope="module")
def crop_manifest(deeppcb_items: list[ManifestItem], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crops")
    return make_crop_manifest(deeppcb_items[:3], out, size=SIZE, n_fail=2, n_pass=2, seed=5)


def locate(crop: np.ndarray, image: np.ndarray) -> tuple[int, int]:
    """(x0, y0) where crop lies in image, pixel for pixel."""
    result = cv2.matchTemplate(image.astype(np.float32), crop.astype(np.float32), cv2.TM_SQDIFF)
    _, _, (x0, y0), _ = cv2.minMaxLoc(result)
    h, w = crop.shape
    np.testing.assert_array_equal(image[y0 : y0 + h, x0 : x0 + w], crop)
    return x0, y0


def test_manifest_reads_back_with_crops_and_full_frames(crop_manifest: Path, deeppcb_items: list[ManifestItem]) -> None:
    items = load_manifest(crop_manifest)
    full = [i for i in items if i.kind == "full"]
    crops = [i for i in items if i.kind == "crop"]
    assert [i.id for i in full] == [f"{s.id}-full" for s in deeppcb_items[:3]]
    assert {i.label for i in crops} == {"pass", "fail"}
    assert sum(i.label == "fail" for i in crops) == 6, "every DeepPCB image has a box small enough for a crop"
    # 256 px clear of every box is rare in a 640 px tile with 6 to 10 defects: at least one is found.
    assert 1 <= sum(i.label == "pass" for i in crops) <= 6
    for row in crop_manifest.read_text().splitlines():
        raw = json.loads(row)
        assert not Path(raw["reference"]).is_absolute() and not Path(raw["frame"]).is_absolute()
        if raw["kind"] == "crop":
            assert raw["reference"].startswith("crops/") and raw["reference"].endswith(".png")
    for crop in crops:
        assert crop.reference.is_file() and crop.frame.is_file()
        assert crop.group == "group00041"


def test_full_entries_keep_the_original_pairs_and_boxes(crop_manifest: Path, deeppcb_items: list[ManifestItem]) -> None:
    full = {i.id: i for i in load_manifest(crop_manifest) if i.kind == "full"}
    for source in deeppcb_items[:3]:
        entry = full[f"{source.id}-full"]
        assert entry.reference.resolve() == source.reference.resolve()
        assert entry.frame.resolve() == source.frame.resolve()
        assert entry.boxes == source.boxes and entry.label == source.label == "fail"


def test_crops_hold_the_source_pixels_and_whole_shifted_boxes(
    crop_manifest: Path, deeppcb_items: list[ManifestItem]
) -> None:
    sources = {s.id: s for s in deeppcb_items[:3]}
    for crop in load_manifest(crop_manifest):
        if crop.kind != "crop":
            continue
        source = sources[crop.id.rsplit("-c", 1)[0]]
        ref_crop, frame_crop = read_gray(crop.reference), read_gray(crop.frame)
        assert ref_crop.shape == frame_crop.shape == (SIZE, SIZE)
        x0, y0 = locate(frame_crop, read_gray(source.frame))
        np.testing.assert_array_equal(ref_crop, read_gray(source.reference)[y0 : y0 + SIZE, x0 : x0 + SIZE])
        inside = [
            (b[0] - x0, b[1] - y0, b[2] - x0, b[3] - y0, b[4])
            for b in source.boxes
            if b[0] >= x0 and b[1] >= y0 and b[2] < x0 + SIZE and b[3] < y0 + SIZE
        ]
        assert crop.boxes == inside, "exactly the boxes wholly inside, in crop coordinates"
        if crop.label == "fail":
            assert crop.boxes, "a fail crop holds a whole box"
            assert window_label(source.boxes, x0, y0, SIZE) == FAIL
        else:
            assert not crop.boxes
            for x1, y1, x2, y2, _ in source.boxes:
                clear = x2 + MARGIN_PX < x0 or x1 - MARGIN_PX > x0 + SIZE - 1
                clear = clear or y2 + MARGIN_PX < y0 or y1 - MARGIN_PX > y0 + SIZE - 1
                assert clear, f"pass crop {crop.id} comes within {MARGIN_PX} px of box {(x1, y1, x2, y2)}"
            assert window_label(source.boxes, x0, y0, SIZE) == PASS
            assert (ref_crop < 128).mean() >= 0.05, "a pass crop holds some copper"


def test_make_crop_manifest_is_seeded(deeppcb_items: list[ManifestItem], tmp_path: Path) -> None:
    first = make_crop_manifest(deeppcb_items[:1], tmp_path / "a", n_fail=1, n_pass=1, include_full=False, seed=3)
    second = make_crop_manifest(deeppcb_items[:1], tmp_path / "b", n_fail=1, n_pass=1, include_full=False, seed=3)
    assert first.read_text() == second.read_text()
    assert all(json.loads(line)["kind"] == "crop" for line in first.read_text().splitlines())


@pytest.mark.parametrize(
    ("boxes", "n_fail", "n_pass", "labels"),
    [
        ([], 2, 2, ["pass", "pass"]),  # no boxes: no fail crops
        ([(300, 300, 340, 340, 1)], 3, 0, ["fail"] * 3),
        ([(0, 0, 300, 300, 2)], 2, 1, ["pass"]),  # a box larger than a crop gives no fail crop
    ],
)
def test_crop_origins_table(
    boxes: list[tuple[int, int, int, int, int]], n_fail: int, n_pass: int, labels: list[str]
) -> None:
    reference = np.zeros((640, 640), np.uint8)  # dark = copper all over
    origins = crop_origins(boxes, reference, SIZE, n_fail, n_pass, np.random.default_rng(0))
    assert [label for _, _, label in origins] == labels
    for x0, y0, label in origins:
        assert 0 <= x0 <= 640 - SIZE and 0 <= y0 <= 640 - SIZE
        if label == "fail":
            assert window_label(boxes, x0, y0, SIZE) == FAIL
        else:
            assert window_label(boxes, x0, y0, SIZE) == PASS


def test_crop_origins_need_copper_for_a_pass_crop() -> None:
    blank = np.full((640, 640), 255, np.uint8)  # bright = no copper
    assert crop_origins([], blank, SIZE, 0, 3, np.random.default_rng(0)) == []
