"""scaled_dot_product_attention over sharded operands.

- query sharded along its sequence, key/value too: context-parallel attention (a placeholder that
  `lower_attention` turns into Ulysses / ring / USP). Queries and keys may have different layouts
  and lengths (image queries attending to [text | image] keys); the mask stays replicated and
  each rank indexes the rows and columns it needs.
- query sharded along its sequence, key/value replicated (cross-attention to text): local.
- query, key and value sharded alike along a batch or head dim (temporal attention with the
  spatial tokens folded into the batch): local.
Anything else gathers (exact, not parallel). Dropout cannot match the single process's random
mask on a shard: refused.
"""

from __future__ import annotations

from typing import Any

import torch

import cpfx.ops  # noqa: F401  (registers torch.ops.cpfx.sharded_attention)
from cpfx.attention import AttnSite
from cpfx.errors import UnsupportedPatternError
from cpfx.graph_utils import sdpa_args
from cpfx.sharding.placement import REPLICATE, Placement, Shard
from cpfx.sharding.rules import Decision, OpCall, Operand, aten, register


def _need(o: Operand, dim: int, size: int, shard: Shard) -> Placement:
    """Operand `o` sharded like `shard` along `dim` if it has that dim at full length."""
    if 0 <= dim < o.ndim and o.shape[dim] == size:
        return Shard(dim, shard.layout)
    return REPLICATE


@register(aten.scaled_dot_product_attention.default)
def sdpa(call: OpCall) -> Decision | None:
    a = sdpa_args(call.args, call.kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    mask = a["attn_mask"] if isinstance(a["attn_mask"], Operand) else None
    if a["dropout_p"]:
        raise UnsupportedPatternError(
            f"attention at {call.where} has dropout_p={a['dropout_p']} over a sharded sequence; "
            "a shard cannot reproduce the single process's random mask. Put the model in eval mode."
        )
    seq = q.ndim - 2
    if q.shard is None:
        return None  # keys/values sharded under replicated queries: gathered
    if q.shard.dim == seq:
        kv = [x.shard for x in (k, v) if x.shard is not None and x.shard.dim == x.ndim - 2]
        if not kv:
            return _local_queries(q, q.shard, mask, a)
        return _context_parallel(call, q, q.shard, k, v, mask, a, kv[0])
    if q.shard.dim < seq:
        return _batch_parallel(q, q.shard, k, v, mask, a)
    return None


def _local_queries(
    q: Operand, qs: Shard, mask: Operand | None, a: dict[str, Any]
) -> Decision | None:
    """Cross-attention to replicated keys: each rank attends with its own queries (`qs`)."""
    if a["is_causal"]:
        return None  # the causal rows of a shard depend on its global position: gathered
    needs = [q.placement, REPLICATE, REPLICATE]
    if mask is not None:
        needs.append(_need(mask, mask.ndim - 2, q.shape[-2], qs))
    return Decision(tuple(needs), q.placement, rule="attention_local")


def _context_parallel(
    call: OpCall,
    q: Operand,
    qs: Shard,
    k: Operand,
    v: Operand,
    mask: Operand | None,
    a: dict[str, Any],
    kv: Shard,
) -> Decision | None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return None
    if mask is not None and (
        mask.ndim > 4
        or mask.shape[-1] not in (1, k.shape[-2])
        or mask.shape[-2] not in (1, q.shape[-2])
    ):
        return None
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads and not a["enable_gqa"]:
        return None
    site = AttnSite(
        q_layout=qs.layout,
        kv_layout=kv.layout,
        batch=q.shape[0],
        heads=heads,
        kv_heads=kv_heads,
        head_dim=q.shape[3],
        value_dim=v.shape[3],
        scale=a["scale"],
        enable_gqa=bool(a["enable_gqa"]),
        causal=bool(a["is_causal"]),
        dtype=q.dtype,
        mask_shape=None if mask is None else (1,) * (4 - mask.ndim) + tuple(mask.shape),
        mask_ndim=0 if mask is None else mask.ndim,
        mask_is_bool=mask is not None and mask.dtype == torch.bool,
        where=call.where,
    )
    kvp = Shard(2, kv.layout)
    needs: list[Placement] = [q.placement, kvp, kvp] + ([REPLICATE] if mask is not None else [])
    return Decision(
        tuple(needs),
        q.placement,
        args=(q, k, v, mask),
        kwargs={},
        target=torch.ops.cpfx.sharded_attention.default,
        meta={"cpfx_attn": site},
        rule="attention_sharded",
    )


def _batch_parallel(
    q: Operand, qs: Shard, k: Operand, v: Operand, mask: Operand | None, a: dict[str, Any]
) -> Decision | None:
    """Sharded along a batch or head dim (`qs`): every (batch, head) attends on its own rank."""
    j = qs.dim
    if a["enable_gqa"] and j == q.ndim - 3 and q.shape[j] != k.shape[j]:
        return None
    needs: list[Placement] = [q.placement]
    for x in (k, v):
        if x.ndim != q.ndim or x.shape[j] != q.shape[j]:
            return None
        needs.append(Shard(j, qs.layout))
    if mask is not None:
        needs.append(_need(mask, j - (q.ndim - mask.ndim), q.shape[j], qs))
    return Decision(tuple(needs), q.placement, rule="attention_local")
