"""How one tensor dimension is split across the context-parallel ranks.

A `Layout` of a dimension of global length `size` lists, for every rank, the global index ranges
`(start, length)` that rank holds, in the order its local tensor holds them. The ranges of all
ranks partition `[0, size)` exactly: every global index lives on one rank.

    Layout.even(10, 2)                 rank 0: [0, 5)            rank 1: [5, 10)
    even(4, 2).concat(even(6, 2))      rank 0: [0, 2) [4, 7)     rank 1: [2, 4) [7, 10)
        (a [text | image] sequence: each rank holds its chunk of every segment)
    even(3, 2).repeat(outer=2, inner=1)     a [2, 3] tensor sharded on dim 1, viewed as [6]:
                                       rank 0: [0, 2) [3, 5)     rank 1: [2, 3) [5, 6)

Gathering the local tensors in rank order gives a permutation of the global order; attention is
exact under any permutation applied alike to queries, keys and masks, so attention never needs
the global order back. Every layout operation here is exact index arithmetic, and a layout may be
unbalanced or give a rank nothing (a zero-length local tensor is legal everywhere).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

Range = tuple[int, int]
"""(global start, length)"""


def chunk_sizes(length: int, world: int) -> tuple[int, ...]:
    """Sizes of the `world` contiguous chunks of `length` items, differing by at most one."""
    base, rem = divmod(length, world)
    return tuple(base + (r < rem) for r in range(world))


def merge_runs(pieces: Sequence[Range]) -> list[Range]:
    """Drop empty ranges and join ranges that continue each other (fewer narrow/cat ops)."""
    out: list[Range] = []
    for start, n in pieces:
        if n == 0:
            continue
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((start, n))
    return out


@dataclasses.dataclass(frozen=True)
class Layout:
    size: int
    """Global length of the dimension."""
    parts: tuple[tuple[Range, ...], ...]
    """parts[r]: the global ranges rank r holds, in local order (normalized by `merge_runs`)."""

    @staticmethod
    def make(size: int, parts: Sequence[Sequence[Range]]) -> Layout:
        norm = tuple(tuple(merge_runs(p)) for p in parts)
        flat = sorted(r for p in norm for r in p)
        pos = 0
        for start, n in flat:
            if start != pos:
                raise ValueError(f"layout ranges do not partition [0, {size}): {norm}")
            pos += n
        if pos != size:
            raise ValueError(f"layout ranges cover {pos} of {size} items: {norm}")
        return Layout(size, norm)

    @staticmethod
    def even(size: int, world: int) -> Layout:
        """Contiguous chunks in rank order, sizes differing by at most one."""
        sizes = chunk_sizes(size, world)
        starts = [sum(sizes[:r]) for r in range(world)]
        return Layout.make(size, [[(starts[r], sizes[r])] for r in range(world)])

    # --- reading -------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return len(self.parts)

    def pieces(self, rank: int) -> list[Range]:
        return list(self.parts[rank])

    def local_size(self, rank: int) -> int:
        return sum(n for _, n in self.parts[rank])

    def ranks_pieces(self, ranks: Sequence[int]) -> list[Range]:
        """Global ranges held by `ranks`, in that order (the order a gather over them gives)."""
        return [p for r in ranks for p in self.parts[r]]

    def describe(self) -> str:
        if self == Layout.even(self.size, self.world):
            return f"even({self.size})"
        return f"{self.size}: " + " | ".join(
            "r%d %s" % (r, ",".join(f"{s}+{n}" for s, n in p)) for r, p in enumerate(self.parts)
        )

    # --- deriving ------------------------------------------------------------------------
    def concat(self, other: Layout) -> Layout:
        """Layout of `cat([a, b])` along this dim: each rank holds its part of a, then of b."""
        assert self.world == other.world
        parts = [
            list(a) + [(s + self.size, n) for s, n in b] for a, b in zip(self.parts, other.parts)
        ]
        return Layout.make(self.size + other.size, parts)

    def select(self, start: int, stop: int) -> Layout:
        """Layout of the global slice [start, stop): each rank keeps what it holds of it."""
        parts = []
        for p in self.parts:
            parts.append([(max(s, start) - start, min(s + n, stop) - max(s, start))
                          for s, n in p if s < stop and s + n > start])
        return Layout.make(stop - start, parts)

    def local_runs(self, rank: int, start: int, stop: int) -> list[Range]:
        """(local start, length) of the items of global [start, stop) in rank's local tensor."""
        out, pos = [], 0
        for s, n in self.parts[rank]:
            lo, hi = max(s, start), min(s + n, stop)
            if lo < hi:
                out.append((pos + lo - s, hi - lo))
            pos += n
        return merge_runs(out)

    def reversed(self) -> Layout:
        """Layout after flipping the dim: global index i becomes size - 1 - i."""
        return Layout.make(
            self.size, [[(self.size - s - n, n) for s, n in reversed(p)] for p in self.parts]
        )

    def repeat(self, outer: int, inner: int) -> Layout:
        """This dim merged by a view with `outer` items before it and `inner` after it:
        [.., outer, size, inner, ..] -> [.., outer * size * inner, ..] (row-major)."""
        block = self.size * inner
        parts = [
            [(o * block + s * inner, n * inner) for o in range(outer) for s, n in p]
            for p in self.parts
        ]
        return Layout.make(outer * block, parts)

    def factor(self, outer: int, inner: int) -> Layout | None:
        """The inverse of `repeat`: a layout L of the middle dim with L.repeat(outer, inner) ==
        self, if this dim, split into [outer, size / (outer * inner), inner], is sharded along
        the middle dim only. None otherwise."""
        if outer * inner == 0 or self.size % (outer * inner):
            return None
        mid = self.size // (outer * inner)
        block = mid * inner
        parts = []
        for p in self.parts:
            first = []
            for s, n in p:
                if s >= block:
                    continue
                n = min(n, block - s)  # a run merged across the block boundary: its first block
                if s % inner or n % inner:
                    return None
                first.append((s // inner, n // inner))
            parts.append(first)
        try:
            cand = Layout.make(mid, parts)
        except ValueError:
            return None
        return cand if cand.repeat(outer, inner) == self else None
