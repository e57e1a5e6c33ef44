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
    """`module.path (file.py:line: `code`)` of the model code a node came from, for messages."""
    if n.op == "placeholder" and "cpfx_input" in n.meta:
        return f"input {n.meta['cpfx_input']}"
    path = module_path(n) or n.name
    src = source_line(n)
    return f"{path} ({src})" if src else path


_NOISE = frozenset({"self", "L", "__dict__", "_modules", "_parameters", "_buffers"})


def module_path(n: fx.Node) -> str:
    """The dotted path of the innermost module a node came from (`transformer_blocks.0.attn`),
    from Dynamo's nn_module_stack ('' if unknown)."""
    stack = n.meta.get("nn_module_stack") or {}
    raw = list(stack.values())[-1][0] if stack else ""
    if not isinstance(raw, str):
        return ""
    tokens = re.findall(r"\['([^']+)'\]|\.([A-Za-z0-9_]+)|\[(\d+)\]", raw)
    return ".".join(t for a, b, c in tokens if (t := a or b or c) not in _NOISE)


_PLUMBING = (
    "/torch/",
    "/diffusers/models/attention_dispatch.py",
    "/diffusers/models/attention_processor.py",
    "/diffusers/utils/",
    "/diffusers/hooks/",
)
"""Frames that are not the model's own code: torch, diffusers' attention dispatch and
decorators."""


def is_plumbing(file: str) -> bool:
    """Whether `file` is torch's or diffusers' plumbing rather than a model's own code."""
    return any(p in file for p in _PLUMBING)


def model_frame(stack_trace: str) -> tuple[str, int, str] | None:
    """`(file, line, first code line)` of the innermost frame of `stack_trace` in the model's own
    code (the innermost frame of all if every frame is plumbing); None without frames."""
    lines = stack_trace.rstrip().splitlines()
    frames = []
    for i, line in enumerate(lines):
        m = re.match(r'\s*File "([^"]+)", line (\d+)', line)
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            frames.append((m.group(1), int(m.group(2)), code))
    model = [f for f in frames if not is_plumbing(f[0])] or frames
    return model[-1] if model else None


def source_line(n: fx.Node) -> str:
    """`file.py:123: `code`` of the model's source line a node came from ('' if unknown)."""
    frame = model_frame(n.meta.get("stack_trace") or "")
    if frame is None:
        return ""
    file, line, code = frame
    text = f"{file.rsplit('/', 1)[-1]}:{line}"
    return f"{text}: `{excerpt(code)}`" if code else text


def excerpt(code: str, width: int = 48) -> str:
    """`code` cut to about `width` characters with its brackets balanced (`f(a, ...)`, `...b`): a
    stack trace holds one line of a statement, which may leave brackets open or close others."""
    code = code.strip().replace("`", "'")
    cut = len(code) > width
    code = code[:width].rstrip() if cut else code
    closing = {"(": ")", "[": "]", "{": "}"}
    kept: list[str] = []
    still_open: list[str] = []
    for ch in code:
        if ch in closing:
            still_open.append(closing[ch])
        elif ch in closing.values():
            if not still_open or ch != still_open[-1]:
                continue  # closes a bracket on an earlier line (or a mismatched one): dropped
            still_open.pop()
        kept.append(ch)
    head = "..." if len(kept) < len(code) else ""
    tail = "..." if cut or still_open else ""
    return head + "".join(kept) + tail + "".join(reversed(still_open))


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
