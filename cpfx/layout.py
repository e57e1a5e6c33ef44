"""How a token dimension is split across the context-parallel ranks.

A `Layout` describes a sharded token dimension of global length `sum(seg lengths)` as a list of
segments (e.g. [text | image] after a concatenation). Each segment is cut into `world` contiguous
chunks whose sizes differ by at most one (the first `len % world` chunks are one longer). Rank r's
local tensor holds, along the token dim, chunk r of every segment, concatenated in segment order:

    global  [t0 t1 t2 t3 | i0 i1 i2 i3 i4 i5]      segments (0, 4) and (4, 6), world 2
    rank 0  [t0 t1 | i0 i1 i2]
    rank 1  [t2 t3 | i3 i4 i5]

Gathering the local tensors in rank order gives a permutation of the global order ("rank order");
attention is exact under any permutation applied consistently to queries, keys and masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def chunk_sizes(length: int, world: int) -> tuple[int, ...]:
    """Sizes of the `world` chunks of `length` tokens, differing by at most one."""
    base, rem = divmod(length, world)
    return tuple(base + (r < rem) for r in range(world))


def chunk_start(length: int, world: int, rank: int) -> int:
    return sum(chunk_sizes(length, world)[:rank])


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int
    """Global start of the segment along the token dim."""
    length: int


@dataclasses.dataclass(frozen=True)
class Layout:
    segments: tuple[Segment, ...]
    world: int

    @staticmethod
    def simple(length: int, world: int) -> Layout:
        return Layout((Segment(0, length),), world)

    @property
    def global_size(self) -> int:
        return sum(s.length for s in self.segments)

    def local_size(self, rank: int) -> int:
        return sum(chunk_sizes(s.length, self.world)[rank] for s in self.segments)

    def local_sizes(self) -> tuple[int, ...]:
        return tuple(self.local_size(r) for r in range(self.world))

    @property
    def even(self) -> bool:
        return len(set(self.local_sizes())) == 1

    def pieces(self, rank: int) -> list[tuple[int, int]]:
        """Global (start, length) ranges that rank `rank` holds, in local order."""
        out = []
        for s in self.segments:
            n = chunk_sizes(s.length, self.world)[rank]
            if n:
                out.append((s.start + chunk_start(s.length, self.world, rank), n))
        return out

    def ranks_pieces(self, ranks: Sequence[int]) -> list[tuple[int, int]]:
        """Global ranges held by `ranks`, concatenated in that order (the order a gather gives)."""
        return [p for r in ranks for p in self.pieces(r)]

    def shifted(self, offset: int) -> Layout:
        return Layout(tuple(Segment(s.start + offset, s.length) for s in self.segments), self.world)

    def concat(self, other: Layout) -> Layout:
        """Layout of `cat([self, other])` along the token dim."""
        assert self.world == other.world
        return Layout(self.segments + other.shifted(self.global_size).segments, self.world)

    def select(self, start: int, stop: int) -> Layout | None:
        """Layout of the global slice [start, stop) if it is a union of whole segments, else None."""
        segs = []
        for s in self.segments:
            end = s.start + s.length
            if start <= s.start and end <= stop:
                segs.append(Segment(s.start - start, s.length))
            elif end > start and s.start < stop:
                return None  # the slice cuts through a segment: its chunks are not local
        if sum(s.length for s in segs) != stop - start:
            return None
        return Layout(tuple(segs), self.world)

    def local_ranges(self, rank: int, start: int, stop: int) -> tuple[int, int]:
        """Local [start, stop) of the whole segments lying in global [start, stop)."""
        lo = hi = 0
        pos = 0
        for s in self.segments:
            n = chunk_sizes(s.length, self.world)[rank]
            if s.start < start:
                lo += n
            if s.start + s.length <= stop:
                hi = pos + n
            pos += n
        return lo, hi


def merge_runs(pieces: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join adjacent (start, length) ranges: fewer narrow/cat ops in the graph."""
    out: list[tuple[int, int]] = []
    for start, n in pieces:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((start, n))
    return out
