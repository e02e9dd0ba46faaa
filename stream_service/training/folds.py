"""Folds over boards: every board (``group``) held out exactly once, no board on both sides of a fold.

Images of one board are near-duplicates, so a fold holds out whole boards. Assignment is deterministic:
boards in decreasing order of their pair count (name breaks ties), each to the fold with the fewest
pairs so far (lowest index breaks ties), which balances the folds' sizes. Pure Python (no torch).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from stream_service.errors import InputError
from stream_service.quality.manifest import ManifestItem


@dataclass(frozen=True)
class Fold:
    index: int
    held_out: tuple[str, ...]
    train: tuple[str, ...]

    def split(self, items: Sequence[ManifestItem]) -> tuple[list[ManifestItem], list[ManifestItem]]:
        """(training pairs, held-out pairs) of this fold."""
        held = set(self.held_out)
        return [i for i in items if i.group not in held], [i for i in items if i.group in held]

    def as_dict(self) -> dict[str, object]:
        return {"index": self.index, "held_out": list(self.held_out), "train": list(self.train)}


def assign_folds(groups: Sequence[str | None], k: int) -> list[Fold]:
    """K folds over the distinct groups of ``groups`` (one entry per pair)."""
    if any(not g for g in groups):
        raise InputError("cross-validation by board: expected a group on every manifest row, found one without")
    counts = Counter(str(g) for g in groups)
    if not 2 <= k <= len(counts):
        raise InputError(f"cross-validation folds: expected 2 <= K <= {len(counts)} boards, found K={k}")
    members: list[list[str]] = [[] for _ in range(k)]
    sizes = [0] * k
    for group in sorted(counts, key=lambda g: (-counts[g], g)):
        target = min(range(k), key=lambda j: (sizes[j], j))
        members[target].append(group)
        sizes[target] += counts[group]
    everything = sorted(counts)
    return [Fold(i, tuple(sorted(m)), tuple(g for g in everything if g not in set(m))) for i, m in enumerate(members)]
