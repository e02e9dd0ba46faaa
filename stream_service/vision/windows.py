"""Cutting a token grid into the model's fixed-size windows, and putting per-window maps back.

A window is ``size x size`` tokens: the same physical scale whatever the camera's resolution. Frames
smaller than a window are zero-padded (zero features mean "no difference"); larger ones are covered by
windows ``stride`` tokens apart, the last one flush with the edge, so every token is seen at least once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stream_service.errors import InputError
from stream_service.vision.arrays import F32


def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


@dataclass(frozen=True)
class WindowLayout:
    """Where each window of a (h, w) token grid sits: ``origins[k] = (row, col)`` of window k."""

    grid_hw: tuple[int, int]
    size: int
    origins: tuple[tuple[int, int], ...]

    @classmethod
    def cover(cls, grid_hw: tuple[int, int], size: int, stride: int) -> WindowLayout:
        if size < 1 or not 1 <= stride <= size:
            raise InputError(f"window layout: expected size >= 1 and 1 <= stride <= size, found {size}, {stride}")
        rows = _starts(grid_hw[0], size, stride)
        cols = _starts(grid_hw[1], size, stride)
        return cls(grid_hw, size, tuple((r, c) for r in rows for c in cols))

    def cut(self, tokens_hwc: F32) -> F32:
        """(h, w, C) token grid -> (N, size, size, C) float32 windows, zero-padded where the grid is small."""
        h, w, c = tokens_hwc.shape
        if (h, w) != self.grid_hw:
            raise InputError(f"window layout grid: expected {self.grid_hw}, found {(h, w)}")
        out = np.zeros((len(self.origins), self.size, self.size, c), np.float32)
        for k, (r, col) in enumerate(self.origins):
            patch = tokens_hwc[r : r + self.size, col : col + self.size]
            out[k, : patch.shape[0], : patch.shape[1]] = patch
        return out

    def paste_max(self, maps_nss: F32) -> F32:
        """(N, size, size) per-window maps -> (h, w) grid, the maximum where windows overlap."""
        out = np.zeros(self.grid_hw, np.float32)
        h, w = self.grid_hw
        for k, (r, col) in enumerate(self.origins):
            rh, cw = min(self.size, h - r), min(self.size, w - col)
            np.maximum(out[r : r + rh, col : col + cw], maps_nss[k, :rh, :cw], out=out[r : r + rh, col : col + cw])
        return out

    def paste_window_scores(self, scores_n: F32) -> F32:
        """(N,) per-window scores -> (h, w) grid holding, per token, the highest score of a window over it."""
        maps = np.broadcast_to(scores_n[:, None, None], (len(self.origins), self.size, self.size))
        return self.paste_max(np.ascontiguousarray(maps, dtype=np.float32))
