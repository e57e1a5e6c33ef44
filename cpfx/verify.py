"""`ParallelConfig(verify=True)`: check a parallel run against the single process, value by value.

On the first call of each compiled graph, the unparallelized functional graph (the same ATen
graph cpfx planned on) runs on the same inputs and keeps every intermediate value; the rewritten
graph then runs node by node, and every node that holds this rank's share of an original value
(`meta["cpfx_local_of"]`: original node, placement) is compared with that share of the
single-process value. The forward always completes (so collectives stay matched across ranks);
the ranks then exchange the position of their first mismatch, and if any rank found one, every
rank raises `VerificationError` naming the first mismatching op in graph order, its model source
line, its placement and the rule that placed it. The call's output is the parallel one.

Cost: one extra single-process forward of the graph and all its intermediate values held in
memory during that call, plus an interpreted (slower) run of the parallel graph; later calls run
as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from cpfx.context import PassContext
from cpfx.errors import VerificationError
from cpfx.graph_utils import where
from cpfx.sharding.placement import Partial, Placement, local_value

log = logging.getLogger(__name__)
_NONE = 2**62


def tolerance(x: torch.Tensor) -> tuple[float, float]:
    """(rtol, atol) for comparing a shard with its single-process value: parallel attention
    changes summation order, nothing more."""
    scale = float(x.detach().abs().max()) if x.numel() and x.is_floating_point() else 1.0
    scale = max(scale, 1.0) if scale == scale else 1.0  # NaN-safe
    if x.dtype in (torch.float16, torch.bfloat16):
        return 5e-2, 5e-2 * scale
    return 1e-3, 1e-4 * scale


def _differs(actual: Any, expected: Any) -> str | None:
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return None
    if actual.shape != expected.shape:
        return f"shape {list(actual.shape)} where its share of the single-process value has " \
               f"shape {list(expected.shape)}"
    if not expected.is_floating_point() and not expected.is_complex():
        if not torch.equal(actual, expected):
            return "values differ"
        return None
    rtol, atol = tolerance(expected)
    a, e = actual.detach(), expected.detach().to(actual.dtype)
    if torch.allclose(a, e, rtol=rtol, atol=atol, equal_nan=True):
        return None
    diff = (a - e).abs()
    diff = diff[~diff.isnan()] if diff.is_floating_point() else diff
    worst = float(diff.max()) if diff.numel() else float("nan")
    return f"max abs difference {worst:.3g} (tolerance {atol:.2g} + {rtol:g} x |value|)"


class _Recorder(fx.Interpreter):
    """Runs the rewritten graph and compares each node that holds a share of an original value."""

    def __init__(self, gm: fx.GraphModule, ref_env: dict[str, Any], rank: int,
                 order: dict[str, int]) -> None:
        super().__init__(gm)
        self.ref_env, self.rank, self.order = ref_env, rank, order
        self.first: tuple[int, str, fx.Node, Placement, str] | None = None

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        tag = n.meta.get("cpfx_local_of")
        if tag is None or tag[0] not in self.ref_env or isinstance(tag[1], (tuple, Partial)):
            return out  # a rank's part of a partial value is checked after its all-reduce
        name, placement = tag
        pos = self.order.get(name, _NONE)
        if self.first is not None and pos >= self.first[0]:
            return out
        expected = self.ref_env[name]
        if not isinstance(expected, torch.Tensor):
            return out
        why = _differs(out, local_value(expected, placement, self.rank))
        if why is not None:
            self.first = (pos, name, n, placement, why)
        return out


def verify_first_call(
    fn: Callable[..., Any], gm: fx.GraphModule, reference: fx.GraphModule, ctx: PassContext
) -> Callable[..., Any]:
    """Wrap the compiled callable: the first call is checked (see the module doc)."""
    state = {"done": False}

    def call(*args: Any) -> Any:
        if state["done"]:
            return fn(*args)
        state["done"] = True
        return check(gm, reference, ctx, args)

    return call


def check(gm: fx.GraphModule, reference: fx.GraphModule, ctx: PassContext, args: tuple) -> Any:
    ref = fx.Interpreter(reference, garbage_collect_values=False)
    with torch.no_grad():
        ref.run(*args)
    ref_env = {n.name: v for n, v in ref.env.items()}
    order = {n.name: i for i, n in enumerate(reference.graph.nodes)}
    rec = _Recorder(gm, ref_env, ctx.mesh.cp_rank, order)
    with torch.no_grad():
        out = rec.run(*args)
    mine = rec.first[0] if rec.first else _NONE
    positions = _exchange(mine, ctx)
    first = min(positions)
    if first == _NONE:
        log.info("cpfx verify: graph %d matches the single process on rank %d",
                 ctx.graph_id, ctx.mesh.cp_rank)
        return out
    ranks = [r for r, p in enumerate(positions) if p == first]
    orig = next(n for n in reference.graph.nodes if order[n.name] == first)
    msg = f"cpfx verify: graph {ctx.graph_id}: the value of {orig.name} " \
          f"({orig.target}) at {where(orig)} differs from the single process on rank(s) {ranks}"
    if rec.first is not None and rec.first[0] == first:
        _, name, node, placement, why = rec.first
        plan = node.meta.get("cpfx_plan")
        rule = plan.decision.rule if plan is not None and plan.decision is not None else "seed/input"
        msg += f": on this rank, {why}; its placement is {placement} (rule: {rule}, " \
               f"checked at node {node.name})"
    msg += ". Replicate the module around it (ParallelConfig(replicate=(...,))) to work around, " \
           "and report the model."
    raise VerificationError(msg)


def _exchange(mine: int, ctx: PassContext) -> list[int]:
    group = ctx.mesh.check_group
    world = ctx.mesh.world
    if not dist.is_initialized() or dist.get_backend() == "fake":
        return [mine]
    device = "cpu" if group is not None or ctx.mesh.device_type == "cpu" else ctx.mesh.device_type
    t = torch.full((world,), _NONE, dtype=torch.int64, device=device)
    t[ctx.mesh.cp_rank] = mine
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)  # None: the default group
    return t.tolist()
