"""Collective building blocks that passes splice into graphs.

Each function runs eagerly on tensors and traces into FX nodes through proxies. Collectives are
functional-collective ops issued and waited as two separate nodes (`_c10d_functional.*` then
`wait_tensor`), so scheduling passes can move the wait, and inductor keeps the pair.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from cpfx.graph_utils import tag
from cpfx.sharding.layout import Layout

log = logging.getLogger(__name__)
C10D = torch.ops._c10d_functional


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


def all_reduce(x: torch.Tensor, op: str, group_name: str, role: str = "reduce") -> torch.Tensor:
    """The ranks' parts of a partial value reduced (`op`: "sum", "max", "min") on every rank."""
    t = C10D.all_reduce(x.contiguous(), op, group_name)
    tag(t, cpfx_collective="all_reduce", cpfx_role=role)
    return tag(C10D.wait_tensor(t), cpfx_wait=role)


def gathers_by_all_to_all(device_type: str, group_name: str) -> bool:
    """Whether an all-gather must be sent as an all-to-all: gloo on CUDA tensors. torch 2.11's
    gloo crashed the process (SIGSEGV) in `all_gather_into_tensor` on CUDA tensors on an H200,
    while its CUDA all-to-all worked (two ranks sharing one GPU, the only way to run several ranks
    on one GPU since NCCL refuses two ranks on a device)."""
    if device_type == "cpu":
        return False
    from torch.distributed.distributed_c10d import _resolve_process_group

    # A group's name (torch's `GroupName` is a NewType of str that older torch lacks).
    return dist.get_backend(_resolve_process_group(group_name)) == "gloo"  # type: ignore[arg-type]


def all_gather_rows(
    x: torch.Tensor,
    world: int,
    group_name: str,
    role: str = "",
    *,
    shape: Sequence[int],
    device_type: str,
) -> torch.Tensor:
    """All-gather along dim 0 (equal row counts on every rank), concatenated in rank order.
    `shape` and `device_type` describe `x` (an FX proxy when traced into a graph)."""
    if gathers_by_all_to_all(device_type, group_name):
        # Every rank sends its block to each rank: the same bytes, the same result.
        rows = shape[0]
        t = C10D.all_to_all_single(
            x.repeat(world, *[1] * (len(shape) - 1)), [rows] * world, [rows] * world, group_name
        )
    else:
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
    device_type: str,
) -> torch.Tensor:
    """All-gather a token-sharded tensor back to its global order (uneven shards included).

    `shape` is the local shape of `x`; shards are padded to the longest one because gloo rejects
    all-gathers of unequal shapes, then the valid rows are put back in global order. Ranks with no
    tokens take part with zero valid rows; a sequence of no tokens at all needs no exchange.
    """
    sizes = [layout.local_size(r) for r in ranks]
    longest = max(sizes)
    if longest == 0:
        return x  # zero tokens everywhere: the global tensor is the (empty) local one
    rows = x.movedim(dim, 0).contiguous()  # [..., S_loc, ...] -> [S_loc, ...]
    rows = pad_rows(rows, shape[dim], longest, len(shape))
    gathered = [longest, *shape[:dim], *shape[dim + 1 :]]
    full = all_gather_rows(
        rows, len(ranks), group_name, "gather", shape=gathered, device_type=device_type
    )  # [N * S_max, ...]
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
    if not parts:
        return full.narrow(0, 0, 0).movedim(0, dim)
    out = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    return out.movedim(0, dim)


def gather_contiguous(x: torch.Tensor, *args: Any) -> torch.Tensor:
    """`gather_tokens`, contiguous with the standard strides of its shape (size-1 dims included):
    it stands for a value of the single process that may have been (a later `view` must work, and
    a caller compiled for the single process's strides, as Dynamo guards them, sees the same)."""
    out = gather_tokens(x, *args).contiguous()
    return out.view(out.shape)
