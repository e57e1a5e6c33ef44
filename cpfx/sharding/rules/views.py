"""Ops that move, cut, join or index dims: views, slices, splits, concatenation, padding, indexing.

Where such an op touches the token dim itself (a slice of the sequence, a concatenation along it,
a view that merges it with the batch), the output layout is derived by exact index arithmetic
(`Layout.select`, `concat`, `repeat`, `factor`) and the local call gets this rank's bounds. When the
result cannot be described as one sharded dim, the rule returns None: the operand is gathered.
Local views are emitted as `reshape`: a rank's shard need not be contiguous where the global
tensor was, and the graph is functional, so a copy instead of an alias changes nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cpfx.sharding.layout import Layout
from cpfx.sharding.placement import REPLICATE, Shard, take_pieces
from cpfx.sharding.rules import (
    Decision,
    OpCall,
    Operand,
    Rule,
    aten,
    norm_dim,
    out_shape,
    out_shapes,
    register,
)


def view_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Split two shapes of equal numel into minimal groups of dims with equal products."""
    if math.prod(a) != math.prod(b):
        return None
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi: list[int] = []
        gj: list[int] = []
        pa = pb = 1
        while True:
            if (
                pa == pb
                and (gi or gj)
                and (pa != 1 or i >= len(a) or j >= len(b) or (a[i] != 1 and b[j] != 1))
            ):
                break
            if (pa <= pb and i < len(a)) or j >= len(b):
                pa *= a[i]
                gi.append(i)
                i += 1
            else:
                pb *= b[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    return groups


def view_layout(
    in_shape: Sequence[int], out_shape_: Sequence[int], d: int, layout: Layout
) -> tuple[int, Layout] | None:
    """(output dim, layout) of a view of a tensor sharded on dim `d`, if one output dim carries
    the sharding exactly (merges with the batch, splits into frames x tokens, ...)."""
    groups = view_groups(in_shape, out_shape_)
    if groups is None:
        return None
    ins, outs = next((gi, gj) for gi, gj in groups if d in gi)
    outer = math.prod(in_shape[i] for i in ins if i < d)
    inner = math.prod(in_shape[i] for i in ins if i > d)
    flat = layout.repeat(outer, inner)
    for k in sorted(outs, key=lambda k: out_shape_[k] == 1):
        o = math.prod(out_shape_[j] for j in outs if j < k)
        n = math.prod(out_shape_[j] for j in outs if j > k)
        got = flat.factor(o, n)
        if got is not None and got.size == out_shape_[k]:
            return k, got
    return None


def _local_shape(shape: Sequence[int], dim: int, layout: Layout, rank: int) -> list[int]:
    local = list(shape)
    local[dim] = layout.local_size(rank)
    return local


def one_sharded(fn: Callable[[OpCall, Operand, Shard], Decision | None]) -> Rule:
    """A rule for ops with a single tensor operand: `fn(call, x, x's Shard)`, called only when
    that operand is sharded (otherwise no rule applies)."""

    @functools.wraps(fn)
    def rule(call: OpCall) -> Decision | None:
        if len(call.operands) != 1 or not isinstance(call.operands[0].placement, Shard):
            return None
        return fn(call, call.operands[0], call.operands[0].placement)

    return rule


@register(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
@one_sharded
def view(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    out = out_shape(call)
    got = view_layout(x.shape, out, sh.dim, sh.layout)
    if got is None:
        return None
    k, layout = got
    local = _local_shape(out, k, layout, call.rank)
    return Decision(
        (x.placement,), Shard(k, layout), args=(x, local), kwargs={}, target=aten.reshape.default
    )


@register(aten.expand.default)
@one_sharded
def expand(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    sizes = list(call.arg(1, "size"))
    od = sh.dim + len(sizes) - x.ndim
    if sizes[od] not in (-1, x.shape[sh.dim]):
        return None
    if sizes[od] != -1:
        sizes[od] = sh.layout.local_size(call.rank)
    return Decision((x.placement,), Shard(od, sh.layout), args=(x, sizes))


@register(aten.unsqueeze.default)
@one_sharded
def unsqueeze(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    k = norm_dim(call.arg(1, "dim"), x.ndim + 1)
    d = sh.dim
    return Decision((x.placement,), Shard(d + (k <= d), sh.layout))


@register(aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims)
@one_sharded
def squeeze(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    dims = call.arg(1, "dim", None)
    if dims is None:
        dims = range(x.ndim)
    elif isinstance(dims, int):
        dims = [dims]
    removed = sorted({norm_dim(k, x.ndim) for k in dims if x.shape[norm_dim(k, x.ndim)] == 1})
    d = sh.dim
    if d in removed:
        return None
    # Name the squeezed dims: a rank's shard may hold one token, and must keep that dim.
    return Decision(
        (x.placement,),
        Shard(d - sum(1 for k in removed if k < d), sh.layout),
        args=(x, removed),
        kwargs={},
        target=aten.squeeze.dims,
    )


@register(aten.permute.default)
@one_sharded
def permute(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    perm = [norm_dim(p, x.ndim) for p in call.arg(1, "dims")]
    return Decision((x.placement,), Shard(perm.index(sh.dim), sh.layout))


@register(aten.transpose.int, aten.t.default)
@one_sharded
def transpose(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    if call.target == aten.t.default:
        d0, d1 = 0, min(1, x.ndim - 1)
    else:
        d0, d1 = norm_dim(call.arg(1, "dim0"), x.ndim), norm_dim(call.arg(2, "dim1"), x.ndim)
    d = sh.dim
    return Decision((x.placement,), Shard(d1 if d == d0 else d0 if d == d1 else d, sh.layout))


@register(aten.view_as_complex.default)
@one_sharded
def view_as_complex(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    """[..., 2] real -> [...] complex: every dim but the last keeps its place."""
    if sh.dim == x.ndim - 1:
        return None
    return Decision((sh,), sh, target=_complex_local)


def _complex_local(x: torch.Tensor) -> torch.Tensor:
    """view_as_complex needs a contiguous last dim and even strides, which a shard may lack."""
    return torch.view_as_complex(x.contiguous())


@register(aten.view_as_real.default)
@one_sharded
def view_as_real(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    return Decision((x.placement,), x.placement)


@register(aten.select.int)
@one_sharded
def select(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    dim, d = norm_dim(call.arg(1, "dim"), x.ndim), sh.dim
    if dim == d:
        return None  # one token: it lives on one rank
    return Decision((x.placement,), Shard(d - (dim < d), sh.layout))


def _bounds(start: Any, end: Any, size: int) -> tuple[int, int]:
    start = 0 if start is None else start
    end = size if end is None else end
    start = max(0, min(size, start + size if start < 0 else start))
    end = max(start, min(size, end + size if end < 0 else end))
    return start, end


def local_slice(x: torch.Tensor, dim: int, runs: list[tuple[int, int]]) -> torch.Tensor:
    """This rank's items of a global slice: its local runs of it, concatenated."""
    return take_pieces(x, dim, runs)


@register(aten.slice.Tensor)
@one_sharded
def slice_(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    dim, d = norm_dim(call.arg(1, "dim", 0), x.ndim), sh.dim
    if dim != d:
        return Decision((x.placement,), x.placement)
    if call.arg(4, "step", 1) != 1:
        return None
    start, end = _bounds(call.arg(2, "start"), call.arg(3, "end"), x.shape[d])
    layout = sh.layout
    runs = layout.local_runs(call.rank, start, end)
    out = Shard(d, layout.select(start, end))
    if len(runs) <= 1:
        lo, n = runs[0] if runs else (0, 0)
        return Decision((x.placement,), out, args=(x, d, lo, lo + n, 1), kwargs={})
    return Decision((x.placement,), out, args=(x, d, runs), kwargs={}, target=local_slice)


def local_split(x: torch.Tensor, dim: int, runs: list[list[tuple[int, int]]]) -> tuple:
    return tuple(take_pieces(x, dim, r) for r in runs)


@register(aten.split.Tensor, aten.split_with_sizes.default)
@one_sharded
def split(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    dim, d = norm_dim(call.arg(2, "dim", 0), x.ndim), sh.dim
    k = len(out_shapes(call))
    if dim != d:
        return Decision((x.placement,), tuple(x.placement for _ in range(k)))
    sizes = [s[d] for s in out_shapes(call)]
    layout, pos, outs, runs = sh.layout, 0, [], []
    for s in sizes:
        outs.append(Shard(d, layout.select(pos, pos + s)))
        runs.append(layout.local_runs(call.rank, pos, pos + s))
        pos += s
    local_pos = 0
    tiles = True
    for r in runs:  # each piece one local run, in order: a plain local split
        if len(r) > 1 or (r and r[0][0] != local_pos):
            tiles = False
        local_pos += sum(n for _, n in r)
    if tiles:
        local_sizes = [sum(n for _, n in r) for r in runs]
        return Decision(
            (x.placement,),
            tuple(outs),
            args=(x, local_sizes, d),
            kwargs={},
            target=aten.split_with_sizes.default,
        )
    return Decision((x.placement,), tuple(outs), args=(x, d, runs), kwargs={}, target=local_split)


@register(aten.unbind.int)
@one_sharded
def unbind(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    dim, d = norm_dim(call.arg(1, "dim", 0), x.ndim), sh.dim
    if dim == d:
        return None
    p = Shard(d - (dim < d), sh.layout)
    return Decision((x.placement,), tuple(p for _ in out_shapes(call)))


@register(aten.cat.default)
def cat(call: OpCall) -> Decision | None:
    out = out_shape(call)
    dim = norm_dim(call.arg(1, "dim", 0), len(out))
    ops = [o for o in call.operands if o.ndim == len(out)]  # legacy empty 1-D operands aside
    if len(ops) != len(call.operands):
        return None
    if any(sh.dim == dim for _, sh in call.sharded):  # along the tokens: layouts concatenate
        even = [Layout.even(o.shape[dim], call.world) for o in ops]
        lays = [o.shard.layout if o.shard and o.shard.dim == dim else e for o, e in zip(ops, even)]
        layout = functools.reduce(Layout.concat, lays)
        return Decision(tuple(Shard(dim, lo) for lo in lays), Shard(dim, layout))
    _, anchor = next(((o, sh) for o, sh in call.sharded if not o.cheap), call.sharded[0])
    return Decision(tuple(anchor for _ in ops), anchor)


@register(aten.stack.default)
def stack(call: OpCall) -> Decision | None:
    x, anchor = next(((o, sh) for o, sh in call.sharded if not o.cheap), call.sharded[0])
    d, layout = anchor.dim, anchor.layout
    k = norm_dim(call.arg(1, "dim", 0), x.ndim + 1)
    return Decision(tuple(Shard(d, layout) for _ in call.operands), Shard(d + (k <= d), layout))


@register(aten.constant_pad_nd.default)
@one_sharded
def constant_pad_nd(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    pad = list(call.arg(1, "pad"))
    d = sh.dim
    i = 2 * (x.ndim - 1 - d)
    if i >= len(pad) or (pad[i] == 0 and pad[i + 1] == 0):
        return Decision((x.placement,), x.placement)
    left, right = pad[i], pad[i + 1]
    if left < 0 or right < 0:
        return None
    w = call.world
    layout = Layout.even(left, w).concat(sh.layout).concat(Layout.even(right, w))
    pad[i] = Layout.even(left, w).local_size(call.rank)
    pad[i + 1] = Layout.even(right, w).local_size(call.rank)
    return Decision((x.placement,), Shard(d, layout), args=(x, pad, *call.args[2:]))


@register(aten.repeat.default)
@one_sharded
def repeat(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    reps = list(call.arg(1, "repeats"))
    od = sh.dim + len(reps) - x.ndim
    if reps[od] != 1:
        return None
    return Decision((x.placement,), Shard(od, sh.layout))


@register(aten.flip.default)
@one_sharded
def flip(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    dims = [norm_dim(k, x.ndim) for k in call.arg(1, "dims")]
    d = sh.dim
    if d not in dims:
        return Decision((x.placement,), x.placement)
    return Decision((x.placement,), Shard(d, sh.layout.reversed()))


@register(aten.roll.default)
@one_sharded
def roll(call: OpCall, x: Operand, sh: Shard) -> Decision | None:
    dims = call.arg(2, "dims", ())
    dims = [norm_dim(k, x.ndim) for k in ([dims] if isinstance(dims, int) else dims)]
    if not dims or sh.dim in dims:
        return None
    return Decision((x.placement,), x.placement)


@register(aten.index.Tensor)
def index(call: OpCall) -> Decision | None:
    """x[..., idx, ...] with one index tensor: an embedding-style lookup when the index carries
    the tokens, a plain gather along another dim when x does."""
    x = call.operands[0]
    indices = list(call.arg(1, "indices"))
    pos = [i for i, t in enumerate(indices) if t is not None]
    if len(pos) != 1 or not isinstance(indices[pos[0]], Operand):
        return None
    p, idx = pos[0], indices[pos[0]]
    if idx.dtype == torch.bool:
        return None
    if x.shard is not None and x.shard.dim != p:
        d = x.shard.dim
        od = d if d < p else d + idx.ndim - 1
        return Decision((x.placement, REPLICATE), Shard(od, x.shard.layout))
    if idx.shard is not None:
        return Decision((REPLICATE, idx.placement), Shard(p + idx.shard.dim, idx.shard.layout))
    return None


@register(aten.index_select.default)
def index_select(call: OpCall) -> Decision | None:
    x, idx = call.operands
    dim = norm_dim(call.arg(1, "dim"), x.ndim)
    if x.shard is not None and x.shard.dim != dim:
        return Decision((x.placement, REPLICATE), x.placement)
    if idx.shard is not None:
        return Decision((REPLICATE, idx.placement), Shard(dim, idx.shard.layout))
    return None


@register(aten.embedding.default)
def embedding(call: OpCall) -> Decision | None:
    w, idx = call.operands[:2]
    if idx.shard is None:
        return None
    return Decision((REPLICATE, idx.placement), idx.placement)


def local_slice_scatter(
    base: torch.Tensor, src: torch.Tensor, dim: int, runs: list[tuple[int, int]]
) -> torch.Tensor:
    """Write `src` (this rank's items of the global region, in local order) into this rank's
    local runs of that region."""
    pos = 0
    for lo, n in runs:
        base = torch.ops.aten.slice_scatter(base, src.narrow(dim, pos, n), dim, lo, lo + n)
        pos += n
    return base


@register(aten.slice_scatter.default)
def slice_scatter(call: OpCall) -> Decision | None:
    """out = base with base[start:end] along `dim` replaced by src (a functional write)."""
    base, src = call.operands
    dim = norm_dim(call.arg(2, "dim", 0), base.ndim)
    step = call.arg(5, "step", 1)
    start, end = _bounds(call.arg(3, "start"), call.arg(4, "end"), base.shape[dim])
    if base.shard is not None:
        d, layout = base.shard.dim, base.shard.layout
    elif src.shard is not None:
        d, layout = src.shard.dim, src.shard.layout
        if d == dim:  # shard the replicated base so that its region holds src's items
            w = call.world
            layout = (
                Layout.even(start, w).concat(layout).concat(Layout.even(base.shape[d] - end, w))
            )
    else:
        return None
    if d != dim:  # sharded along another dim: both sides hold the same items of it
        return Decision((Shard(d, layout), Shard(d, layout)), Shard(d, layout))
    if step != 1:
        return None
    runs = layout.local_runs(call.rank, start, end)
    needs = (Shard(dim, layout), Shard(dim, layout.select(start, end)))
    out = Shard(dim, layout)
    if len(runs) <= 1:
        lo, n = runs[0] if runs else (0, 0)
        return Decision(needs, out, args=(base, src, dim, lo, lo + n, 1), kwargs={})
    return Decision(needs, out, args=(base, src, dim, runs), kwargs={}, target=local_slice_scatter)


def local_select_scatter(
    base: torch.Tensor, src: torch.Tensor, dim: int, index: int | None
) -> torch.Tensor:
    """Write the replicated row `src` at local position `index` (None: not on this rank)."""
    if index is None:
        return base
    return torch.ops.aten.select_scatter(base, src, dim, index)


@register(aten.select_scatter.default)
def select_scatter(call: OpCall) -> Decision | None:
    """out = base with the row `index` along `dim` replaced by src (one dim fewer)."""
    base, src = call.operands
    dim = norm_dim(call.arg(2, "dim"), base.ndim)
    index = norm_dim(call.arg(3, "index"), base.shape[dim])
    if base.shard is None:  # src sharded: shard base alike (its dim has the same length)
        if src.shard is None:
            return None
        e = src.shard.dim
        p = Shard(e + (dim <= e), src.shard.layout)
        return Decision((p, src.placement), p)
    d, layout = base.shard.dim, base.shard.layout
    if d != dim:
        return Decision((base.placement, Shard(d - (dim < d), layout)), base.placement)
    runs = layout.local_runs(call.rank, index, index + 1)
    return Decision(
        (base.placement, REPLICATE),
        base.placement,
        args=(base, src, dim, runs[0][0] if runs else None),
        kwargs={},
        target=local_select_scatter,
    )


@register(
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
)
def new_factory(call: OpCall) -> Decision | None:
    """A new tensor of a given (global) size: only the operand's dtype and device are read."""
    return Decision(call.keep(), REPLICATE)


@register(aten._assert_tensor_metadata.default)
def assert_metadata(call: OpCall) -> Decision | None:
    """A check of the global size and stride: on a shard, keep only dtype and device."""
    kw = {k: v for k, v in call.kwargs.items() if k in ("dtype", "device", "layout")}
    return Decision(call.keep(), REPLICATE, args=call.args[:1], kwargs=kw)
