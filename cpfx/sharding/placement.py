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


@dataclasses.dataclass(frozen=True)
class Partial:
    """Every rank holds a value of the global shape; the global value is their reduction over the
    group's ranks (`op`: "sum", "max" or "min"), e.g. a sum over the tokens of each rank's shard.
    An all-reduce makes it replicated."""

    op: str = "sum"

    def __repr__(self) -> str:
        return f"P({self.op})"


Placement = Replicate | Shard | Partial
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
    """What rank `rank` holds of the global value `x` under placement `p` (tests, verifier). A
    partial value is not a function of the global one: asking for it is an error."""
    if isinstance(p, Partial):
        raise ValueError(f"no rank's part of a partial value ({p}) follows from the global value")
    if isinstance(p, Shard):
        return take_pieces(x, p.dim, p.layout.pieces(rank))
    return x


def reduce_partials(parts: list[torch.Tensor], p: Partial) -> torch.Tensor:
    """The global value of the ranks' parts of a partial value (what the all-reduce computes)."""
    stacked = torch.stack(parts)
    if p.op == "sum":
        return stacked.sum(0)
    return stacked.amax(0) if p.op == "max" else stacked.amin(0)
