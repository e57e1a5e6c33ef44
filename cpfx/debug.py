"""Counters that passes bump and tests assert on, and per-pass graph dumps."""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path

import torch.fx as fx

log = logging.getLogger(__name__)

counters: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(
    collections.Counter
)
"""`counters[pass_name][event]`, bumped by every rewrite; `reset_counters()` clears them."""


def reset_counters() -> None:
    counters.clear()


def collective_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes that issue a collective (functional collectives or cpfx p2p ops), in graph order."""
    return [n for n in gm.graph.nodes if is_collective_start(n)]


def is_collective_start(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    name = str(n.target)
    return ("_c10d_functional" in name and "wait_tensor" not in name) or name.startswith(
        "cpfx.ring_"
    )


def is_wait(n: fx.Node) -> bool:
    return n.op == "call_function" and "_c10d_functional.wait_tensor" in str(n.target)


def write_dump(
    dump_dir: str, rank: int, graph_id: int, index: int, name: str, gm: fx.GraphModule, header: str
) -> Path:
    """Write one readable graph file: `<dump_dir>/rank<r>/graph<g>/<nn>_<pass>.py`."""
    d = Path(dump_dir) / f"rank{rank}" / f"graph{graph_id}"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{index:02d}_{name}.py"
    text = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    path.write_text(f"# {header}\n{text}")
    return path


def env_dump_dir() -> str | None:
    """Read CPFX_DUMP_DIR once, at the API boundary (passes never read the environment)."""
    return os.environ.get("CPFX_DUMP_DIR") or None
