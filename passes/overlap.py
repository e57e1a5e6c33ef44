"""overlap: issue each collective as early as its input allows and wait as late as possible.

Preconditions: collectives are start/wait pairs (`_c10d_functional.*` / `cpfx::ring_send_recv`
then `wait_tensor`); the send-buffer preparation nodes of a collective were created by
`lower_attention` / `fp8_comm` (`meta["cpfx_pass"]`).
Postconditions: same nodes, same data dependencies, new order: a collective and the nodes that only
prepare its buffer move up to just after their latest other input (Q's all-to-all starts right after
Q is ready, before the K and V projections); each wait and the nodes that only unpack its result
move down to just before their first other user. Results never change: only order changes.

    before:  q = lin(x); k = lin(x); v = lin(x); a2a(q); a2a(k); a2a(v); wait*3; sdpa
    after:   q = lin(x); a2a(q); k = lin(x); a2a(k); v = lin(x); a2a(v); wait*3; sdpa
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from cpfx.context import PassContext
from cpfx.debug import collective_nodes, counters, is_wait

log = logging.getLogger(__name__)
PASS = "overlap"
_PREP_PASSES = ("lower_attention", "fp8_comm")


def _is_prep(n: fx.Node) -> bool:
    return n.meta.get("cpfx_pass") in _PREP_PASSES and n.op == "call_function" or (
        n.op == "call_method" and n.meta.get("cpfx_pass") in _PREP_PASSES
    )


def _prep_chain(start: fx.Node) -> list[fx.Node]:
    """Nodes that exist only to build `start`'s send buffer (single-user prep nodes)."""
    chain, stack = [], list(start.all_input_nodes)
    while stack:
        n = stack.pop()
        if _is_prep(n) and len(n.users) == 1 and not is_wait(n) and n not in chain:
            chain.append(n)
            stack.extend(n.all_input_nodes)
    return chain


def _hoist(graph: fx.Graph, start: fx.Node, order: dict[fx.Node, int]) -> bool:
    chain = _prep_chain(start)
    group = set(chain) | {start}
    ext = [a for n in group for a in n.all_input_nodes if a not in group]
    if not ext:
        return False
    anchor = max(ext, key=lambda a: order[a])
    if order[anchor] + 1 >= min(order[n] for n in group):
        return False
    for n in sorted(group, key=lambda x: order[x]):
        anchor.append(n)
        anchor = n
    return True


def _sink(graph: fx.Graph, wait: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Move `wait` (and unpack nodes with one user) down to just before the first real consumer."""
    group = [wait]
    cur = wait
    while len(cur.users) == 1:
        (u,) = cur.users
        if not _is_prep(u) or len(u.all_input_nodes) != 1:
            break
        group.append(u)
        cur = u
    users = [u for u in cur.users]
    if not users:
        return False
    first = min(users, key=lambda u: order[u])
    if order[first] <= order[group[-1]] + 1:
        return False
    for n in group:
        first.prepend(n)
    return True


def overlap_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    g = gm.graph
    for start in collective_nodes(gm):
        order = {n: i for i, n in enumerate(g.nodes)}
        if _hoist(g, start, order):
            counters[PASS]["hoisted"] += 1
    for wait in [n for n in g.nodes if is_wait(n)]:
        order = {n: i for i, n in enumerate(g.nodes)}
        if _sink(g, wait, order):
            counters[PASS]["sunk"] += 1
    g.lint()
    gm.recompile()
    return gm
