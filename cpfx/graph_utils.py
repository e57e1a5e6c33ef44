"""Small FX helpers shared by the passes: argument normalisation, splicing, metadata."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.fx as fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

SDPA_PARAMS = (
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "is_causal",
    "scale",
    "enable_gqa",
)
SDPA_DEFAULTS: dict[str, Any] = {
    "attn_mask": None,
    "dropout_p": 0.0,
    "is_causal": False,
    "scale": None,
    "enable_gqa": False,
}


def sdpa_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """SDPA arguments by name whether the model passed them positionally or as keywords."""
    out = dict(SDPA_DEFAULTS)
    out.update(zip(SDPA_PARAMS, args))
    out.update(kwargs)
    return out


def val(n: Any) -> Any:
    """The example (fake) value of a node, or the object itself if it is not a node."""
    if isinstance(n, fx.Node):
        return n.meta.get("val", n.meta.get("example_value"))
    return n


def where(n: fx.Node) -> str:
    """`module.path (file:line)` of the model code a node came from, for messages."""
    if n.op == "placeholder" and "cpfx_input" in n.meta:
        return f"input {n.meta['cpfx_input']}"
    stack = n.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        path = list(stack.values())[-1][0]
        path = re.sub(r"(__dict__)?\['_modules'\]\['([^']+)'\]", r".\2", path)
        path = re.sub(r"^(L\['self'\]|L__self___)?\.?", "", path).replace("..", ".")
    trace = (n.meta.get("stack_trace") or "").strip().splitlines()
    line = trace[-2].strip() if len(trace) >= 2 else ""
    return f"{path or n.name} ({line})" if line else (path or n.name)


def module_path(n: fx.Node) -> str:
    """The dotted path of the innermost module a node came from ('' if unknown)."""
    return where(n).split(" (")[0] if n.meta.get("nn_module_stack") else ""


def is_mutating(n: fx.Node) -> bool:
    """Whether the op writes into one of its arguments (its schema says so). Graphs cpfx plans on
    are functional, so only ops cpfx itself might add could; this keeps the scheduler honest."""
    schema = getattr(n.target, "_schema", None)
    if n.op != "call_function" or schema is None:
        return False
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def copy_origin_meta(new: fx.Node, origin: fx.Node, pass_name: str) -> None:
    """New nodes point back at the model source line of the node they stand for."""
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in origin.meta and key not in new.meta:
            new.meta[key] = origin.meta[key]
    new.meta["cpfx_pass"] = pass_name


def splice(
    graph: fx.Graph,
    anchor: fx.Node,
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    after: bool = False,
    origin: fx.Node | None = None,
    pass_name: str = "",
) -> Any:
    """Trace `fn(*args, **kwargs)` into `graph` next to `anchor` and return its output node(s).

    Node arguments become proxies, everything else is passed as a Python constant, so `fn` is an
    ordinary function that also runs eagerly on tensors (that is how replacements are unit-tested).
    """
    tracer = GraphAppendingTracer(graph)
    before = set(graph.nodes)
    ctx = graph.inserting_before(anchor.next if after else anchor)  # keeps creation order
    with ctx:
        proxied = [Proxy(a, tracer) if isinstance(a, fx.Node) else a for a in args]
        out = fn(*proxied, **(kwargs or {}))
    for n in graph.nodes:
        if n not in before:
            copy_origin_meta(n, origin or anchor, pass_name)
    return _unproxy(out)


def _unproxy(x: Any) -> Any:
    if isinstance(x, Proxy):
        return x.node
    if isinstance(x, (tuple, list)):
        return type(x)(_unproxy(i) for i in x)
    return x


def tag(x: Any, **meta: Any) -> Any:
    """Attach `meta` to the node behind a proxy (no-op on real tensors); proxies become nodes."""
    if isinstance(x, Proxy):
        x.node.meta.update({k: _unproxy(v) for k, v in meta.items()})
    return x
