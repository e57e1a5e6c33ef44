"""Convolutions over a sharded spatial dim: each rank takes a halo of rows from its neighbours.

A stride-1 convolution whose output keeps the input's length along the sharded dim ("same"
padding: 2 * padding == dilation * (kernel - 1)) needs, for the output rows [s, e) a rank holds,
the input rows [s - p, e + p) (p = padding), clipped to the tensor. Those rows live on this rank
and on the ranks holding the rows just before and after its own (several ranks when shards are
shorter than p; none at the tensor's edges, where the convolution's zero padding is the single
process's own). One all-to-all with per-pair row counts brings them (`exchange`), the local rows
are convolved with the original padding, and the output rows that a fake (local-edge) padding
row reached are cut off (`conv_rows`):

    rank r holds rows [s, e) of x:    [x_prev rows s-p..s) | x[s:e] | x_next rows e..e+p)]
    conv(..., padding=p) over them, then narrow to the output rows s..e.

Needs each rank's rows to be one contiguous range, ranks in row order (`Layout.even` and its
uneven and empty variants); other layouts are gathered by the rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from cpfx import comm
from cpfx.sharding.layout import Layout


@dataclasses.dataclass(frozen=True)
class Halo:
    """Where one rank's rows come from, for a convolution over sharded dim `dim`."""

    dim: int
    layout: Layout
    pad: int
    """Rows needed on each side (the convolution's padding along `dim`)."""
    rank: int
    out_shape: tuple[int, ...] = ()
    """The convolution's global output shape (an empty shard's output is made, not computed: a
    convolution refuses an empty input)."""
    group: str = ""
    """The context-parallel group's name (filled in by the applier)."""

    def span(self, r: int) -> tuple[int, int, int, int]:
        """(s, e, a, b): rank r's own rows [s, e) and the rows [a, b) its convolution reads."""
        pieces = self.layout.pieces(r)
        s = pieces[0][0] if pieces else _empty_start(self.layout, r)
        e = s + sum(n for _, n in pieces)
        return s, e, max(0, s - self.pad), min(self.layout.size, e + self.pad)

    def rows_from(self, q: int, r: int) -> tuple[int, int]:
        """(start, length) of rank q's own rows that rank r's convolution reads (none for q == r:
        its own rows are at hand)."""
        s, e, _, _ = self.span(q)
        _, _, a, b = self.span(r)
        lo, hi = max(s, a), min(e, b)
        return (lo, hi - lo) if q != r and hi > lo else (s, 0)

    def sends(self) -> list[tuple[int, int]]:
        """(start, length) of this rank's own rows that each rank needs from it."""
        return [self.rows_from(self.rank, r) for r in range(len(self.layout.parts))]

    def receives(self) -> list[int]:
        """How many rows this rank gets from each rank."""
        return [self.rows_from(q, self.rank)[1] for q in range(len(self.layout.parts))]

    def bind_group(self, group: str) -> Halo:
        """The same halo, exchanged over `group` (the applier knows the mesh; rules do not)."""
        return dataclasses.replace(self, group=group)


def _empty_start(layout: Layout, r: int) -> int:
    """Where an empty rank's (zero) rows sit: after the rows of the ranks before it."""
    ends = [p[-1][0] + p[-1][1] for p in layout.parts[:r] if p]
    return max(ends, default=0)


def contiguous_in_rank_order(layout: Layout) -> bool:
    """Each rank holds one range (or none), ranks in row order."""
    pos = 0
    for pieces in layout.parts:
        if len(pieces) > 1 or (pieces and pieces[0][0] != pos):
            return False
        pos += sum(n for _, n in pieces)
    return True


def exchange(x: torch.Tensor, halo: Halo) -> torch.Tensor:
    """This rank's rows `x` with the halo rows from the other ranks, in row order: the input rows
    [a, b) of `halo.span(rank)`. Every rank takes part, or none (no padding, no rows)."""
    if halo.pad == 0 or halo.layout.size == 0:
        return x
    d, s = halo.dim, halo.span(halo.rank)[0]
    sends, recv = halo.sends(), halo.receives()
    rows = x.movedim(d, 0)  # [..., S_loc, ...] -> [S_loc, ...]
    parts = [rows.narrow(0, start - s, n) for start, n in sends]
    y = comm.all_to_all(
        torch.cat(parts, 0).contiguous(), recv, [n for _, n in sends], halo.group, "halo"
    )
    before = sum(recv[: halo.rank])
    pieces = [y.narrow(0, 0, before), rows, y.narrow(0, before, y.shape[0] - before)]
    return torch.cat(pieces, 0).movedim(0, d)


def conv_rows(rows: torch.Tensor, halo: Halo, conv: Any, args: tuple[Any, ...]) -> torch.Tensor:
    """The convolution over the gathered rows [a, b), cut to this rank's output rows [s, e)."""
    s, e, a, _ = halo.span(halo.rank)
    if e == s:
        shape = list(halo.out_shape)
        shape[halo.dim] = 0
        return rows.new_zeros(shape)
    out = conv(rows, *args)
    return out.narrow(halo.dim, s - a, e - s)


def halo_convolution(
    x: torch.Tensor, w: torch.Tensor, bias: Any, halo: Halo, *args: Any
) -> torch.Tensor:
    """One rank's rows of `aten.convolution(x_global, w, bias, *args)`."""
    rows = exchange(x, halo)
    return conv_rows(rows, halo, torch.ops.aten.convolution.default, (w, bias, *args))
