"""shard_tokens: plan where the token sequence lives, then apply the plan in one place.

Preconditions: a functional ATen graph (AOTAutograd's, `cpfx.capture`) with `meta["val"]`
(global shapes, static); inputs replicated on every rank.
Postconditions: every value lives where `ShardPlan` (`cpfx.sharding.plan`) put it: seeds are
sliced right after they are computed; each op runs its local form (the rule's local call); every
operand whose placement differs from what its op needs is redistributed right before it:
`Replicate -> Shard` a slice (free), `Shard -> Replicate` an all-gather, `Shard -> Shard` a
re-slice of the global value (replayed from cheap tables when it can, else gathered); the output
is gathered (with `regional`, outside grad mode, it stays sharded: `cpfx.resident`, positions
in `gm.meta["cpfx_resident_outputs"]`). Attention over a sharded sequence is a `cpfx::sharded_attention` placeholder
carrying its `AttnSite` (lowered later). Every node keeps `meta["cpfx_plan"]`, and every node that
holds a shard of an original value has `meta["cpfx_local_of"] = (original name, placement)`.

    before:  x = linear(hidden, w) ; q = view(x, [1, 4096, 24, 128]) ... sdpa(q, k, v) ... out
    after:   h = narrow(hidden, 1, r*2048, 2048) ; x = linear(h, w) ; q = reshape(x, [1, 2048, 24, 128])
             ... cpfx.sharded_attention(q, k, v, mask) ... all_gather -> out
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from cpfx import comm, training
from cpfx.context import PassContext
from cpfx.debug import counters
from cpfx.errors import ConfigError, UnsupportedPatternError
from cpfx.graph_utils import copy_origin_meta, module_path, splice, val, where
from cpfx.resident import RESIDENT
from cpfx.sharding.placement import (
    REPLICATE,
    Partial,
    Placement,
    Replicate,
    Shard,
    take_pieces,
)
from cpfx.sharding.plan import SDPA, ShardPlan, find_seeds, propagate, tensor_leaves
from cpfx.sharding.rules import Operand

log = logging.getLogger(__name__)
PASS = "shard_tokens"


def _sharded(p: Any) -> bool:
    """Whether a rank holds something other than the global value (a shard, a partial value)."""
    if isinstance(p, tuple):
        return any(isinstance(x, (Shard, Partial)) for x in p)
    return isinstance(p, (Shard, Partial))


class _Applier:
    def __init__(self, gm: fx.GraphModule, plan: ShardPlan, ctx: PassContext) -> None:
        self.gm, self.g, self.plan, self.ctx = gm, gm.graph, plan, ctx
        self.rank = plan.rank
        self.place: dict[fx.Node, Any] = {n: p.placement for n, p in plan.nodes.items()}
        self.orig = {n: (n.target, n.args, n.kwargs) for n in self.g.nodes}
        self.full: dict[fx.Node, fx.Node] = {}
        """sharded node -> a node holding its global value (seeds, replays)"""
        self.memo: dict[tuple[fx.Node, Placement], fx.Node] = {}
        self.grad_sums: dict[fx.Node, fx.Node] = {}
        self.c = counters[PASS]

    # --- redistribution ------------------------------------------------------------------
    def placement(self, x: fx.Node) -> Placement:
        p = self.place.get(x, REPLICATE)
        return p if isinstance(p, (Shard, Replicate, Partial)) else REPLICATE

    def convert(self, x: fx.Node, need: Placement, before: fx.Node) -> fx.Node:
        cur = self.placement(x)
        if cur == need:
            return x
        key = (x, need)
        if key not in self.memo:
            if isinstance(cur, Partial):
                y = self.reduce(x, cur, before)
                if isinstance(need, Shard):
                    y = self.slice(y, need, before)
            elif isinstance(need, Replicate) and (full := self.full_version(x)) is not None:
                y = full  # the global value is at hand (a seed, a cheap table): no gather
            elif isinstance(need, Replicate):
                assert isinstance(cur, Shard)  # cur != need
                y = self.gather(x, cur, before)
            elif isinstance(cur, Replicate):
                assert isinstance(need, Shard)  # rules never ask for a partial operand
                y = self.slice(x, need, before)
            else:
                assert isinstance(need, Shard)
                full = self.full_version(x)
                if full is None:
                    full = self.convert(x, REPLICATE, before)
                y = self.slice(full, need, before)
                self.c["reslice"] += 1
            self.memo[key] = y
        return self.memo[key]

    def slice(self, x: fx.Node, need: Shard, before: fx.Node) -> fx.Node:
        src = self.sum_grad(x, before)
        s = splice(
            self.g, before, take_pieces, [src, need.dim, need.layout.pieces(self.rank)],
            origin=before, pass_name=PASS,
        )
        s.meta["val"] = val(x)  # global until the pass ends (meta is refreshed after it)
        self.place[s] = need
        self.full[s] = x
        s.meta["cpfx_local_of"] = (x.name, need)
        self.c["slice"] += 1
        return s

    def gather(self, x: fx.Node, cur: Shard, before: fx.Node) -> fx.Node:
        shape = list(val(x).shape)
        shape[cur.dim] = cur.layout.local_size(self.rank)
        mesh = self.ctx.mesh
        args = [list(range(mesh.world)), mesh.cp_group, shape, val(x).device.type]
        if self.ctx.training:  # one node: AOTAutograd differentiates it with its own backward
            g = _opaque(self.g, before, training.gather_tokens,
                        [x, cur.dim, cur.layout, self.rank, *args], origin=before)
        else:
            g = splice(self.g, before, comm.gather_contiguous, [x, cur.dim, cur.layout, *args],
                       origin=before, pass_name=PASS)
        g.meta["val"] = val(x)
        g.meta["cpfx_gather"] = (x.name, f"{before.name}: {where(before)}")
        self.place[g] = REPLICATE
        self.c["gather"] += 1
        log.debug("gather %s before %s (%s)", x.name, before.name, where(before))
        return g

    def reduce(self, x: fx.Node, cur: Partial, before: fx.Node) -> fx.Node:
        """All-reduce the ranks' parts of partial `x` into its global value."""
        group = self.ctx.mesh.cp_group
        if self.ctx.training:  # one node: AOTAutograd differentiates it with its own backward
            r = _opaque(self.g, before, training.reduce_partial, [x, cur.op, group], origin=before)
        else:
            r = splice(self.g, before, comm.all_reduce, [x, cur.op, group], origin=before,
                       pass_name=PASS)
        r.meta["val"] = val(x)
        r.meta["cpfx_reduce"] = (x.name, f"{before.name}: {where(before)}")
        self.place[r] = REPLICATE
        self.c["reduce"] += 1
        return r

    def sum_grad(self, x: fx.Node, before: fx.Node) -> fx.Node:
        """Training: `x` (replicated) read by an op that produces a shard; its gradient from this
        rank covers this rank's tokens only, so the ranks' gradients are summed (cpfx.training).
        One marker per value, placed right after it."""
        v = val(x)
        if not self.ctx.training or not (isinstance(v, torch.Tensor) and v.is_floating_point()):
            return x
        if x not in self.grad_sums:
            anchor = x
            if x.op == "placeholder":
                anchor = [p for p in self.g.nodes if p.op == "placeholder"][-1]
            m = _opaque(self.g, anchor, training.sum_grad, [x, self.ctx.mesh.cp_group],
                        after=True, origin=x)
            m.meta["val"] = v
            self.place[m] = REPLICATE
            self.grad_sums[x] = m
            self.c["grad_sum"] += 1
        return self.grad_sums[x]

    def full_version(self, x: fx.Node) -> fx.Node | None:
        """A node with the global value of sharded `x`, without communication: known for seeds
        and slices; for ops the plan marks cheap, replayed on the global values of their inputs."""
        if not _sharded(self.place.get(x, REPLICATE)):
            return x
        if x in self.full:
            return self.full[x]
        np_ = self.plan.nodes.get(x)
        if np_ is None or not np_.cheap or x not in self.orig:
            return None
        target, args, kwargs = self.orig[x]
        ops = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Node)]
        fulls = {a: self.full_version(a) for a in ops}
        if any(f is None for f in fulls.values()):
            return None
        args, kwargs = pytree.tree_map(
            lambda a: fulls[a] if isinstance(a, fx.Node) else a, (args, kwargs)
        )
        with self.g.inserting_before(x):
            c = self.g.create_node("call_function", target, args, kwargs)
        c.meta = {k: v for k, v in x.meta.items() if k not in ("cpfx_plan", "cpfx_local_of")}
        self.place[c] = REPLICATE
        self.full[x] = c
        return c

    # --- applying decisions --------------------------------------------------------------
    def run(self) -> None:
        # outputs that are a resident shard handed in, as it came (a regional block's arguments
        # it did not write to: `cpfx.resident.write_back`), found before the rewrite replaces
        # the `cpfx::resident` nodes
        out_node = self.g.output_node()
        given = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else ()
        self.gm.meta["cpfx_resident_echo"] = frozenset(
            i
            for i, x in enumerate(given)
            if isinstance(x, fx.Node) and x.op == "call_function" and x.target is RESIDENT
        )
        for n in list(self.g.nodes):
            np_ = self.plan.nodes[n]
            if np_.decision is not None:
                self.apply(n, np_.decision)
            elif n.op == "call_function" and not np_.seed:
                n.meta["cpfx_local_of"] = (n.name, np_.placement)
            if np_.seed:
                assert isinstance(np_.placement, Shard), np_  # a seed is sharded
                self.seed(n, np_.placement)

    def seed(self, n: fx.Node, p: Shard) -> None:
        users = list(n.users)
        self.place[n] = REPLICATE
        anchor = n
        if n.op == "placeholder":  # keep the placeholders together at the top
            anchor = [x for x in self.g.nodes if x.op == "placeholder"][-1]
        src = self.sum_grad(n, anchor)
        s = splice(
            self.g, src if src is not n else anchor, take_pieces,
            [src, p.dim, p.layout.pieces(self.rank)], after=True, origin=n, pass_name=PASS,
        )
        s.meta["val"] = val(n)
        s.meta["cpfx_local_of"] = (n.name, p)
        s.meta["cpfx_seed"] = (n.name, p.dim, p.layout.size, where(n))
        self.place[s] = p
        self.full[s] = n
        for u in users:
            u.replace_input_with(n, s)
        self.c["seed"] += 1

    def apply(self, n: fx.Node, dec: Any) -> None:
        operands = tensor_leaves(n)
        assert len(operands) == len(dec.needs), (n.format_node(), dec)
        before = n if n.op != "output" else n
        local = [self.convert(x, need, before) for x, need in zip(operands, dec.needs)]
        if self.ctx.training and n.op != "output" and _sharded(dec.out):
            local = [
                self.sum_grad(x, n) if not _sharded(self.placement(x)) else x for x in local
            ]
        if n.op == "output":
            self._substitute_leaves(n, local)
            outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else ()
            self.gm.meta["cpfx_resident_outputs"] = {
                i: (p.dim, p.layout)
                for i, x in enumerate(outs)
                if isinstance(x, fx.Node) and isinstance(p := self.placement(x), Shard)
            }
            return
        self._count_rule(n, dec)
        if dec.args is None and dec.kwargs is None and dec.target is None:
            self._substitute_leaves(n, local)
            n.meta["cpfx_local_of"] = (n.name, dec.out)
            return
        marked = self._operand_args(n)
        args, kwargs = pytree.tree_map(
            lambda a: local[a.index] if isinstance(a, Operand) else a,
            (
                dec.args if dec.args is not None else marked[0],
                dec.kwargs if dec.kwargs is not None else marked[1],
            ),
        )
        # arguments that exchange rows among the ranks learn the group here (rules see no mesh)
        group = self.ctx.mesh.cp_group
        args = [a.bind_group(group) if hasattr(a, "bind_group") else a for a in args]
        target = dec.target if dec.target is not None else n.target
        if isinstance(target, torch._ops.OpOverload):
            n.target, n.args, n.kwargs = target, tuple(args), dict(kwargs)
            n.meta.update(dec.meta)
            n.meta["cpfx_local_of"] = (n.name, dec.out)
            return
        assert callable(target), target
        out = splice(self.g, n, target, list(args), dict(kwargs), origin=n, pass_name=PASS)
        self._replace(n, out, dec.out)

    def _operand_args(self, n: fx.Node) -> tuple[Any, Any]:
        """n's args/kwargs with its tensor operands as Operand markers (index order)."""
        it = iter(range(10**9))
        return pytree.tree_map(
            lambda a: Operand(next(it), (), torch.float32, REPLICATE)
            if isinstance(a, fx.Node) and isinstance(val(a), torch.Tensor) else a,
            (n.args, n.kwargs),
        )

    def _substitute_leaves(self, n: fx.Node, local: list[fx.Node]) -> None:
        it = iter(local)
        n.args, n.kwargs = pytree.tree_map(
            lambda a: next(it) if isinstance(a, fx.Node) and isinstance(val(a), torch.Tensor) else a,
            (n.args, n.kwargs),
        )

    def _replace(self, n: fx.Node, out: Any, placement: Any) -> None:
        """Replace n by the node(s) a spliced local function produced."""
        if isinstance(out, (tuple, list)):
            for u in list(n.users):  # getitem users take the element directly
                i = cast(int, u.args[1])
                u.replace_all_uses_with(out[i])
                self._stand_in(out[i], u, placement[i])
        else:
            n.replace_all_uses_with(out)
            self._stand_in(out, n, placement)

    def _stand_in(self, new: fx.Node, old: fx.Node, placement: Any) -> None:
        """`new` now holds what `old` held (its plan, its global call for replays)."""
        new.meta["val"] = val(old)
        self.place[new] = placement
        self.plan.nodes[new] = self.plan.nodes[old]
        self.orig[new] = self.orig[old]
        new.meta["cpfx_local_of"] = (old.name, placement)
        new.meta["cpfx_plan"] = old.meta.get("cpfx_plan")
        copy_origin_meta(new, old, PASS)

    def _count_rule(self, n: fx.Node, dec: Any) -> None:
        """Counters of the attentions and convolutions, by how they run."""
        if n.target == SDPA:
            self.c[dec.rule if dec.rule.startswith("attention") else "attention_gathered"] += 1
        elif dec.rule.startswith("convolution"):
            self.c[dec.rule] += 1


def _opaque(
    g: fx.Graph, anchor: fx.Node, fn: Any, args: list[Any], *, after: bool = False,
    origin: fx.Node,
) -> fx.Node:
    """One `call_function` node of `fn` (not traced into its ops, as `splice` would)."""
    with g.inserting_after(anchor) if after else g.inserting_before(anchor):
        n = g.create_node("call_function", fn, tuple(args))
    copy_origin_meta(n, origin, PASS)
    return n


def _overrides(ctx: PassContext) -> Callable[[fx.Node], bool]:
    prefixes = tuple(getattr(ctx.config, "replicate", ()) or ())
    if not prefixes:
        return lambda n: False

    def replicate(n: fx.Node) -> bool:
        path = module_path(n)
        return any(path == p or path.startswith(p + ".") for p in prefixes)

    return replicate


def _refuse_flex_attention(gm: fx.GraphModule) -> None:
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    for n in gm.graph.nodes:
        if n.op == "call_function" and flex is not None and n.target is flex:
            raise UnsupportedPatternError(
                f"shard_tokens: attention at {where(n)} is computed with flex_attention, which "
                "cpfx does not parallelize (its score and mask functions see global positions "
                "and heads). Use scaled_dot_product_attention: in diffusers, "
                "model.set_attention_backend('native')."
            )


def _refuse_small_batch(sdpas: list[fx.Node], world: int) -> None:
    """A `batch` mesh dim gives each rank rows of the batch: every rank needs at least one (a
    batch the dim does not divide is split unevenly, exactly)."""
    for n in sdpas:
        batch = val(n.args[0]).shape[0]
        if batch < world:
            raise ConfigError(
                f"shard_tokens: the 'batch' mesh dim has {world} ranks, but attention at {where(n)} "
                f"runs on a batch of {batch}: some rank would get no rows. Call the model with a "
                f"batch of at least {world} (classifier-free guidance batched with the prompt, "
                "several images per prompt), use a smaller 'batch' dim, or split the sequence "
                "instead (a 'ulysses' or 'ring' mesh)."
            )


def shard_tokens_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    _refuse_flex_attention(gm)
    mesh = ctx.mesh
    seeds, sdpas, short = find_seeds(gm.graph, mesh.world, mesh.split)
    if mesh.split == "batch":
        _refuse_small_batch(sdpas, mesh.world)
    log.info("shard_tokens: %d attention calls, %d seeds", len(sdpas), len(seeds))
    keep = ctx.config.regional and not ctx.training  # regional blocks hand shards on
    plan = propagate(gm.graph, seeds, mesh.cp_rank, mesh.world, _overrides(ctx), keep)
    gm.meta["cpfx_shard_plan"] = plan
    gm.meta["cpfx_attention"] = len(sdpas)
    whole, too_short = [], 0
    for n in sdpas:
        dec = plan.nodes[n].decision
        if dec is None:
            counters[PASS]["attention_replicated"] += 1
            if n in short:  # a sequence of one item (per piece): nothing to split
                too_short += 1
            else:
                whole.append(f"{where(n)}: no operand carries the sharded sequence")
        elif not dec.rule.startswith("attention"):
            whole.append(f"{where(n)}: its operands are gathered ({dec.rule})")
    gm.meta["cpfx_attention_parallel"] = len(sdpas) - len(whole) - too_short
    gm.meta["cpfx_attention_whole"] = whole
    gm.meta["cpfx_attention_short"] = too_short
    _Applier(gm, plan, ctx).run()
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
