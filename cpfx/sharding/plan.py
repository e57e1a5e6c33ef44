"""The shard plan: where every value of a captured ATen graph lives, decided before any edit.

1. Seeds. From each attention's query (and its keys/values when they share an origin with it:
   self or joint attention) walk backwards through ops whose rule carries the token dim through
   unchanged, to where that dim starts: graph inputs, the flatten after a patch embedding, the
   construction of a positional table. Those nodes are the seeds: their value is computed as in
   the single process, then sliced (`Layout.even`).
2. Propagation. In graph order, each op's rule (`cpfx.sharding.rules.decide`) turns the
   placements of its operands into the placements it needs and the placement of its output.
   Nothing is assumed: an op without a rule gets its operands gathered.

The result, a `ShardPlan`, is a pure function of the graph, the mesh size and this rank; it is
stored on the nodes (`meta["cpfx_plan"]`) and read by the applier (`passes/shard_tokens.py`),
`explain` and the verifier.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from cpfx.errors import CpfxError, UnsupportedPatternError
from cpfx.graph_utils import val, where
from cpfx.resident import RESIDENT, unflatten_layout
from cpfx.sharding import rules
from cpfx.sharding.layout import Layout
from cpfx.sharding.placement import REPLICATE, Partial, Placement, Replicate, Shard
from cpfx.sharding.rules import Decision, OpCall, Operand

log = logging.getLogger(__name__)
aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

# Ops whose global value is cheap to recompute from cheap inputs (tables, masks, positions):
# an operand made of them is re-sliced from its global value rather than gathered.
_CHEAP = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.slice.Tensor,
    aten.select.int, aten.cat.default, aten.stack.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.unbind.int, aten.index.Tensor, aten.index_select.default,
    aten.repeat.default, aten.flip.default, aten.constant_pad_nd.default, operator.getitem,
}


@dataclasses.dataclass
class NodePlan:
    placement: Placement | tuple[Placement, ...]
    """Where the node's value lives after this node (after the seed slice, for a seed)."""
    decision: Decision | None = None
    """The rule's decision (None: the node has no sharded operand, or is a graph input)."""
    seed: bool = False
    """The node computes its global value, then is sliced to `placement`."""
    cheap: bool = True
    """Its global value can be rebuilt without communication."""


@dataclasses.dataclass
class ShardPlan:
    nodes: dict[fx.Node, NodePlan]
    seeds: dict[fx.Node, int]
    rank: int
    world: int

    def placement(self, n: Any) -> Placement | tuple[Placement, ...]:
        if isinstance(n, fx.Node) and n in self.nodes:
            return self.nodes[n].placement
        return REPLICATE


# --- building an OpCall from a node ------------------------------------------------------------


def tensor_leaves(node: fx.Node) -> list[fx.Node]:
    """The node's tensor operands in a fixed order: flattened args, then kwargs."""
    leaves = pytree.tree_leaves((node.args, node.kwargs))
    return [x for x in leaves if isinstance(x, fx.Node) and isinstance(val(x), torch.Tensor)]


def _shape(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    if isinstance(v, (tuple, list)):
        return [_shape(x) for x in v]
    return None


def make_call(
    node: fx.Node,
    placement: Callable[[fx.Node], Placement],
    rank: int,
    world: int,
    cheap: Callable[[fx.Node], bool] = lambda n: False,
) -> OpCall:
    """The node as a rule sees it, with each tensor operand's placement from `placement`."""
    operands: list[Operand] = []

    def sub(x: Any) -> Any:
        if isinstance(x, fx.Node) and isinstance(val(x), torch.Tensor):
            v = val(x)
            p = placement(x)
            o = Operand(len(operands), tuple(int(s) for s in v.shape), v.dtype,
                        p if isinstance(p, (Shard, Replicate)) else REPLICATE, cheap(x))
            operands.append(o)
            return o
        return x

    args, kwargs = pytree.tree_map(sub, (node.args, node.kwargs))
    return OpCall(node.target, args, kwargs, _shape(val(node)), operands, rank, world, where(node))


# --- seeds ---------------------------------------------------------------------------------------


def _flows(node: fx.Node, i: int, x: fx.Node, d: int, world: int, out_dim: int,
           out_index: int | None) -> bool:
    """Does dim `d` of operand `x` (operand position `i`) reach output dim `out_dim` (of output
    `out_index`) unchanged, with no redistribution of x?"""
    size = val(x).shape[d]
    probe = Shard(d, Layout.even(size, world))
    call = make_call(node, lambda n: REPLICATE, 0, world)
    call.operands = [
        dataclasses.replace(o, placement=probe if j == i else REPLICATE)
        for j, o in enumerate(call.operands)
    ]
    _rebind(call)
    try:
        dec = rules.decide(call)
    except CpfxError:
        return False
    if dec.needs[i] != probe:
        return False
    out = dec.out if out_index is None else (
        dec.out[out_index] if isinstance(dec.out, tuple) else None)
    return out == Shard(out_dim, probe.layout)


def _rebind(call: OpCall) -> None:
    """Point the Operand objects inside args/kwargs at `call.operands` (after replacing them)."""
    it = iter(call.operands)
    call.args, call.kwargs = pytree.tree_map(
        lambda a: next(it) if isinstance(a, Operand) else a, (call.args, call.kwargs)
    )


def _producers(n: fx.Node, t: int, world: int) -> list[tuple[fx.Node, int]]:
    """Operands (and their dims) that carry dim `t` of `n`'s output through `n` unchanged."""
    if n.op != "call_function":
        return []
    out_index: int | None = None
    args: tuple[Any, ...] = n.args
    if n.target is operator.getitem and not isinstance(val(args[0]), torch.Tensor):
        n, out_index = args[0], args[1]  # one output of a multi-output op
        if n.op != "call_function":
            return []
        args = n.args
    if n.target == aten.cat.default and out_index is None:
        v = val(n)
        if rules.norm_dim(args[1] if len(args) > 1 else 0, v.ndim) == t:
            return [(x, t) for x in args[0] if val(x).ndim == v.ndim and val(x).shape[t] > 0]
    v = val(n) if out_index is None else val(n)[out_index]
    size = v.shape[t]
    found = []
    for i, x in enumerate(tensor_leaves(n)):
        for d, s in enumerate(val(x).shape):
            if s == size and s != 1 and _flows(n, i, x, d, world, t, out_index):
                found.append((x, d))
                break
    return found


class _Seeds:
    """Memoized backward walk: the seeds each (node, token dim) comes from."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.reach: dict[tuple[fx.Node, int], frozenset[tuple[fx.Node, int]]] = {}
        self.preds: dict[tuple[fx.Node, int], list[tuple[fx.Node, int]]] = {}

    def of(self, node: fx.Node, dim: int) -> frozenset[tuple[fx.Node, int]]:
        root = (node, dim)
        stack = [(root, False)]
        while stack:  # iterative post-order over the (node, dim) DAG
            key, expanded = stack.pop()
            if key in self.reach:
                continue
            if key not in self.preds:
                self.preds[key] = _producers(key[0], key[1], self.world)
            preds = self.preds[key]
            if not expanded:
                stack.append((key, True))
                stack.extend((p, False) for p in preds if p not in self.reach)
            else:
                self.reach[key] = (
                    frozenset().union(*(self.reach[p] for p in preds)) if preds else frozenset({key})
                )
        return self.reach[root]


def find_seeds(
    graph: fx.Graph, world: int, split: str = "tokens"
) -> tuple[dict[fx.Node, int], list[fx.Node], set[fx.Node]]:
    """Nodes where the attention sequence starts (`split="tokens"`), or the attention batch
    (`split="batch"`), with that dim; the SDPA nodes; and those of them whose queries are too
    short to split (every piece of that dim has < 2 items)."""
    walk = _Seeds(world)
    seeds: dict[fx.Node, int] = {}
    short: set[fx.Node] = set()
    sdpas = [n for n in graph.nodes if n.op == "call_function" and n.target == SDPA]
    # [B, H, S, D]: the sequence is dim -2, the batch dim 0.
    dim = (lambda x: 0) if split == "batch" else (lambda x: val(x).ndim - 2)
    for n in sdpas:
        q, k, v = n.args[:3]
        sq = val(q).shape[dim(q)]
        if sq < 2:
            short.add(n)
            continue
        from_q = walk.of(q, dim(q))
        found = set(from_q)
        if val(k).shape[dim(k)] >= 2:
            from_k = walk.of(k, dim(k))
            if split == "batch" or from_k & from_q:
                # Keys share an origin with the queries (self or joint attention), or the rows
                # are the batch, which keys and queries always share.
                found |= from_k | walk.of(v, dim(v))
        if all(val(node).shape[d] < 2 for node, d in from_q):
            short.add(n)
        for node, d in found:
            # A constant (get_attr) stays whole; the op reading it slices it (free, the same).
            if val(node).shape[d] >= 2 and node.op != "get_attr":
                seeds.setdefault(node, d)
    return seeds, sdpas, short


# --- propagation ---------------------------------------------------------------------------------


def _resident_local(local: torch.Tensor, *spec: Any) -> torch.Tensor:
    """The local form of `cpfx::resident`: this rank's shard is the argument itself."""
    return local


def _resident_padded(local: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """The local form of `cpfx::resident` for a shard handed in padded: its first rows."""
    return local.narrow(dim, 0, length)


def propagate(
    graph: fx.Graph,
    seeds: dict[fx.Node, int],
    rank: int,
    world: int,
    replicate: Callable[[fx.Node], bool] = lambda n: False,
    sharded_outputs: bool = False,
) -> ShardPlan:
    """Place every node, in graph order (see the module doc). `sharded_outputs`: graph outputs
    keep their token sharding (`cpfx.resident`) instead of being gathered."""
    plan = ShardPlan({}, seeds, rank, world)
    nodes = plan.nodes

    def placement(x: fx.Node) -> Placement:
        p = plan.placement(x)
        return p if isinstance(p, (Shard, Replicate)) else REPLICATE

    def cheap(x: fx.Node) -> bool:
        return nodes[x].cheap if x in nodes else True

    for n in graph.nodes:
        if n.op == "output":
            call = make_call(n, placement, rank, world)
            dec = rules.all_replicated(call, rule="output")
            if sharded_outputs:
                dec.needs = tuple(
                    o.placement if isinstance(o.placement, Shard) else REPLICATE
                    for o in call.operands
                )
                dec.rule = "output (token shards kept)"
            nodes[n] = NodePlan(REPLICATE, dec)
            continue
        if n.op == "call_function" and n.target is RESIDENT:
            dim, size, flat = n.args[1], n.args[2], n.args[3]
            shard = Shard(dim, unflatten_layout(size, list(flat)))
            local, length = val(n.args[0]), shard.layout.local_size(rank)
            if local.shape[dim] == length:
                dec = Decision((REPLICATE,), shard, target=_resident_local, rule="resident shard")
            else:
                given = Operand(0, tuple(local.shape), local.dtype, REPLICATE)
                dec = Decision(
                    (REPLICATE,),
                    shard,
                    args=(given, dim, length),
                    target=_resident_padded,
                    rule="resident shard (handed in padded)",
                )
            nodes[n] = NodePlan(shard, dec, cheap=False)  # its global value needs a gather
            n.meta["cpfx_plan"] = nodes[n]
            continue
        if n.op != "call_function":
            nodes[n] = NodePlan(REPLICATE)
        elif n.target is operator.getitem and not isinstance(val(n.args[0]), torch.Tensor):
            src = plan.placement(n.args[0])
            p = src[n.args[1]] if isinstance(src, tuple) else REPLICATE
            nodes[n] = NodePlan(p, cheap=cheap(n.args[0]))
        else:
            call = make_call(n, placement, rank, world, cheap)
            if replicate(n) and call.sharded:
                dec = rules.all_replicated(call, rule="replicated by ParallelConfig")
            else:
                try:
                    dec = rules.decide(call)
                except UnsupportedPatternError:
                    raise
                except CpfxError as e:
                    raise UnsupportedPatternError(f"{e} (at {where(n)})") from e
            is_cheap = all(
                cheap(x) for x, o in zip(tensor_leaves(n), call.operands) if o.shard is not None
            ) and (n.target in _CHEAP or rules.pointwise.is_pointwise(n.target))
            partial_in = any(isinstance(plan.placement(x), Partial) for x in tensor_leaves(n))
            # A partial operand looks replicated to the rule; the applier all-reduces it first.
            recorded = dec if call.sharded or partial_in else None
            nodes[n] = NodePlan(dec.out, recorded, cheap=is_cheap)
        np_ = nodes[n]
        if n in seeds and isinstance(np_.placement, Replicate) and isinstance(val(n), torch.Tensor):
            d = seeds[n]
            np_.placement = Shard(d, Layout.even(val(n).shape[d], world))
            np_.seed = True
            np_.cheap = True
        n.meta["cpfx_plan"] = np_
    return plan
