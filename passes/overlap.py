"""overlap: start collectives as early as possible, wait as late as possible, compute in between.

Preconditions: collectives are start/wait pairs (`_c10d_functional.*` or `cpfx::ring_send_recv`,
then `wait_tensor`).
Postconditions: same nodes and data dependencies, new order, results unchanged:
1. hoist: each collective start moves up together with everything it needs (its ancestors, plus
   in-place writes into them): Q's all-to-all starts right after Q is projected, normed and
   rotated, before the K and V projections;
2. defer: pure nodes that the collective does not need and whose users all come after it move
   below it: independent work (e.g. the MLP branch of Flux's single-stream blocks) runs while the
   output all-to-all is in flight;
3. sink: each wait (and the reshapes that only unpack its result) moves down to just before the
   first real consumer.

    before:  q = lin(x); k = lin(x); v = lin(x); q' = rope(q); a2a(q'); a2a(k); a2a(v); wait*3
    after:   q = lin(x); q' = rope(q); a2a(q'); k = lin(x); a2a(k); v = lin(x); a2a(v); wait*3
"""

from __future__ import annotations

import logging

import torch.fx as fx

from cpfx.context import PassContext
from cpfx.debug import collective_nodes, counters, is_wait
from cpfx.graph_utils import is_mutating

log = logging.getLogger(__name__)
PASS = "overlap"
_PREP_PASSES = ("lower_attention", "fp8_comm")


def _positions(g: fx.Graph) -> dict[fx.Node, float]:
    return {n: i for i, n in enumerate(g.nodes)}


def _needed(start: fx.Node, pos: dict[fx.Node, float], lo: float = -1) -> set[fx.Node]:
    """Ancestors of `start` after position `lo`, plus in-place writers (before it) into them."""
    need: set[fx.Node] = set()
    stack = [start]
    while stack:
        n = stack.pop()
        if n in need or pos[n] <= lo:
            continue
        need.add(n)
        stack.extend(n.all_input_nodes)
        for u in n.users:
            if is_mutating(u) and u.args and u.args[0] is n and pos[u] < pos[start]:
                stack.append(u)
    return need


def _reorder(g: fx.Graph, first: fx.Node, last: fx.Node, front: set[fx.Node]) -> None:
    """Within [first, last], put the `front` nodes first, each group keeping its own order."""
    span, n = [], first
    while True:
        span.append(n)
        if n is last:
            break
        n = n.next
    a = [x for x in span if x in front]
    b = [x for x in span if x not in front]
    anchor = first.prev
    for x in a + b:
        anchor.append(x)
        anchor = x


def _hoist(g: fx.Graph, start: fx.Node, floor: fx.Node | None) -> bool:
    """Move `start` and what it needs up, but not above `floor` (the previous hoisted start)."""
    pos = _positions(g)
    last_input = max((pos[x] for x in g.nodes if x.op in ("placeholder", "get_attr")), default=-1)
    lo = max(last_input, pos[floor] if floor is not None else -1)
    need = _needed(start, pos, lo)
    # Never pull a wait up: a start that needs another transfer's result stays behind its wait
    # (the ring's next send stays after the current block's attention: that is the overlap).
    lo = max([lo] + [pos[x] for x in need if is_wait(x)])
    movable_from = next((x for x in g.nodes if pos[x] > lo and x not in need), None)
    if movable_from is None or pos[movable_from] > pos[start]:
        return False
    _reorder(g, movable_from, start, need)
    return True


def _movable(n: fx.Node) -> bool:
    if n.op != "call_function" and n.op != "call_method":
        return False
    if n.is_impure() or is_mutating(n) or is_wait(n) or n.meta.get("cpfx_collective"):
        return False
    # A reader of a tensor that something writes in place must keep its place.
    return not any(is_mutating(u) for a in n.all_input_nodes for u in a.users)


def _defer(g: fx.Graph, start: fx.Node, prev: fx.Node | None) -> int:
    """Move pure nodes between the previous collective and `start` that `start` does not need,
    and whose users all follow it, below it (deferring past the next collective is enough)."""
    pos = _positions(g)
    lo = pos[prev] if prev is not None else -1
    need = _needed(start, pos, lo)
    moved = 0
    for n in reversed([x for x in g.nodes if lo < pos[x] < pos[start]]):
        if n in need or not _movable(n) or not n.users:
            continue
        if all(pos[u] > pos[start] for u in n.users):
            start.append(n)  # reversed walk + append right after start keeps their order
            pos[n] = pos[start] + 0.5
            moved += 1
    return moved


def _sink(g: fx.Graph, wait: fx.Node) -> bool:
    pos = _positions(g)
    group, cur = [wait], wait
    while len(cur.users) == 1:
        (u,) = cur.users
        if u.meta.get("cpfx_pass") not in _PREP_PASSES or len(u.all_input_nodes) != 1:
            break
        group.append(u)
        cur = u
    if not cur.users:
        return False
    first = min(cur.users, key=lambda u: pos[u])
    if pos[first] <= pos[group[-1]] + 1:
        return False
    for n in group:
        first.prepend(n)
    return True


def overlap_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    g = gm.graph
    c = counters[PASS]
    floor = None
    for start in collective_nodes(gm):  # in order, so earlier collectives keep their lead
        c["hoisted"] += _hoist(g, start, floor)
        floor = start
    prev = None
    for start in collective_nodes(gm):
        c["deferred"] += _defer(g, start, prev)
        prev = start
    for wait in [n for n in g.nodes if is_wait(n)]:
        c["sunk"] += _sink(g, wait)
    g.lint()
    gm.recompile()
    return gm
