"""Collective building blocks that passes splice into graphs.

Each function runs eagerly on tensors and traces into FX nodes through proxies. Collectives are
functional-collective ops issued and waited as two separate nodes (`_c10d_functional.*` then
`wait_tensor`), so scheduling passes can move the wait, and inductor keeps the pair.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist

from cpfx.graph_utils import tag
from cpfx.layout import Layout, merge_runs

log = logging.getLogger(__name__)
C10D = torch.ops._c10d_functional


def take_pieces(x: torch.Tensor, dim: int, pieces: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Concatenate the ranges `(start, length)` of `x` along `dim` (one narrow if contiguous)."""
    runs = merge_runs(pieces)
    parts = [x.narrow(dim, start, n) for start, n in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def all_to_all(
    x: torch.Tensor,
    out_splits: Sequence[int],
    in_splits: Sequence[int],
    group_name: str,
    role: str = "",
) -> torch.Tensor:
    """All-to-all along dim 0 with per-rank row counts; start and wait are separate nodes."""
    t = C10D.all_to_all_single(x, list(out_splits), list(in_splits), group_name)
    tag(t, cpfx_collective="all_to_all", cpfx_role=role)
    return tag(C10D.wait_tensor(t), cpfx_wait=role)


def all_gather_rows(x: torch.Tensor, world: int, group_name: str, role: str = "") -> torch.Tensor:
    """All-gather along dim 0 (equal row counts on every rank), concatenated in rank order."""
    t = C10D.all_gather_into_tensor(x, world, group_name)
    tag(t, cpfx_collective="all_gather", cpfx_role=role)
    return tag(C10D.wait_tensor(t), cpfx_wait=role)


def pad_rows(x: torch.Tensor, rows: int, target: int, ndim: int) -> torch.Tensor:
    """Zero-pad dim 0 of an `ndim`-D tensor from `rows` to `target` rows."""
    if rows == target:
        return x
    return torch.nn.functional.pad(x, (0, 0) * (ndim - 1) + (0, target - rows))


def gather_tokens(
    x: torch.Tensor,
    dim: int,
    layout: Layout,
    ranks: Sequence[int],
    group_name: str,
    shape: Sequence[int],
) -> torch.Tensor:
    """All-gather a token-sharded tensor back to its global order (uneven shards included).

    `shape` is the local shape of `x`; shards are padded to the longest one because gloo rejects
    all-gathers of unequal shapes, then the valid rows are put back in global order.
    """
    sizes = [layout.local_size(r) for r in ranks]
    longest = max(sizes)
    rows = x.movedim(dim, 0).contiguous()  # [..., S_loc, ...] -> [S_loc, ...]
    rows = pad_rows(rows, shape[dim], longest, len(shape))
    full = all_gather_rows(rows, len(ranks), group_name, role="gather")  # [N * S_max, ...]
    located = []
    for i, r in enumerate(ranks):
        off = 0
        for start, n in layout.pieces(r):
            located.append((start, full.narrow(0, i * longest + off, n)))
            off += n
    if all(n == longest for n in sizes) and [s for s, _ in located] == sorted(
        s for s, _ in located
    ):
        return full.movedim(0, dim)  # even shards already in global order: no reordering
    located.sort(key=lambda p: p[0])
    parts = [p for _, p in located]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    return out.movedim(0, dim)


def group_name_of(group: dist.ProcessGroup) -> str:
    return group.group_name
