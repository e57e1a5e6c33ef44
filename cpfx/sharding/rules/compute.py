"""Matmuls, normalizations, reductions and scans: token-wise exactly when they do not reduce, mix or
contract over the token dim. A sum, mean, amax or amin over the tokens, and a matmul contracting
over them (linear attention's K^T V), run on each rank's shard and give a `Partial` value that an
all-reduce completes (the order of the sum changes; the result stays within rounding). Other
reductions over the tokens (var, logsumexp, prod, argmax, ...) get their operand gathered, so
every rank reduces over all tokens, as the single process.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cpfx.halo import Halo, contiguous_in_rank_order, halo_convolution
from cpfx.sharding.placement import REPLICATE, Partial, Shard
from cpfx.sharding.rules import (
    Decision,
    OpCall,
    Operand,
    aten,
    n_outputs,
    norm_dim,
    out_shape,
    register,
)


def _rows(call: OpCall, x_index: int, contract: int) -> Decision | None:
    """An op token-wise in operand `x_index` along every dim but `contract` (which the op
    contracts or normalizes over); every other operand replicated."""
    x = call.operands[x_index]
    if x.shard is None or x.shard.dim in contract_dims(x, contract):
        return None
    if any(o.shard is not None for i, o in enumerate(call.operands) if i != x_index):
        return None
    needs = tuple(x.placement if i == x_index else REPLICATE for i in range(len(call.operands)))
    k = n_outputs(call)
    return Decision(needs, x.placement if k is None else tuple(x.placement for _ in range(k)))


def contract_dims(x: Operand, last: int) -> range:
    """The trailing `last` dims of x."""
    return range(x.ndim - last, x.ndim)


@register(aten.linear.default)
def linear(call: OpCall) -> Decision | None:
    return _rows(call, 0, 1)


@register(aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default)
def layer_norm(call: OpCall) -> Decision | None:
    return _rows(call, 0, len(call.arg(1, "normalized_shape")))


def _rows_or_columns(a: Operand, b: Operand, rows: int) -> Decision | None:
    """a @ b where a is sharded along its rows (dim `rows`) or b along its columns (`rows` + 1):
    each rank multiplies its rows (columns) by the whole other matrix."""
    if a.shard is not None and a.shard.dim == rows:
        return Decision((a.placement, REPLICATE), a.placement)
    if b.shard is not None and b.shard.dim == rows + 1:
        return Decision((REPLICATE, b.placement), b.placement)
    return None


@register(aten.mm.default)
def mm(call: OpCall) -> Decision | None:
    a, b = call.operands
    return _contracted(a, b, 0) or _rows_or_columns(a, b, 0)


@register(aten.addmm.default)
def addmm(call: OpCall) -> Decision | None:
    bias, a, b = call.operands
    if a.shard is not None and a.shard.dim == 0:
        layout, out_dim = a.shard.layout, 0
    elif b.shard is not None and b.shard.dim == 1:
        layout, out_dim = b.shard.layout, 1
    else:
        return None
    k = out_dim - (2 - bias.ndim)  # bias broadcasts to [M, N]
    bias_need = Shard(k, layout) if k >= 0 and bias.shape[k] == layout.size else REPLICATE
    if out_dim == 0:
        return Decision((bias_need, a.placement, REPLICATE), a.placement)
    return Decision((bias_need, REPLICATE, b.placement), b.placement)


def _contracted(a: Operand, b: Operand, rows: int) -> Decision | None:
    """a @ b with a sharded along its columns (dim `rows` + 1) and b along its rows (`rows`) by
    the same layout: each rank's product over its part of the contracted dim is a partial sum."""
    sa, sb = a.shard, b.shard
    if sa is None or sb is None or sa.dim != rows + 1 or sb.dim != rows or sa.layout != sb.layout:
        return None
    return Decision((a.placement, b.placement), Partial("sum"), rule="contract_partial")


def _bmm(a: Operand, b: Operand) -> Decision | None:
    """[Bt, M, K] @ [Bt, K, N]: token-wise in the batch, the rows of a, or the columns of b; a
    partial sum when both are sharded along K."""
    for x in (a, b):
        if x.shard is not None and x.shard.dim == 0:
            p = Shard(0, x.shard.layout)
            return Decision((p, p), p)
    return _contracted(a, b, 1) or _rows_or_columns(a, b, 1)


@register(aten.bmm.default)
def bmm(call: OpCall) -> Decision | None:
    a, b = call.operands
    return _bmm(a, b)


@register(aten.group_norm.default)
def batch_parallel_only(call: OpCall) -> Decision | None:
    """A group norm normalizes over all positions of one sample: token-wise only along the
    batch."""
    x = call.operands[0]
    if x.shard is None or x.shard.dim != 0 or any(o.shard for o in call.operands[1:]):
        return None
    return Decision((x.placement, *(REPLICATE for _ in call.operands[1:])), x.placement)


@register(aten.convolution.default)
def convolution(call: OpCall) -> Decision | None:
    """Along the batch: local. Along a spatial dim, for a stride-1 convolution that keeps the
    length ("same" padding): each rank convolves its rows plus a halo of `padding` rows from its
    neighbours (`cpfx.halo`). Anything else mixes rows across shards: gathered."""
    x = call.operands[0]
    if x.shard is None or any(o.shard for o in call.operands[1:]):
        return None
    if x.shard.dim == 0:
        return batch_parallel_only(call)
    (_, w, _), args = call.args[:3], call.args[3:]
    stride, padding, dilation, transposed = args[:4]
    j = x.shard.dim - 2
    if transposed or j < 0 or stride[j] != 1:
        return None
    k, p, dil = w.shape[x.shard.dim], padding[j], dilation[j]
    if 2 * p != dil * (k - 1) or not contiguous_in_rank_order(x.shard.layout):
        return None
    halo = Halo(x.shard.dim, x.shard.layout, p, call.rank, out_shape(call))
    needs = (x.placement, *(REPLICATE for _ in call.operands[1:]))
    return Decision(needs, x.placement, args=(*call.args[:3], halo, *args), kwargs={},
                    target=halo_convolution, rule="convolution_halo" if p else "convolution_rows")


def _along(call: OpCall, dims: list[int] | None, keepdim: bool) -> Decision | None:
    """One operand reduced/scanned along `dims` (None: all dims): token-wise if the token dim is
    not among them. Other operands (none usually) must be replicated."""
    x = call.operands[0]
    if x.shard is None or any(o.shard for o in call.operands[1:]):
        return None
    d = x.shard.dim
    if dims is None or d in dims:
        return None
    od = d if keepdim else d - sum(1 for k in dims if k < d)
    p = Shard(od, x.shard.layout)
    needs = (x.placement, *(REPLICATE for _ in call.operands[1:]))
    k = n_outputs(call)
    return Decision(needs, p if k is None else tuple(p for _ in range(k)))


def _dims(call: OpCall, i: int, name: str) -> list[int] | None:
    x = call.operands[0]
    dims = call.arg(i, name, None)
    if dims is None:
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:  # an empty dim list reduces over every dim
        return None
    return [norm_dim(k, max(x.ndim, 1)) for k in dims]


@register(aten.any.dims, aten.logsumexp.default)
def reduce_dims(call: OpCall) -> Decision | None:
    return _along(call, _dims(call, 1, "dim"), bool(call.arg(2, "keepdim", False)))


_PARTIAL_OP = {
    aten.sum.dim_IntList: "sum",
    aten.mean.dim: "sum",
    aten.amax.default: "max",
    aten.amin.default: "min",
}


@register(*_PARTIAL_OP)
def reduce_partial(call: OpCall) -> Decision | None:
    """Along other dims: token-wise. Over the token dim (among others): each rank reduces its
    shard, a partial value (a mean divides its partial sum by the global count; an empty shard
    gives the reduction's identity)."""
    dims, keepdim = _dims(call, 1, "dim"), bool(call.arg(2, "keepdim", False))
    d = _along(call, dims, keepdim)
    x = call.operands[0]
    if d is not None or x.shard is None or any(o.shard for o in call.operands[1:]):
        return d
    dims = list(range(x.ndim)) if dims is None else dims  # none given: every dim
    count = math.prod(x.shape[k] for k in dims)
    empty = x.shard.layout.local_size(call.rank) == 0  # its identity, of the output's shape
    args = (x, dims, keepdim, call.target, count, call.kwargs.get("dtype"),
            call.out if empty else None)
    needs = (x.placement, *(REPLICATE for _ in call.operands[1:]))
    return Decision(needs, Partial(_PARTIAL_OP[call.target]), args=args, kwargs={},
                    target=local_reduce, rule="reduce_partial")


def local_reduce(
    x: torch.Tensor,
    dims: list[int],
    keepdim: bool,
    op: Any,
    count: int,
    dtype: Any,
    empty_shape: tuple[int, ...] | None,
) -> torch.Tensor:
    """One rank's part of a reduction over dims that include the sharded one (`empty_shape`:
    this rank's shard is empty, and a max or min gives its identity of that shape)."""
    if op is aten.mean.dim:
        return torch.ops.aten.sum.dim_IntList(x, dims, keepdim, dtype=dtype) / count
    if op is aten.sum.dim_IntList:
        return torch.ops.aten.sum.dim_IntList(x, dims, keepdim, dtype=dtype)
    if empty_shape is not None:
        floating = x.dtype.is_floating_point
        info = torch.finfo(x.dtype) if floating else torch.iinfo(x.dtype)
        if op is aten.amin.default:
            fill = math.inf if floating else info.max
        else:
            fill = -math.inf if floating else info.min
        return x.new_full(list(empty_shape), fill)
    return op(x, dims, keepdim)


@register(aten.any.dim, aten.all.dim, aten.prod.dim_int, aten.argmax.default, aten.argmin.default)
def reduce_dim(call: OpCall) -> Decision | None:
    if call.arg(1, "dim", None) is None:
        return None
    return _along(call, _dims(call, 1, "dim"), bool(call.arg(2, "keepdim", False)))


@register(aten.max.dim, aten.min.dim)
def reduce_dim_pair(call: OpCall) -> Decision | None:
    return _along(call, _dims(call, 1, "dim"), bool(call.arg(2, "keepdim", False)))


@register(aten.var.correction, aten.std.correction, aten.var_mean.correction)
def var(call: OpCall) -> Decision | None:
    return _along(call, _dims(call, 1, "dim"), bool(call.kwargs.get("keepdim", False)))


@register(aten.linalg_vector_norm.default)
def vector_norm(call: OpCall) -> Decision | None:
    return _along(call, _dims(call, 2, "dim"), bool(call.arg(3, "keepdim", False)))


@register(
    aten._softmax.default,
    aten._log_softmax.default,
    aten._safe_softmax.default,
    aten.cumsum.default,
    aten.cumprod.default,
    aten.logcumsumexp.default,
    aten.sort.default,
    aten.argsort.default,
)
def along_dim(call: OpCall) -> Decision | None:
    """Softmax, scans and sorts: token-wise unless they run along the tokens."""
    default = -1 if call.target in (aten.sort.default, aten.argsort.default) else None
    if call.arg(1, "dim", default) is None:
        return None
    return _along(call, _dims(call, 1, "dim") or [norm_dim(-1, call.operands[0].ndim)], True)


@register(aten.topk.default)
def topk(call: OpCall) -> Decision | None:
    return _along(call, [norm_dim(call.arg(2, "dim", -1), call.operands[0].ndim)], True)
