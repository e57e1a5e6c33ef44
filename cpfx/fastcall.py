"""Run a rewritten ATen graph eagerly with less host work per op.

An FX graph of ATen ops calls each op as `torch.ops.aten.<op>.<overload>(...)`: an attribute chain
and the boxed dispatcher's generic argument parsing, about 1-2 us per op on a CPU. The single
process's Dynamo graph calls `torch.<op>` / tensor methods instead, whose generated C++ bindings
parse arguments directly (about 0.7 us). At the sizes where the host limits a rank (small
shards, many ops) that difference is most of the rank graph's extra host time.

`fast_module(gm)` returns a copy of the graph whose calls of the overloads listed in `BINDINGS`
go to those bindings instead: the same positional and keyword arguments, the same kernel (each
entry is checked against its overload, value, dtype, shape and strides, in
tests/test_fastcall.py). Collectives and cpfx's own ops are called past their Python autograd
kernels (`below_autograd`). Every other node is left as it is (`aten.split.Tensor`, for one: FX
would name its binding `torch.split`, a Python wrapper with other arguments). The original graph
is not changed (explain, dumps, the verifier and inductor read it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

_V = torch._C._VariableFunctions
_NN = torch._C._nn
_T = torch._C.TensorBase

# overload name -> the C++ binding that parses the same schema (function, nn or method variant).
_NAMES: dict[str, Any] = {
    "add.Tensor": _V.add,
    "addmm.default": _V.addmm,
    "bmm.default": _V.bmm,
    "cat.default": _V.cat,
    "clone.default": _V.clone,
    "cos.default": _V.cos,
    "div.Tensor": _V.div,
    "div.Tensor_mode": _V.div,
    "exp.default": _V.exp,
    "expand.default": _T.expand,
    "gelu.default": _NN.gelu,
    "layer_norm.default": _V.layer_norm,
    "linear.default": _NN.linear,
    "mm.default": _V.mm,
    "mul.Tensor": _V.mul,
    "neg.default": _V.neg,
    "permute.default": _V.permute,
    "pow.Tensor_Scalar": _V.pow,
    "reciprocal.default": _V.reciprocal,
    "reshape.default": _V.reshape,
    "rms_norm.default": _V.rms_norm,
    "rsqrt.default": _V.rsqrt,
    "select.int": _V.select,
    "sigmoid.default": _V.sigmoid,
    "silu.default": _NN.silu,
    "sin.default": _V.sin,
    "split_with_sizes.default": _V.split_with_sizes,
    "squeeze.dim": _V.squeeze,
    "stack.default": _V.stack,
    "sub.Tensor": _V.sub,
    "tanh.default": _V.tanh,
    "transpose.int": _V.transpose,
    "unbind.int": _V.unbind,
    "unsqueeze.default": _V.unsqueeze,
    "view.default": _T.view,
    "where.self": _V.where,
}

BINDINGS: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    getattr(getattr(torch.ops.aten, name.split(".")[0]), name.split(".")[1]): fn
    for name, fn in _NAMES.items()
}


_BELOW_AUTOGRAD_NAMESPACES = ("_c10d_functional", "cpfx")


@functools.cache
def below_autograd(op: torch._ops.OpOverload) -> Callable[..., Any]:
    """`op` called past its autograd kernel. The collectives' and cpfx's ops have autograd kernels
    written in Python (`torch.library`), about 5 us per call even when nothing requires grad; the
    eager runner only runs inference graphs (a call that records autograd compiles the training
    path), where that kernel only forwards to the next one."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args, **kwargs)

    call.__name__ = f"{op.namespace}_{op._opname}_below_autograd"
    call.__qualname__ = call.__name__
    return call


def fast_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` (sharing its parameters and constants) that calls `BINDINGS`, and the
    collectives past their autograd kernels. For inference graphs only."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = gm.graph._codegen  # the same calling convention (boxed, pytree, ...)
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        target = n.target
        if isinstance(target, torch._ops.OpOverloadPacket) and target.overloads() == ["default"]:
            target = target.default  # the lowering's collectives name the packet
        if target in BINDINGS:
            n.target = BINDINGS[target]
        elif (
            isinstance(target, torch._ops.OpOverload)
            and target.namespace in _BELOW_AUTOGRAD_NAMESPACES
        ):
            n.meta["cpfx_op"] = n.target  # error messages name the collective (`op_of`)
            n.target = below_autograd(target)
    return fx.GraphModule(gm, graph)


def op_of(n: fx.Node) -> Any:
    """The op a node of a `fast_module` graph stands for (its target, for any other graph)."""
    return n.meta.get("cpfx_op", n.target)
