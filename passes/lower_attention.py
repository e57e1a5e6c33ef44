"""lower_attention: give every `cpfx::sharded_attention` placeholder its strategy.

Preconditions: `shard_tokens` ran; each placeholder carries `meta["cpfx_attn"]` (an `AttnSite`),
and, if `fp8_comm` ran, `meta["cpfx_fp8"]` (the roles whose payload travels as FP8).
Postconditions: no placeholder is left; each became `cpfx.attention.cp_attention` traced into
the graph: Ulysses all-to-alls over the "ulysses" mesh dim, ring over the "ring" dim, both for
a 2-D mesh (USP). Collectives are functional-collective start/wait pairs (and `cpfx::ring_send_recv`
for p2p ring steps), tagged with `meta["cpfx_role"]` in {"q", "k", "v", "qkv", "o", "kv"}.

    before:  o = cpfx.sharded_attention(q, k, v, mask)                       # [B, H, S/N, D]
    after:   q2 = wait(all_to_all(q.reshape/permute)) ... o2 = sdpa(q2, k2, v2, mask[pieces])
             o = wait(all_to_all(o2 ...)).reshape/permute                    # [B, H, S/N, D]
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from cpfx.attention import AttnSite, AttnSpec, cp_attention
from cpfx.context import PassContext
from cpfx.debug import counters
from cpfx.graph_utils import splice

log = logging.getLogger(__name__)
PASS = "lower_attention"


def strategy_name(ctx: PassContext) -> str:
    mesh, rotate = ctx.mesh, ctx.config.ring_rotate
    if mesh.ulysses > 1 and mesh.ring > 1:
        return f"usp_{rotate}"
    if mesh.ring > 1:
        return f"ring_{rotate}"
    return "ulysses"


def make_spec(site: AttnSite, ctx: PassContext, fp8_roles: frozenset[str] = frozenset()) -> AttnSpec:
    mode = ctx.config.head_padding
    if mode == "auto":
        # Padding-free uneven head groups send fewer bytes and work with uneven sequences too;
        # with fewer heads than ranks some ranks would get none: pad instead.
        mode = "uneven" if min(site.heads, site.kv_heads) >= ctx.mesh.ulysses else "pad"
    return AttnSpec(
        site=site,
        mesh=ctx.mesh,
        ring_rotate=ctx.config.ring_rotate,
        head_padding=mode,
        fp8_roles=fp8_roles,
        differentiable=ctx.training,
        one_qkv_transfer=one_qkv_transfer(site, ctx),
    )


ONE_QKV_BELOW = 512 * 1024
"""`qkv_all_to_all="auto"`: Q's payload per rank (bytes) under which Q, K and V go in one
all-to-all. Below it the host's per-call work dominates and the overlap gains nothing; above it
Q's transfer under the K/V projections is worth two more calls (benchmarks/overlap.py)."""


def one_qkv_transfer(site: AttnSite, ctx: PassContext) -> bool:
    """Whether Q, K and V share one all-to-all (where `cp_attention` can: same tokens, heads and
    plain payload). Decided from global sizes only: every rank decides the same."""
    mode = ctx.config.qkv_all_to_all
    if mode != "auto":
        return mode == "one"
    if not ctx.config.async_qkv:
        return True
    per_rank = -(-site.q_layout.size // ctx.mesh.world)
    q_bytes = site.batch * site.heads * per_rank * site.head_dim * site.dtype.itemsize
    return q_bytes < ONE_QKV_BELOW


def lower_attention_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    target = torch.ops.cpfx.sharded_attention.default
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]
    name = strategy_name(ctx)
    for n in sites:
        site = n.meta["cpfx_attn"]
        spec = make_spec(site, ctx, n.meta.get("cpfx_fp8", frozenset()))
        if site.heads < ctx.mesh.ulysses and spec.head_padding == "uneven":
            log.info("%s: %d heads on %d Ulysses ranks: some ranks get no head",
                     site.where, site.heads, ctx.mesh.ulysses)
        q, k, v, mask = n.args
        out = splice(gm.graph, n, cp_attention, [q, k, v, mask, spec], origin=n, pass_name=PASS)
        out.meta["cpfx_strategy"] = name
        out.meta["cpfx_local_of"] = n.meta.get("cpfx_local_of")
        n.replace_all_uses_with(out)
        gm.graph.erase_node(n)
        counters[PASS][name] += 1
    gm.recompile()
    return gm
