"""Which ops are token-wise, and where a token dimension goes through them.

`out_dim(node, arg, d)` answers: if input `arg` carries the token sequence on dim `d`, which dim of
`node`'s output carries it (None: the op mixes tokens, or we cannot tell; a list for tuple
outputs). The analysis (backward, to find where tokens start) and the rewrite (forward) both use
it; unknown ops answer None, which is always safe: the rewrite then gathers before the op.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from cpfx.graph_utils import is_sdpa, op_name, sdpa_args, val

# Ops whose output element depends only on the same element of each (broadcast) input.
_POINTWISE_EXTRA = {
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "neg",
    "pow",
    "abs",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and_",
    "or_",
    "xor",
    "invert",
    "not_",
    "float",
    "double",
    "half",
    "bfloat16",
    "int",
    "long",
    "bool",
    "to",
    "type",
    "contiguous",
    "clone",
    "detach",
    "dropout",
    "gelu",
    "silu",
    "relu",
    "sigmoid",
    "tanh",
    "exp",
    "log",
    "cos",
    "sin",
    "rsqrt",
    "sqrt",
    "where",
    "masked_fill",
    "clamp",
    "clamp_min",
    "clamp_max",
    "erf",
    "reciprocal",
    "square",
    "logical_not",
    "logical_and",
    "logical_or",
    "type_as",
    "mish",
    "softplus",
    "leaky_relu",
    "hardswish",
    "elu",
    "lerp",
    "nan_to_num",
    "sign",
    "addcmul",
    "addcdiv",
    "float_power",
    "real",
    "imag",
}
_LIKE_FACTORIES = {"empty_like", "zeros_like", "ones_like", "full_like"}
_SHAPE_ONLY_ARGS = {"type_as": (1,)}  # args whose values are not read, only their dtype


@functools.cache
def is_pointwise_name(name: str) -> bool:
    if name in _POINTWISE_EXTRA:
        return True
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return False
    try:
        return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())
    except Exception:  # noqa: BLE001 - an odd packet is simply not pointwise
        return False


def shape_of(n: Any) -> tuple[int, ...] | None:
    v = val(n)
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def data_args(node: fx.Node) -> list[fx.Node]:
    """Tensor inputs whose values (not just dtype) the op reads."""
    name = op_name(node)
    skip = _SHAPE_ONLY_ARGS.get(name, ())
    out = []
    for i, a in enumerate(node.args):
        if i in skip:
            continue
        for x in _flatten(a):
            if isinstance(x, fx.Node) and isinstance(val(x), torch.Tensor):
                out.append(x)
    for a in node.kwargs.values():
        for x in _flatten(a):
            if isinstance(x, fx.Node) and isinstance(val(x), torch.Tensor):
                out.append(x)
    return out


def _flatten(a: Any) -> list[Any]:
    if isinstance(a, (list, tuple)):
        return [y for x in a for y in _flatten(x)]
    return [a]


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def shape_args(node: fx.Node) -> list[int]:
    """The target shape of view/reshape/expand/repeat, given as varargs or one sequence."""
    rest = node.args[1:]
    if "size" in node.kwargs or "shape" in node.kwargs:
        rest = (node.kwargs.get("size", node.kwargs.get("shape")),)
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        return list(rest[0])
    return list(rest)


def view_dim(in_shape: Sequence[int], out_shape: Sequence[int], d: int) -> int | None:
    """Where dim `d` of `in_shape` goes through a view to `out_shape`, if it stays whole."""
    groups = _view_groups(in_shape, out_shape)
    if groups is None:
        return None
    for ins, outs in groups:
        if d in ins:
            big_in = [i for i in ins if in_shape[i] != 1]
            big_out = [o for o in outs if out_shape[o] != 1]
            if big_in == [d] and len(big_out) == 1 and out_shape[big_out[0]] == in_shape[d]:
                return big_out[0]
            return None
    return None


def _view_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Split two shapes of equal numel into minimal groups of dims with equal products."""
    if math.prod(a) != math.prod(b):
        return None
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj = [], []
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


def resolve_view_shape(shape: Sequence[int], numel: int) -> list[int]:
    shape = list(shape)
    if -1 in shape:
        k = shape.index(-1)
        rest = math.prod(s for s in shape if s != -1)
        shape[k] = numel // rest if rest else 0
    return shape


def index_dim(in_ndim: int, idx: Any, d: int) -> tuple[int | None, Any]:
    """For `x[idx]` with tokens on dim `d`: (output dim, the index entry applied to dim d).

    Returns (None, None) if tokens are indexed by an int or a tensor (cannot stay sharded)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, fx.Node) or isinstance(i, torch.Tensor) for i in idx):
        return None, None
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in idx:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (in_ndim - n_real))
        else:
            expanded.append(i)
    while sum(1 for i in expanded if i is not None) < in_ndim:
        expanded.append(slice(None))
    src = out = 0
    for i in expanded:
        if i is None:
            out += 1
            continue
        if src == d:
            if isinstance(i, slice):
                return out, i
            return None, None
        if isinstance(i, slice):
            out += 1
        src += 1
    return None, None


def out_dim(node: fx.Node, a: fx.Node, d: int) -> int | list[int | None] | None:
    """Output dim carrying the tokens when input `a` carries them on dim `d` (see module doc)."""
    name = op_name(node)
    in_shape = shape_of(a)
    o_shape = shape_of(node)
    if in_shape is None:
        return None
    nd = len(in_shape)
    if is_sdpa(node):
        return 2 if sdpa_args(node)["query"] is a and d == 2 else None
    if name in _LIKE_FACTORIES:
        return d if node.args and node.args[0] is a else None
    if name in ("linear",):
        return d if node.args[0] is a and d < nd - 1 else None
    if name in ("layer_norm", "rms_norm", "group_norm_feature"):
        if node.args[0] is not a:
            return None
        k = len(_as_list(arg(node, 1, "normalized_shape")))
        return d if d < nd - k else None
    if name in ("softmax", "log_softmax", "cumsum", "normalize"):
        if node.args[0] is not a:
            return None
        dim = arg(node, 1, "dim", -1 if name == "normalize" else None)
        if name == "normalize":
            dim = arg(node, 2, "dim", 1)
        return d if dim is not None and norm_dim(dim, nd) != d else None
    if name in ("mean", "sum", "amax", "amin", "any", "all", "std", "var", "norm", "max", "min"):
        return _reduce_dim(node, a, d, nd)
    if name in ("chunk", "split", "split_with_sizes", "unbind", "tensor_split"):
        if node.args[0] is not a or o_shape is not None:
            return None
        default = 0
        dim = norm_dim(arg(node, 2 if name != "unbind" else 1, "dim", default), nd)
        if dim == d:
            return None  # splitting along tokens: handled with layouts by the rewrite
        n_out = len(val(node))
        od = d - 1 if (name == "unbind" and dim < d) else d
        return [od] * n_out
    if name == "repeat_interleave":
        dim = arg(node, 2, "dim")
        return d if node.args[0] is a and dim is not None and norm_dim(dim, nd) != d else None
    if name == "outer":
        return 0 if node.args[0] is a and d == 0 else (1 if node.args[1] is a and d == 0 else None)
    if name in ("matmul", "bmm") and node.args[0] is a and o_shape is not None:
        other = shape_of(node.args[1])
        if other is not None and len(other) <= 2 and d < nd - 1:
            return d + len(o_shape) - nd
        return None
    if name == "view_as_complex":
        return d if d < nd - 1 else None
    if name == "view_as_real":
        return d
    if name in ("view", "reshape"):
        if node.args[0] is not a or o_shape is None:
            return None
        return view_dim(in_shape, o_shape, d)
    if name in ("permute",):
        perm = [norm_dim(p, nd) for p in shape_args(node)]
        return perm.index(d)
    if name in ("transpose", "swapaxes"):
        d0, d1 = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
        return d1 if d == d0 else d0 if d == d1 else d
    if name == "movedim":
        if o_shape is None:
            return None
        perm = list(range(nd))
        src, dst = norm_dim(node.args[1], nd), norm_dim(node.args[2], len(o_shape))
        perm.pop(src)
        perm.insert(dst, src)
        return perm.index(d)
    if name == "unsqueeze":
        k = norm_dim(arg(node, 1, "dim"), nd + 1)
        return d + 1 if k <= d else d
    if name == "squeeze":
        if o_shape is None:
            return None
        dims = arg(node, 1, "dim")
        dims = range(nd) if dims is None else [norm_dim(x, nd) for x in _as_list(dims)]
        removed = [x for x in dims if in_shape[x] == 1]
        return None if d in removed else d - sum(1 for x in removed if x < d)
    if name == "flatten":
        s = norm_dim(arg(node, 1, "start_dim", 0), nd)
        e = norm_dim(arg(node, 2, "end_dim", -1), nd)
        if d < s:
            return d
        if d > e:
            return d - (e - s)
        others = [i for i in range(s, e + 1) if i != d and in_shape[i] != 1]
        return s if not others else None
    if name == "unflatten":
        k = norm_dim(node.args[1], nd)
        sizes = _as_list(node.args[2])
        if d < k:
            return d
        if d > k:
            return d + len(sizes) - 1
        o = o_shape or ()
        big = [i for i in range(k, k + len(sizes)) if o[i] != 1]
        return big[0] if len(big) == 1 and o[big[0]] == in_shape[d] else None
    if name in ("expand", "repeat"):
        if o_shape is None:
            return None
        od = d + len(o_shape) - nd
        if name == "repeat" and shape_args(node)[od] != 1:
            return None
        return od
    if name == "getitem":
        if node.args[0] is not a:
            return None
        od, _ = index_dim(nd, node.args[1], d)
        return od  # slices along tokens are checked against the layout by the rewrite
    if name in ("cat", "concat", "concatenate"):
        return d
    if name == "stack":
        k = norm_dim(arg(node, 1, "dim", 0), nd + 1)
        return d + 1 if k <= d else d
    if name == "pad_sequence":
        # Stacks the sequences along a new batch dim, padding their dim 0 to the longest: token-wise
        # along dim 0 only when nothing is padded (equal lengths: batch 1, or equal prompts).
        seqs = _as_list(arg(node, 0, "sequences"))
        if o_shape is None or not any(s is a for s in seqs):
            return None
        batch_first = bool(arg(node, 1, "batch_first", False))
        if d == 0:
            longest = o_shape[1 if batch_first else 0]
            if any(shape_of(s) is None or shape_of(s)[0] != longest for s in seqs):
                return None
            return 1 if batch_first else 0
        return d + 1
    if is_pointwise_name(name) and o_shape is not None and a in data_args(node):
        return d + len(o_shape) - nd
    return None


def _reduce_dim(node: fx.Node, a: fx.Node, d: int, nd: int) -> int | list | None:
    if node.args[0] is not a:
        return None
    dims = arg(node, 1, "dim")
    if dims is None:
        return None
    dims = [norm_dim(x, nd) for x in _as_list(dims)]
    if d in dims:
        return None
    keep = arg(node, 2, "keepdim", False)
    od = d if keep else d - sum(1 for x in dims if x < d)
    if op_name(node) in ("max", "min") and not isinstance(val(node), torch.Tensor):
        return [od, od]  # (values, indices)
    return od


def _as_list(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple, torch.Size)):
        return list(x)
    return [x]


def is_inplace(node: fx.Node) -> bool:
    name = op_name(node)
    return (
        name == "setitem"
        or (node.op == "call_method" and name.endswith("_") and not name.startswith("_"))
        or name in ("iadd", "imul", "isub", "itruediv")
    )
