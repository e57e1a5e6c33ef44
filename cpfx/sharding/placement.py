"""Where a tensor's values live: replicated on every rank, or sharded along one dim by a layout."""

from __future__ import annotations

import dataclasses

import torch

from cpfx.sharding.layout import Layout, merge_runs


@dataclasses.dataclass(frozen=True)
class Replicate:
    """Every rank holds the whole global value."""

    def __repr__(self) -> str:
        return "R"


@dataclasses.dataclass(frozen=True)
class Shard:
    """Rank r holds the global value's items `layout.pieces(r)` along `dim`, concatenated."""

    dim: int
    layout: Layout

    def __repr__(self) -> str:
        return f"S({self.dim}, {self.layout.describe()})"


Placement = Replicate | Shard
REPLICATE = Replicate()


def take_pieces(x: torch.Tensor, dim: int, pieces: list[tuple[int, int]]) -> torch.Tensor:
    """Concatenate the ranges `(start, length)` of `x` along `dim` (one narrow if contiguous,
    a zero-length narrow if there are none)."""
    runs = merge_runs(pieces)
    if not runs:
        return x.narrow(dim, 0, 0)
    parts = [x.narrow(dim, start, n) for start, n in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def local_value(x: torch.Tensor, p: Placement, rank: int) -> torch.Tensor:
    """What rank `rank` holds of the global value `x` under placement `p` (tests, verifier)."""
    if isinstance(p, Shard):
        return take_pieces(x, p.dim, p.layout.pieces(rank))
    return x
