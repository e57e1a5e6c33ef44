"""shard_tokens: infer where the token sequence lives and shard the graph along it.

Preconditions: a Dynamo-captured graph with `meta["val"]` (global shapes, static), inputs
replicated on every rank.
Postconditions: every tensor that carries the attention sequence is token-sharded (`Shard`) from
as early as the graph allows to as late as it allows; replicated tensors that meet sharded ones are
sliced (free); sharded tensors that reach a token-mixing op or the output are gathered; shape
constants that held the global length hold the local one; every SDPA over the sharded sequence is a
`cpfx::sharded_attention` placeholder (lowered later), cross-attention to replicated K/V stays a
local SDPA. `meta["cpfx_shard"]` records each node's placement.

    before:  x = linear(hidden) ; q = x.view(1, 4096, 24, 128) ... sdpa(q, k, v) ... out
    after:   h = narrow(hidden, 1, r*2048, 2048) ; x = linear(h) ; q = x.view(1, 2048, 24, 128)
             ... cpfx.sharded_attention(q, k, v, mask) ... all_gather -> out

Analysis: from each SDPA's query (and key/value when they share an origin with it: self
attention) walk backwards through token-wise ops (`cpfx.rules.out_dim`) to the nodes where the
token dim starts (inputs, patch-embedding flattens, table constructions): the seeds. Rewrite:
walk forward from the seeds; placements follow `out_dim` and layouts (`cpfx.layout`).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import re
from typing import Any

import torch
import torch.fx as fx

import cpfx.ops  # noqa: F401  (registers torch.ops.cpfx.sharded_attention)
from cpfx import comm, rules
from cpfx.context import PassContext
from cpfx.debug import counters
from cpfx.errors import UnsupportedPatternError
from cpfx.graph_utils import SDPA_PARAMS, is_sdpa, op_name, sdpa_args, splice, val
from cpfx.layout import Layout

log = logging.getLogger(__name__)
PASS = "shard_tokens"


@dataclasses.dataclass(frozen=True)
class Shard:
    dim: int
    layout: Layout


@dataclasses.dataclass(frozen=True)
class AttnSite:
    """A self-attention over the sharded sequence, waiting for a strategy."""

    layout: Layout
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    scale: float | None
    enable_gqa: bool
    dtype: torch.dtype
    mask_shape: tuple[int, ...] | None
    mask_ndim: int
    mask_is_bool: bool
    where: str


# Besides pointwise ops (`rules.is_pointwise_name`, which includes dtype casts and copies), ops
# that move no token across ranks and take no token-length argument: replaying them on a global
# value is exact (see `_Sharder.full_version`).
_REPLAYABLE = {"unsqueeze", "getitem"}


class _Gather(Exception):
    """Raised by a rule: this op cannot keep its inputs sharded; gather them first."""


def where(n: fx.Node) -> str:
    """`module.path (file:line)` of the model code a node came from, for messages."""
    stack = n.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        path = list(stack.values())[-1][0]
        path = re.sub(r"(__dict__)?\['_modules'\]\['([^']+)'\]", r".\2", path)
        path = re.sub(r"^(L\['self'\]|L__self___)?\.?", "", path).replace("..", ".")
    trace = (n.meta.get("stack_trace") or "").strip().splitlines()
    line = trace[-2].strip() if len(trace) >= 2 else ""
    return f"{path or n.name} ({line})" if line else (path or n.name)


# --- analysis -----------------------------------------------------------------------------------


def _sources(
    node: fx.Node,
    d: int,
    seen: dict[fx.Node, int],
    seeds: dict[fx.Node, int],
    stop_at: dict[fx.Node, int] | None = None,
) -> bool:
    """Walk back from (node, dim d) through token-wise ops; record where the dim starts.

    With `stop_at`, return True as soon as the walk reaches one of its nodes (shared origin)."""
    stack = [(node, d)]
    while stack:
        n, dim = stack.pop()
        if stop_at is not None and n in stop_at:
            return True
        if n in seen:
            continue
        seen[n] = dim
        found = False
        for x, dx in _producers(n, dim):
            found = True
            stack.append((x, dx))
        if not found:
            seeds.setdefault(n, dim)
    return False


def _producers(n: fx.Node, d: int) -> list[tuple[fx.Node, int]]:
    out = []
    if n.op not in ("call_function", "call_method"):
        return out
    if n.target is operator.getitem and not isinstance(val(n.args[0]), torch.Tensor):
        tup, i = n.args[0], n.args[1]
        for x in rules.data_args(tup):
            for dx in _big_dims(x):
                r = rules.out_dim(tup, x, dx)
                if (
                    isinstance(r, list)
                    and r[i] == d
                    and rules.shape_of(x)[dx] == rules.shape_of(n)[d]
                ):
                    out.append((x, dx))
        return out
    if op_name(n) in ("cat", "concat", "concatenate"):
        cat_dim = rules.norm_dim(rules.arg(n, 1, "dim", 0), len(val(n).shape))
        if cat_dim == d:
            return [(x, d) for x in n.args[0] if rules.shape_of(x) is not None]
    size = rules.shape_of(n)[d]
    for x in rules.data_args(n):
        for dx in _big_dims(x):
            # The token dim must keep its length: a slice or expand starts a new token tensor.
            if rules.shape_of(x)[dx] == size and rules.out_dim(n, x, dx) == d:
                out.append((x, dx))
                break
    return out


def _big_dims(x: fx.Node) -> list[int]:
    shape = rules.shape_of(x)
    return [i for i, s in enumerate(shape or ()) if s != 1]


def find_seeds(graph: fx.Graph) -> tuple[dict[fx.Node, int], list[fx.Node]]:
    """Nodes where the attention sequence starts, with their token dim; and the SDPA nodes."""
    seeds: dict[fx.Node, int] = {}
    sdpas = [n for n in graph.nodes if is_sdpa(n)]
    for n in sdpas:
        a = sdpa_args(n)
        q_seen: dict[fx.Node, int] = {}
        _sources(a["query"], 2, q_seen, seeds)
        if _sources(a["key"], 2, {}, {}, stop_at=q_seen):
            # K shares an origin with Q: self-attention, so K and V are sharded too.
            _sources(a["key"], 2, {}, seeds)
            _sources(a["value"], 2, {}, seeds)
    return seeds, sdpas


# --- rewrite ------------------------------------------------------------------------------------


class _Sharder:
    def __init__(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.gm, self.g, self.ctx = gm, gm.graph, ctx
        self.state: dict[fx.Node, Any] = {}
        self.slices: dict[tuple[fx.Node, int, Layout], fx.Node] = {}
        self.gathers: dict[fx.Node, fx.Node] = {}
        self.full: dict[fx.Node, fx.Node] = {}
        """sharded node -> a replicated node holding its global value (seeds, slices, replays)"""
        self.c = counters[PASS]

    # placements ---------------------------------------------------------------------------
    def shard_of(self, x: Any) -> Shard | None:
        s = self.state.get(x) if isinstance(x, fx.Node) else None
        return s if isinstance(s, Shard) else None

    def local(self, layout: Layout) -> int:
        return layout.local_size(self.ctx.cp_rank)

    # graph edits ----------------------------------------------------------------------------
    def slice_(self, x: fx.Node, dim: int, layout: Layout, before: fx.Node) -> fx.Node:
        key = (x, dim, layout)
        if key not in self.slices:
            pieces = layout.pieces(self.ctx.cp_rank)
            s = splice(
                self.g, before, comm.take_pieces, [x, dim, pieces], origin=before, pass_name=PASS
            )
            s.meta["val"] = val(x)  # rules reason on global shapes until the pass ends
            self.state[s] = Shard(dim, layout)
            self.full[s] = x
            self.slices[key] = s
            self.c["slice"] += 1
        return self.slices[key]

    def gather(self, x: fx.Node, before: fx.Node) -> fx.Node:
        if x not in self.gathers:
            sh = self.shard_of(x)
            shape = list(rules.shape_of(x))
            shape[sh.dim] = self.local(sh.layout)
            ctx = self.ctx
            g = splice(
                self.g,
                before,
                comm.gather_tokens,
                [x, sh.dim, sh.layout, ctx.cp_ranks, ctx.cp_group, shape, val(x).device.type],
                origin=before,
                pass_name=PASS,
            )
            g.meta["val"] = val(x)
            g.meta["cpfx_plan"] = ("gather", x.name, f"{before.name}: {where(before)}")
            self.state[g] = None
            self.gathers[x] = g
            self.c["gather"] += 1
            log.debug("gather %s before %s (%s)", x.name, before.name, where(before))
        return self.gathers[x]

    def gather_inputs(self, n: fx.Node) -> None:
        for x in list(n.all_input_nodes):
            if self.shard_of(x) is not None:
                n.replace_input_with(x, self.gather(x, n))

    def seed(self, n: fx.Node, dim: int) -> None:
        size = rules.shape_of(n)[dim]
        layout = Layout.simple(size, self.ctx.world)
        users = list(n.users)
        anchor = n
        if n.op == "placeholder":  # keep the placeholders together at the top
            anchor = [p for p in self.g.nodes if p.op == "placeholder"][-1]
        s = splice(
            self.g,
            anchor,
            comm.take_pieces,
            [n, dim, layout.pieces(self.ctx.cp_rank)],
            after=True,
            origin=n,
            pass_name=PASS,
        )
        s.meta["val"] = val(n)
        s.meta["cpfx_plan"] = ("seed", n.name, dim, size)
        self.state[s] = Shard(dim, layout)
        self.full[s] = n
        for u in users:
            u.replace_input_with(n, s)
        self.c["seed"] += 1

    # driver -----------------------------------------------------------------------------------
    def run(self, seeds: dict[fx.Node, int]) -> None:
        for n in list(self.g.nodes):
            if n.op == "output":
                self.gather_inputs(n)
                continue
            st = None
            if n.op in ("call_function", "call_method"):
                try:
                    st = self.visit(n)
                except _Gather:
                    self.gather_inputs(n)
                    st = None
            self.state[n] = st
            if st is None and n in seeds and isinstance(val(n), torch.Tensor):
                self.seed(n, seeds[n])

    def visit(self, n: fx.Node) -> Any:
        if n.target is operator.getitem and isinstance(self.state.get(n.args[0]), list):
            return self.state[n.args[0]][n.args[1]]
        sharded = {x: self.shard_of(x) for x in n.all_input_nodes if self.shard_of(x)}
        if not sharded:
            return None
        name = op_name(n)
        if rules.is_inplace(n) and name != "setitem":
            raise UnsupportedPatternError(
                f"shard_tokens: in-place op {name} on a token-sharded tensor at {where(n)}; "
                "cpfx cannot prove it exact. Pass an explicit plan or report the model."
            )
        if is_sdpa(n):
            return self.sdpa(n)
        if name in ("cat", "concat", "concatenate"):
            return self.cat(n)
        if name == "setitem":
            return self.setitem(n)
        if name == "getitem" and isinstance(val(n.args[0]), torch.Tensor):
            sh = self.shard_of(n.args[0])
            if sh is not None:
                return self.getitem(n, sh)
        if name in ("split", "split_with_sizes", "chunk", "tensor_split"):
            sh = self.shard_of(n.args[0])
            dim = rules.norm_dim(rules.arg(n, 2, "dim", 0), len(rules.shape_of(n.args[0])))
            if sh is not None and dim == sh.dim:
                return self.split(n, sh)
        return self.generic(n, sharded)

    def generic(self, n: fx.Node, sharded: dict[fx.Node, Shard]) -> Any:
        data = rules.data_args(n)
        if not any(x in sharded for x in data):
            self.gather_inputs(n)  # e.g. type_as(sharded): only dtype read
            return None
        if op_name(n) == "pad_sequence" and any(x not in sharded for x in data):
            raise _Gather  # sequences must all be sharded alike: no replicated one to slice
        if rules.is_pointwise_name(op_name(n)):
            self.unify_layouts(n, sharded, data)
        outs = set()
        for x, sh in sharded.items():
            if x not in data:
                continue  # read for its dtype/shape only (type_as): stays as it is
            od = rules.out_dim(n, x, sh.dim)
            if od is None:
                raise _Gather
            outs.add((tuple(od) if isinstance(od, list) else od, sh.layout))
        if len(outs) != 1:
            raise _Gather
        od, layout = outs.pop()
        o_shape = rules.shape_of(n)
        if rules.is_pointwise_name(op_name(n)) or op_name(n) in ("stack",):
            self.slice_replicated(n, od, layout, data, sharded)
        if isinstance(od, tuple):
            return [Shard(d, layout) if d is not None else None for d in od]
        if o_shape is None or o_shape[od] != layout.global_size:
            raise _Gather
        self.rewrite_shape_args(n, od, layout)
        return Shard(od, layout)

    def unify_layouts(self, n: fx.Node, sharded: dict[fx.Node, Shard], data: list) -> None:
        """Operands sharded with different layouts (a RoPE table passed in over the joined
        [txt | img] sequence, split evenly, meets the joined stream, split per segment): re-slice
        the ones whose global value a replicated node holds, with the others' layout; no gather."""
        ops = [x for x in data if x in sharded]
        if len({sharded[x].layout for x in ops}) < 2:
            return
        # Only operands that land on the same output dim, over the same global length, can
        # trade layouts (x[:, None] * y[None, :] pairs two token dims: left to the caller).
        out_dims = [rules.out_dim(n, x, sharded[x].dim) for x in ops]
        if any(not isinstance(d, int) or d != out_dims[0] for d in out_dims):
            return
        if len({sharded[x].layout.global_size for x in ops}) != 1:
            return
        fixed = [x for x in ops if self.full_version(x) is None]
        target = sharded[fixed[0] if fixed else ops[0]].layout
        if any(sharded[x].layout != target for x in fixed):
            return  # two computed streams disagree: the caller gathers
        for x in dict.fromkeys(ops):
            sh = sharded[x]
            if sh.layout == target:
                continue
            s = self.slice_(self.full_version(x), sh.dim, target, n)
            n.replace_input_with(x, s)
            del sharded[x]
            sharded[s] = Shard(sh.dim, target)
            data[:] = [s if d is x else d for d in data]
            self.c["reslice"] += 1

    def full_version(self, x: fx.Node) -> fx.Node | None:
        """A replicated node with the global value of sharded `x`: known for seeds and slices;
        for a pointwise or layout-free op over such nodes, replayed on their global values."""
        if x in self.full:
            return self.full[x]
        if x.op not in ("call_function", "call_method"):
            return None
        name = op_name(x)
        if not (rules.is_pointwise_name(name) or name in _REPLAYABLE):
            return None
        if name == "getitem":
            idx = x.args[1] if isinstance(x.args[1], tuple) else (x.args[1],)
            if any(isinstance(i, fx.Node) for i in idx):
                return None
        inputs = {a: self.full_version(a) for a in x.all_input_nodes if self.shard_of(a)}
        if not inputs or any(f is None for f in inputs.values()):
            return None
        with self.g.inserting_before(x):
            c = self.g.node_copy(x, lambda a: inputs.get(a, a))
        c.meta = dict(x.meta)
        self.state[c] = None
        self.full[x] = c
        return c

    def slice_replicated(self, n, od, layout, data, sharded) -> None:
        """Replicated operands that carry the full token dim get this rank's slice (free)."""
        o_nd = len(rules.shape_of(n))
        for x in data:
            if x in sharded:
                continue
            shape = rules.shape_of(x)
            if op_name(n) == "stack":
                # stack inserts a new dim k: element dim d is output dim d + 1 when k <= d.
                k = rules.norm_dim(rules.arg(n, 1, "dim", 0), o_nd)
                d = od - 1 if od > k else od
            else:
                d = od - (o_nd - len(shape))
            if d < 0 or shape[d] == 1:
                continue
            if shape[d] != layout.global_size:
                raise _Gather
            n.replace_input_with(x, self.slice_(x, d, layout, n))

    def rewrite_shape_args(self, n: fx.Node, od: int, layout: Layout) -> None:
        name = op_name(n)
        glob, loc = layout.global_size, self.local(layout)
        if name in ("view", "reshape", "expand"):
            shape = rules.shape_args(n)
            if shape[od] not in (-1, glob) and not (name == "expand" and shape[od] == -1):
                raise _Gather
            if shape[od] == glob:
                shape[od] = loc
            n.args = (n.args[0], *shape)
            n.kwargs = {k: v for k, v in n.kwargs.items() if k not in ("size", "shape")}
        elif name == "unflatten":
            k = rules.norm_dim(n.args[1], len(rules.shape_of(n.args[0])))
            sizes = list(n.args[2])
            if k <= od < k + len(sizes):
                i = od - k
                if sizes[i] == glob:
                    sizes[i] = loc
                n.args = (n.args[0], n.args[1], tuple(sizes))

    # token-dim-specific rules -------------------------------------------------------------
    def cat(self, n: fx.Node) -> Shard:
        tensors = list(n.args[0])
        nd = len(rules.shape_of(n))
        dim = rules.norm_dim(rules.arg(n, 1, "dim", 0), nd)
        shs = [self.shard_of(t) for t in tensors]
        if dim == next(s for s in shs if s).dim:  # along the tokens: layouts concatenate
            layout = None
            new = []
            for t, s in zip(tensors, shs):
                if s is None:
                    length = rules.shape_of(t)[dim]
                    s = Shard(dim, Layout.simple(length, self.ctx.world))
                    t = self.slice_(t, dim, s.layout, n)
                if s.dim != dim:
                    raise _Gather
                layout = s.layout if layout is None else layout.concat(s.layout)
                new.append(t)
            n.args = (new, *n.args[1:])
            return Shard(dim, layout)
        ref = next(s for s in shs if s)
        new = []
        for t, s in zip(tensors, shs):
            if s is None:
                if rules.shape_of(t)[ref.dim] != ref.layout.global_size:
                    raise _Gather
                t = self.slice_(t, ref.dim, ref.layout, n)
            elif s != ref:
                raise _Gather
            new.append(t)
        n.args = (new, *n.args[1:])
        return ref

    def getitem(self, n: fx.Node, sh: Shard) -> Shard:
        od, sl = rules.index_dim(len(rules.shape_of(n.args[0])), n.args[1], sh.dim)
        if od is None:
            raise _Gather
        glob = sh.layout.global_size
        start, stop, step = sl.indices(glob)
        if step != 1:
            raise _Gather
        if (start, stop) == (0, glob):
            return Shard(od, sh.layout)
        sub = sh.layout.select(start, stop)
        if sub is None:
            raise _Gather
        lo, hi = sh.layout.local_ranges(self.ctx.cp_rank, start, stop)
        n.args = (n.args[0], _replace_slice(n.args[1], sl, slice(lo, hi)))
        return Shard(od, sub)

    def split(self, n: fx.Node, sh: Shard) -> list[Shard]:
        glob = sh.layout.global_size
        name = op_name(n)
        arg1 = (
            n.args[1]
            if len(n.args) > 1
            else n.kwargs.get("split_size_or_sections", n.kwargs.get("split_size"))
        )
        if name == "chunk":
            size = -(-glob // arg1)
            sizes = [min(size, glob - i) for i in range(0, glob, size)]
        elif isinstance(arg1, int):
            sizes = [min(arg1, glob - i) for i in range(0, glob, arg1)]
        else:
            sizes = list(arg1)
        outs, local, pos = [], [], 0
        for s in sizes:
            sub = sh.layout.select(pos, pos + s)
            if sub is None:
                raise _Gather
            lo, hi = sh.layout.local_ranges(self.ctx.cp_rank, pos, pos + s)
            outs.append(Shard(sh.dim, sub))
            local.append(hi - lo)
            pos += s
        n.op, n.target = "call_method", "split"
        n.args = (n.args[0], local, sh.dim)
        n.kwargs = {}
        return outs

    def setitem(self, n: fx.Node) -> None:
        target, idx, value = n.args
        sh = self.shard_of(target)
        if sh is None:
            raise UnsupportedPatternError(
                f"shard_tokens: a token-sharded value is written into a replicated tensor at "
                f"{where(n)}; cpfx cannot keep this exact. Report the model."
            )
        od, sl = rules.index_dim(len(rules.shape_of(target)), idx, sh.dim)
        glob = sh.layout.global_size
        start, stop, step = sl.indices(glob) if od is not None else (0, 0, 0)
        # A write to whole segments of the layout (e.g. `q[:, :, txt:] = rope(q[:, :, txt:])`
        # on a [text | image] sequence) is local: every rank writes its chunk of each segment.
        sub = None if od is None or step != 1 else sh.layout.select(start, stop)
        if sub is None:
            raise UnsupportedPatternError(
                f"shard_tokens: in-place write to tokens [{start}:{stop}] of a sequence sharded as "
                f"{sh.layout} at {where(n)}; only writes to whole segments are supported."
            )
        if (start, stop) != (0, glob):
            lo, hi = sh.layout.local_ranges(self.ctx.cp_rank, start, stop)
            idx = _replace_slice(idx, sl, slice(lo, hi))
            n.args = (target, idx, value)
        vs = self.shard_of(value) if isinstance(value, fx.Node) else None
        if isinstance(value, fx.Node) and vs is None:
            shape = rules.shape_of(value)
            v_nd = len(rules.shape_of(target)) - sum(
                1 for i in (idx if isinstance(idx, tuple) else (idx,)) if isinstance(i, int)
            )
            d = od - (v_nd - len(shape))
            if 0 <= d and shape[d] != 1:
                if shape[d] != sub.global_size:
                    raise UnsupportedPatternError(
                        f"shard_tokens: setitem value of {shape[d]} tokens into {sub.global_size} "
                        f"at {where(n)}"
                    )
                n.replace_input_with(value, self.slice_(value, d, sub, n))
        elif vs is not None and vs.layout != sub:
            raise UnsupportedPatternError(
                f"shard_tokens: mismatched token layouts in setitem at {where(n)}"
            )
        return None

    def sdpa(self, n: fx.Node) -> Shard | None:
        a = sdpa_args(n)
        q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
        sq, sk, sv = self.shard_of(q), self.shard_of(k), self.shard_of(v)
        if a["dropout_p"]:
            raise UnsupportedPatternError(
                f"shard_tokens: attention at {where(n)} has dropout_p={a['dropout_p']}; context "
                "parallel attention needs dropout_p=0 (put the model in eval mode)"
            )
        if sq is None or sq.dim != 2 or len(rules.shape_of(q)) != 4:
            raise _Gather
        if sk is None and sv is None:  # cross-attention to replicated keys: purely local
            if isinstance(mask, fx.Node):
                self.local_query_mask(n, mask, sq)
            self.c["attention_local"] += 1
            return sq
        if sk != sq or sv != sq:
            for x in (k, v):
                if self.shard_of(x) is not None:
                    n.replace_input_with(x, self.gather(x, n))
            if isinstance(mask, fx.Node):
                self.local_query_mask(n, mask, sq)
            self.c["attention_local"] += 1
            return sq
        if a["is_causal"]:
            raise UnsupportedPatternError(
                f"shard_tokens: attention at {where(n)} is causal; cpfx shards the sequence in an "
                "order that breaks causality. Causal attention is not supported."
            )
        if isinstance(mask, fx.Node) and self.shard_of(mask) is not None:
            mask = self.gather(mask, n)
        self.replace_with_placeholder(n, q, k, v, mask, a, sq)
        return sq

    def local_query_mask(self, n: fx.Node, mask: fx.Node, sq: Shard) -> None:
        if self.shard_of(mask) is not None:
            g = self.gather(mask, n)
            n.replace_input_with(mask, g)
            mask = g
        shape = rules.shape_of(mask)
        if len(shape) >= 2 and shape[-2] == sq.layout.global_size:
            m = self.slice_(mask, len(shape) - 2, sq.layout, n)
            _set_sdpa_arg(n, "attn_mask", m)
        elif len(shape) >= 2 and shape[-2] != 1:
            raise _Gather

    def replace_with_placeholder(self, n, q, k, v, mask, a, sq) -> None:
        qs, ks = rules.shape_of(q), rules.shape_of(k)
        mshape = rules.shape_of(mask) if isinstance(mask, fx.Node) else None
        if mshape is not None and (len(mshape) > 4 or mshape[-1] not in (1, sq.layout.global_size)):
            raise UnsupportedPatternError(
                f"shard_tokens: attention mask of shape {list(mshape)} at {where(n)} cannot be "
                f"sharded over a sequence of {sq.layout.global_size} tokens"
            )
        site = AttnSite(
            layout=sq.layout,
            batch=qs[0],
            heads=qs[1],
            kv_heads=ks[1],
            head_dim=qs[3],
            scale=a["scale"],
            enable_gqa=bool(a["enable_gqa"]),
            dtype=val(q).dtype,
            mask_shape=None if mshape is None else (1,) * (4 - len(mshape)) + tuple(mshape),
            mask_ndim=0 if mshape is None else len(mshape),
            mask_is_bool=mshape is not None and val(mask).dtype == torch.bool,
            where=where(n),
        )
        if site.kv_heads != site.heads and not site.enable_gqa:
            raise UnsupportedPatternError(
                f"shard_tokens: attention at {where(n)} has {site.heads} query heads and "
                f"{site.kv_heads} key heads without enable_gqa"
            )
        with self.g.inserting_before(n):
            p = self.g.call_function(
                torch.ops.cpfx.sharded_attention.default, (q, k, v, mask if mshape else None)
            )
        p.meta.update(
            {k2: v2 for k2, v2 in n.meta.items() if k2 in ("stack_trace", "nn_module_stack")}
        )
        p.meta["cpfx_attn"] = site
        p.meta["val"] = val(n)
        p.meta["cpfx_pass"] = PASS
        n.replace_all_uses_with(p)
        self.state[p] = sq
        self.c["attention_sharded"] += 1


def _set_sdpa_arg(n: fx.Node, name: str, value: Any) -> None:
    i = SDPA_PARAMS.index(name)
    if len(n.args) > i:
        args = list(n.args)
        args[i] = value
        n.args = tuple(args)
    else:
        n.kwargs = {**n.kwargs, name: value}


def _replace_slice(idx: Any, old: slice, new: slice) -> Any:
    if not isinstance(idx, tuple):
        return new
    out = list(idx)
    for i, x in enumerate(out):
        if x is old or x == old:
            out[i] = new
            break
    return tuple(out)


def shard_tokens_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    seeds, sdpas = find_seeds(gm.graph)
    log.info("shard_tokens: %d attention calls, %d seeds", len(sdpas), len(seeds))
    _Sharder(gm, ctx).run(seeds)
    gm.meta["cpfx_attention"] = len(sdpas)
    for n in [n for n in gm.graph.nodes if is_sdpa(n) and not n.users]:
        gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
