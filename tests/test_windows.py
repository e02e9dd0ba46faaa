"""WindowLayout: covering token grids of every size, cutting with zero padding, pasting maps back."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_service.errors import InputError
from stream_service.vision.windows import WindowLayout


def coverage(layout: WindowLayout) -> np.ndarray:
    """(h, w) count of windows over each token."""
    count = np.zeros(layout.grid_hw, int)
    for r, c in layout.origins:
        count[r : r + layout.size, c : c + layout.size] += 1
    return count


def check_cover(layout: WindowLayout, grid_hw: tuple[int, int], size: int, stride: int) -> None:
    assert layout.grid_hw == grid_hw and layout.size == size
    assert (coverage(layout) >= 1).all(), "every token is seen"
    for axis, length in enumerate(grid_hw):
        starts = sorted({o[axis] for o in layout.origins})
        assert starts[0] == 0
        if length <= size:
            assert starts == [0]
        else:
            assert starts[-1] == length - size, "the last window is flush with the edge"
            assert all(0 < b - a <= stride for a, b in itertools.pairwise(starts))
    rows = sorted({r for r, _ in layout.origins})
    cols = sorted({c for _, c in layout.origins})
    assert list(layout.origins) == [(r, c) for r in rows for c in cols], "row-major over a full grid of origins"


@pytest.mark.parametrize(
    ("grid_hw", "size", "stride", "rows", "cols"),
    [
        ((10, 10), 16, 12, [0], [0]),  # smaller than a window
        ((16, 16), 16, 12, [0], [0]),  # exactly one window
        ((16, 17), 16, 12, [0], [0, 1]),  # one token too wide: a flush second window
        ((40, 40), 16, 12, [0, 12, 24], [0, 12, 24]),  # 640 px at block 16, the shipped layout
        ((40, 30), 16, 16, [0, 16, 24], [0, 14]),  # stride = size, non-multiple
        ((8, 8), 4, 4, [0, 4], [0, 4]),  # exact multiple: no extra window
        ((5, 40), 16, 8, [0], [0, 8, 16, 24]),  # short and wide
        ((3, 3), 1, 1, [0, 1, 2], [0, 1, 2]),
    ],
)
def test_cover_table(grid_hw: tuple[int, int], size: int, stride: int, rows: list[int], cols: list[int]) -> None:
    layout = WindowLayout.cover(grid_hw, size, stride)
    assert layout.origins == tuple((r, c) for r in rows for c in cols)
    check_cover(layout, grid_hw, size, stride)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 60),
    w=st.integers(1, 60),
    size=st.integers(1, 20),
    data=st.data(),
)
def test_cover_property(h: int, w: int, size: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, size))
    check_cover(WindowLayout.cover((h, w), size, stride), (h, w), size, stride)


@pytest.mark.parametrize(("grid_hw", "size", "stride"), [((10, 7), 16, 12), ((16, 16), 16, 12), ((40, 23), 16, 12)])
def test_cut_copies_windows_and_pads_with_zeros(grid_hw: tuple[int, int], size: int, stride: int) -> None:
    rng = np.random.default_rng(1)
    tokens = rng.random((*grid_hw, 5), dtype=np.float32) + 0.5  # nonzero everywhere
    layout = WindowLayout.cover(grid_hw, size, stride)
    windows = layout.cut(tokens)
    assert windows.shape == (len(layout.origins), size, size, 5) and windows.dtype == np.float32
    for k, (r, c) in enumerate(layout.origins):
        rh, cw = min(size, grid_hw[0] - r), min(size, grid_hw[1] - c)
        np.testing.assert_array_equal(windows[k, :rh, :cw], tokens[r : r + rh, c : c + cw])
        assert not windows[k, rh:].any() and not windows[k, :, cw:].any(), "padding is zero"


@pytest.mark.parametrize(("grid_hw", "size", "stride"), [((10, 7), 16, 12), ((40, 40), 16, 12), ((23, 31), 8, 3)])
def test_paste_max_takes_the_maximum_over_overlapping_windows(grid_hw: tuple[int, int], size: int, stride: int) -> None:
    rng = np.random.default_rng(2)
    layout = WindowLayout.cover(grid_hw, size, stride)
    maps = rng.random((len(layout.origins), size, size), dtype=np.float32)
    pasted = layout.paste_max(maps)
    assert pasted.shape == grid_hw and pasted.dtype == np.float32
    expected = np.full(grid_hw, -np.inf, np.float32)
    for k, (r, c) in enumerate(layout.origins):
        for i in range(size):
            for j in range(size):
                if r + i < grid_hw[0] and c + j < grid_hw[1]:
                    expected[r + i, c + j] = max(expected[r + i, c + j], maps[k, i, j])
    np.testing.assert_array_equal(pasted, expected)


def test_paste_window_scores_gives_each_token_the_best_window_over_it() -> None:
    layout = WindowLayout.cover((40, 40), 16, 12)
    scores = np.arange(len(layout.origins), dtype=np.float32)  # later windows score higher
    grid = layout.paste_window_scores(scores)
    last = {}
    for k, (r, c) in enumerate(layout.origins):
        for i in range(r, r + 16):
            for j in range(c, c + 16):
                last[(i, j)] = k
    for (i, j), k in last.items():
        assert grid[i, j] == scores[k]


def test_cut_then_paste_round_trips_a_token_channel() -> None:
    rng = np.random.default_rng(3)
    tokens = rng.random((27, 45, 1), dtype=np.float32)
    layout = WindowLayout.cover((27, 45), 16, 12)
    np.testing.assert_array_equal(layout.paste_max(layout.cut(tokens)[..., 0]), tokens[..., 0])


@pytest.mark.parametrize(
    ("size", "stride"),
    [(0, 1), (16, 0), (16, 17), (-1, -1)],
)
def test_cover_errors(size: int, stride: int) -> None:
    with pytest.raises(InputError, match=rf"size >= 1 and 1 <= stride <= size, found {size}, {stride}"):
        WindowLayout.cover((40, 40), size, stride)


def test_cut_rejects_another_grid() -> None:
    layout = WindowLayout.cover((40, 40), 16, 12)
    with pytest.raises(InputError, match=r"expected \(40, 40\), found \(40, 39\)"):
        layout.cut(np.zeros((40, 39, 20), np.float32))
