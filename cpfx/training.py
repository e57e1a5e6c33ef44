"""Exact gradients through a context-parallel graph.

A parallelized forward is planned and rewritten as for inference, on AOTAutograd's functional
forward graph; AOTAutograd then derives the backward of the *rewritten* graph (`derive_backward`).
Collectives bring their own derivatives (an all-to-all's is the reverse all-to-all). Two edges
of the plan need a different one than the ops on them would give, and the applier marks them:

- Replicate -> Shard (a replicated value read by an op that produces a shard: the seed slices,
  a weight or a replicated K/V read by sharded tokens): each rank's gradient for the replicated
  value covers only its own tokens, so `sum_grad` all-reduces it over the ranks. Uses of the same
  value by replicated ops are not marked: their gradient is already whole on every rank.
- Shard -> Replicate (a gather): the loss is computed from the gathered value on every rank,
  identically, so the gradient arriving at the gather is whole and the same on every rank; each
  rank keeps its own tokens' rows (`gather_tokens`' backward), without communication. The
  all-gather's own derivative (a reduce-scatter sum) would count every rank's copy of the loss.

So every replicated value, parameters included, ends the backward with the single process's
gradient on every rank; nothing is left for the user to all-reduce over the context-parallel
group.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from cpfx import comm, debug
from cpfx.errors import CpfxError


class _SumGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group_name: str) -> torch.Tensor:
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        c10d = torch.ops._c10d_functional
        out = c10d.wait_tensor(c10d.all_reduce(grad.contiguous(), "sum", ctx.group_name))
        return out, None


def sum_grad(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Identity forward; backward: the sum of the ranks' gradients (an all-reduce)."""
    return _SumGrad.apply(x, group_name)


class _ReducePartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, op: str, group_name: str) -> torch.Tensor:
        out = comm.all_reduce(x, op, group_name)
        ctx.op = op
        if op != "sum":
            ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        if ctx.op == "sum":
            return grad, None, None
        x, out = ctx.saved_tensors
        return grad * (x == out).to(grad.dtype), None, None


def reduce_partial(x: torch.Tensor, op: str, group_name: str) -> torch.Tensor:
    """`comm.all_reduce(x, op, group_name)`; backward: a sum's parts each get the whole gradient,
    a max's (min's) the gradient where the part reached the result."""
    return _ReducePartial.apply(x, op, group_name)


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, layout: Any, rank: int,
                *args: Any) -> torch.Tensor:
        ctx.dim, ctx.pieces, ctx.n_rest = dim, layout.pieces(rank), 3 + len(args)
        return comm.gather_contiguous(x, dim, layout, *args)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        from cpfx.sharding.placement import take_pieces

        return (take_pieces(grad, ctx.dim, ctx.pieces), *([None] * ctx.n_rest))


def gather_tokens(x: torch.Tensor, dim: int, layout: Any, rank: int, *args: Any) -> torch.Tensor:
    """`comm.gather_contiguous(x, dim, layout, *args)`; backward: this rank's rows of the
    (whole, replicated) gradient."""
    return _GatherTokens.apply(x, dim, layout, rank, *args)


def refuse_unsupported(config: Any, mesh: Any) -> None:
    """Training covers Ulysses, ring and USP meshes, eager or through inductor; FP8 payloads are
    refused (their quantization has no gradient that would match the single process)."""
    if config.fp8_comm:
        raise CpfxError(
            "cpfx: gradients through a parallelized model are computed without FP8 payloads; "
            "this model uses fp8_comm=True. Train with fp8_comm=False, or call the model under "
            "torch.no_grad()."
        )


def derive_backward(
    gm: fx.GraphModule, example_inputs: list[Any], inductor: bool = False
) -> Callable[..., Any]:
    """AOTAutograd over the rewritten forward: the compiled function records autograd. With
    `inductor`, inductor compiles the forward and the backward it derives."""
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

    _differentiable_copies(gm)
    if inductor:
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner(gm: fx.GraphModule, example_inputs: Sequence[Any], **kw: Any) -> Any:
            if kw.get("is_backward"):
                coalesce_gradient_sums(gm)
            return compile_fx_inner(gm, example_inputs, **kw)

        compiled = compile_fx(gm, example_inputs, inner_compile=inner)
        assert callable(compiled)  # compile_fx returns other things only in AOT export modes
        return compiled

    def run(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        return make_boxed_func(gm.forward)

    def run_backward(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        coalesce_gradient_sums(gm)
        return make_boxed_func(gm.forward)

    return aot_module_simplified(gm, example_inputs, fw_compiler=run, bw_compiler=run_backward)


def coalesce_gradient_sums(gm: fx.GraphModule) -> int:
    """One `all_reduce_coalesced` at the end of the backward graph for the gradient sums whose
    result is only returned (parameter and input gradients), instead of one all-reduce each.
    Sums whose result feeds more backward computation stay where they are. Returns how many
    all-reduces were merged."""
    c10d = torch.ops._c10d_functional
    g = gm.graph
    (out,) = [n for n in g.nodes if n.op == "output"]
    groups: dict[tuple[Any, ...], list[tuple[fx.Node, fx.Node]]] = {}
    for n in g.nodes:
        if n.op != "call_function" or n.target is not c10d.all_reduce.default:
            continue
        (w,) = n.users if len(n.users) == 1 else (None,)
        if w is None or w.target is not c10d.wait_tensor.default:
            continue
        if any(u is not out for u in w.users):
            continue
        x, op, group = n.args
        v = x.meta.get("val")
        dtype = v.dtype if isinstance(v, torch.Tensor) else None
        groups.setdefault((op, group, dtype), []).append((n, w))
    merged = 0
    for (op, group, _), pairs in groups.items():
        if len(pairs) < 2:
            continue
        with g.inserting_before(out):
            ar = g.call_function(c10d.all_reduce_coalesced.default,
                                 ([n.args[0] for n, _ in pairs], op, group))
            for i, (_, w) in enumerate(pairs):
                item = g.call_function(operator.getitem, (ar, i))
                waited = g.call_function(c10d.wait_tensor.default, (item,))
                w.replace_all_uses_with(waited)
        for n, w in pairs:
            g.erase_node(w)
            g.erase_node(n)
        merged += len(pairs)
    if merged:
        g.lint()
        gm.recompile()
        debug.counters["training"]["gradient_sums_coalesced"] += merged
    return merged


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return src.to(dst.dtype).expand(dst.shape).contiguous()


def _differentiable_copies(gm: fx.GraphModule) -> None:
    """`aten.copy(dst, src)` (functionalization's form of `dst.copy_(src)`) has no derivative;
    the same values as a cast, broadcast and copy of `src` do (`dst` only gives the shape)."""
    changed = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.copy.default:
            if len(n.args) > 2 or n.kwargs.get("non_blocking"):
                continue
            n.target = _copy_into
            changed = True
    if changed:
        gm.recompile()


def checkpointed_modules(gm: fx.GraphModule) -> list[str]:
    """The modules whose forward ran under activation checkpointing in Dynamo's graph (diffusers'
    `enable_gradient_checkpointing()`): per `tag_activation_checkpoint` region, the longest module
    path that every op of its body lies under (from `nn_module_stack`)."""
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or "tag_activation_checkpoint" not in str(n.target):
            continue
        arg = n.args[0] if n.args else None
        body = getattr(gm, str(arg.target), None) if isinstance(arg, fx.Node) else None
        if not isinstance(body, fx.GraphModule):
            continue
        paths = [
            next(iter(b.meta["nn_module_stack"].values()))[0].split(".")
            for b in body.graph.nodes
            if b.op == "call_function" and b.meta.get("nn_module_stack")
        ]
        if not paths:
            continue
        common = os.path.commonprefix(paths)  # element-wise: the shared leading path parts
        if len(paths) > 1 and common:
            found.append(".".join(common))
    return found


def tag_recompute(gm: fx.GraphModule, modules: list[str]) -> int:
    """Mark the rewritten graph's ops of checkpointed modules for recomputation in backward
    (AOTAutograd's partitioner reads `meta["recompute"]`), one region per module; communication
    and cpfx's gradient markers are saved, not recomputed. Returns how many ops were marked."""
    if not modules:
        return 0
    from torch.utils.checkpoint import CheckpointPolicy

    marked = 0
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if n.op != "call_function" or not stack or n.target in (sum_grad, gather_tokens):
            continue
        if debug.is_collective_start(n) or debug.is_wait(n):
            continue
        paths = [v[0] for v in stack.values()]
        ids = [
            i for i, m in enumerate(modules)
            if any(p == m or p.startswith(m + ".") for p in paths)
        ]
        if ids:
            n.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            n.meta["ac_graph_id"] = ids[-1]
            marked += 1
    if marked:
        debug.counters["training"]["recompute_tagged"] += marked
    return marked


def output_count(gm: fx.GraphModule) -> int:
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    return len(torch.utils._pytree.tree_leaves(out.args))
