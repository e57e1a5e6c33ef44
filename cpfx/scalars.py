"""Dynamo's unspecialized Python floats (LoRA scales, ...) as graph inputs instead of recompiles.

Dynamo passes a float that changed between calls as a 0-d float64 tensor input and calls `.item()`
on it in the graph. `tensorify_float_inputs` (run on each captured graph before cpfx's passes)
drops the `.item()` where the number only scales or shifts floating tensors, so the passes see
tensors only; any other use makes Dynamo restart and specialize that float.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from cpfx.errors import UnsupportedPatternError

# ---------------------------------------------------------------------------------------------

_SCALAR_OPS = {
    operator.mul,
    operator.truediv,
    operator.add,
    operator.sub,
    operator.neg,
    operator.pos,
    torch.mul,
    torch.add,
    torch.sub,
    torch.div,
    torch.true_divide,
}
_SCALAR_METHODS = {
    "mul",
    "add",
    "sub",
    "div",
    "__mul__",
    "__rmul__",
    "__add__",
    "__radd__",
    "__sub__",
    "__rsub__",
    "__truediv__",
    "__rtruediv__",
    "neg",
}


def tensorify_float_inputs(gm: fx.GraphModule) -> None:
    """Make Dynamo's unspecialized Python floats plain 0-d float64 tensor inputs of the graph.

    Dynamo passes a float that changed between calls (a LoRA scale) as a 0-d float64 tensor and
    calls `.item()` on it in the graph. Where the resulting number only scales or shifts floating
    tensors (+, -, *, / with a tensor of >= 1 dim, possibly after arithmetic with Python numbers),
    `.item()` is dropped and the 0-d tensor is used directly: the same values (a CPU 0-d tensor
    operand is read like a Python scalar), and the graph holds only tensors. Any other use (shapes,
    comparisons, math functions) makes Dynamo restart and specialize that float instead (a
    recompile per value, as with `dynamic=False`)."""
    targets = []
    for p in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        ev = p.meta.get("example_value")
        memo = getattr(ev, "item_memo", None)
        if not isinstance(ev, torch.Tensor) or memo is None:
            continue
        items = [u for u in p.users if u.op == "call_method" and u.target == "item"]
        if len(items) != len(p.users) or not all(_scalar_uses_ok(u) for u in items):
            _specialize_and_restart(memo)
        targets.append((p, items))
    if not targets:
        return
    for p, items in targets:
        for u in items:
            u.replace_all_uses_with(p)
            gm.graph.erase_node(u)
    _refresh_example_values(gm, [n for p, _ in targets for n in _scalar_chain(p)])
    gm.graph.lint()
    gm.recompile()


def _scalar_chain(p: fx.Node) -> list[fx.Node]:
    out, todo = [], list(p.users)
    while todo:
        n = todo.pop()
        if n in out:
            continue
        out.append(n)
        if not isinstance(n.meta.get("example_value"), torch.Tensor):
            todo.extend(n.users)
    return out


def _scalar_uses_ok(item: fx.Node) -> bool:
    for u in item.users:
        ok_op = (u.op == "call_function" and u.target in _SCALAR_OPS) or (
            u.op == "call_method" and u.target in _SCALAR_METHODS
        )
        if not ok_op or u.kwargs:
            return False
        ev = u.meta.get("example_value")
        if isinstance(ev, torch.Tensor):
            if not ev.is_floating_point() or ev.dim() == 0:
                return False  # a 0-d float64 operand would change a 0-d result's dtype
            for a in u.args:
                if isinstance(a, fx.Node) and a is not item:
                    av = a.meta.get("example_value")
                    if not isinstance(av, torch.Tensor) or av.dim() == 0:
                        return False
        elif isinstance(ev, (torch.SymFloat, float)):
            if any(isinstance(a, fx.Node) and a is not item for a in u.args):
                return False
            if not _scalar_uses_ok(u):
                return False
        else:
            return False
    return bool(item.users)


def _specialize_and_restart(memo: Any) -> None:
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis
    from torch._dynamo.symbolic_convert import TensorifyState

    name = getattr(getattr(memo.node, "_expr", None), "name", None)
    if name is None:
        raise UnsupportedPatternError(
            "cpfx: a Python float input is used in a way cpfx cannot turn into a tensor input"
        )
    TensorifyState.specialize(name)
    raise TensorifyScalarRestartAnalysis


def _refresh_example_values(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fake_mode = None
    for n in gm.graph.nodes:
        ev = n.meta.get("example_value")
        if isinstance(ev, torch.Tensor) and hasattr(ev, "fake_mode"):
            fake_mode = ev.fake_mode
            break
    if fake_mode is None:
        return

    def val(a: Any) -> Any:
        return a.meta.get("example_value") if isinstance(a, fx.Node) else a

    with fake_mode:
        for n in sorted(set(nodes), key=order.__getitem__):
            args = fx.node.map_aggregate(n.args, val)
            kwargs = fx.node.map_aggregate(n.kwargs, val)
            if n.op == "call_method":
                v = getattr(args[0], str(n.target))(*args[1:], **kwargs)
            else:
                assert callable(n.target), n.format_node()
                v = n.target(*args, **kwargs)
            n.meta["example_value"] = v
            if "val" in n.meta:
                n.meta["val"] = v
