"""Hand a rewritten graph to inductor without letting it undo the overlap schedule.

Inductor reorders on its own. With default settings on tiny Flux, its `reorder_for_locality` pass
pulled Q's RoPE next to K's (one fused kernel, so Q's all-to-all started after the K projection)
and the single-stream block's MLP matmul ended up after the output all-to-all's wait. cpfx turns
that pass off and pins the overlap pass's order with inductor's own `control_deps` ordering edges,
added on the post-grad ATen graph (which still has the overlap pass's order): for every collective
start S and its wait W, each extern kernel X (matmul, convolution, attention, custom op) between
them runs after S, and W after X. Every edge points forward in the existing order, so no cycle
can appear; a fusion or a scheduler reordering (peak memory) that would move work across a start
or a wait would form a cycle, and inductor declines it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from cpfx.debug import counters, is_collective_start, is_wait

_EXTERN = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "convolution",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
}


def _is_extern(n: fx.Node) -> bool:
    t = n.target
    if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return False
    if t.namespace == "aten":
        return t.overloadpacket.__name__ in _EXTERN
    return t.namespace == "cpfx" and not is_collective_start(n)


def schedule_edges(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """node -> the nodes it must run after (beyond its data inputs), keyed in graph order."""
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    deps: dict[fx.Node, list[fx.Node]] = collections.defaultdict(list)
    for s in nodes:
        if not is_collective_start(s):
            continue
        waits = [u for u in s.users if is_wait(u)]
        if not waits:
            continue
        w = min(waits, key=pos.__getitem__)
        inside = [x for x in nodes[pos[s] + 1 : pos[w]] if _is_extern(x)]
        for x in inside:
            deps[x].append(s)
        if inside:
            deps[w].extend(inside)
    return {n: list(dict.fromkeys(deps[n])) for n in sorted(deps, key=pos.__getitem__)}


class KeepSchedule(CustomGraphPass):
    """Post-grad pass: pin the collective/compute order with `control_deps` edges."""

    def __call__(self, graph: fx.Graph) -> None:
        from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering
        from torch.utils._ordered_set import OrderedSet

        edges = schedule_edges(graph)
        counters["inductor"]["pinned"] += len(edges)
        preserve_node_ordering(graph, {n: OrderedSet(d) for n, d in edges.items()})

    def uuid(self) -> str:
        return "cpfx.inductor.KeepSchedule.v1"


def compile_with_inductor(
    gm: fx.GraphModule, example_inputs: list[Any], keep_schedule: bool
) -> Callable[..., Any]:
    from torch._inductor.compile_fx import compile_fx

    patches: dict[str, Any] = {}
    if keep_schedule:
        # reorder_for_locality would move nodes before the custom pass sees the order.
        patches = {"reorder_for_locality": False, "post_grad_custom_post_pass": KeepSchedule()}
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    assert callable(compiled), type(compiled)  # not an AOT-compile artifact: no such option set
    return compiled
