"""fp8_comm: send Q, V and O of Ulysses all-to-alls as float8 e4m3 (K stays in the model dtype).

Preconditions: `lower_attention` ran; each Ulysses all-to-all chain's last node carries
`meta["cpfx_a2a"] = (role, input node, AttnSpec, heads)`.
Postconditions: chains with role q, v or o are replaced by `cpfx.attention.seq_to_heads_fp8` /
`heads_to_seq_fp8`: `cpfx::fp8_quantize` (fused permute + per-(token, head) scale, scale bytes
inline at the end of each row) -> one uint8 all-to-all -> `cpfx::fp8_dequantize` (fused
dequantize + permute). FP8 crosses the collective only as uint8 (gloo refuses float8 dtypes).
K keeps its dtype: softmax(Q K^T) is the sensitive part. Bytes per element: (D + 4) / D instead
of 2 (bf16) or 4 (fp32).

    before:  q2 = permute(wait(all_to_all(reshape(permute(q)))))
    after:   q2 = fp8_dequantize(wait(all_to_all(fp8_quantize(q, U))))
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

import cpfx.kernels.fp8  # noqa: F401  (registers torch.ops.cpfx.fp8_*)
from cpfx.attention import (
    heads_to_seq_fp8,
    heads_to_seq_uneven,
    seq_to_heads_fp8,
    seq_to_heads_uneven,
)
from cpfx.context import PassContext
from cpfx.debug import counters
from cpfx.errors import ConfigError
from cpfx.graph_utils import splice
from cpfx.passes.shard_tokens import where

log = logging.getLogger(__name__)
PASS = "fp8_comm"
FP8_ROLES = ("q", "v", "o")
SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _erase_chain(g: fx.Graph, end: fx.Node, src: fx.Node) -> None:
    """Erase the replaced chain (collectives are impure, so dead-code elimination keeps them)."""
    stack = [end]
    while stack:
        n = stack.pop()
        if n is src or n.users or n.meta.get("cpfx_pass") != "lower_attention":
            continue
        inputs = n.all_input_nodes
        g.erase_node(n)
        stack.extend(inputs)


def fp8_comm_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    ends = [n for n in gm.graph.nodes if "cpfx_a2a" in n.meta]
    if not ends:
        log.warning("fp8_comm: no Ulysses all-to-all in graph %d (ring-only mesh?)", ctx.graph_id)
    for end in ends:
        role, src, spec, heads = end.meta["cpfx_a2a"]
        if role not in FP8_ROLES:
            continue
        if spec.dtype not in SUPPORTED:
            raise ConfigError(
                f"fp8_comm: attention at {where(end)} runs in {spec.dtype}; FP8 all-to-all supports {[str(d) for d in SUPPORTED]}. "
                "Set ParallelConfig(fp8_comm=False) or cast the model."
            )
        uneven = spec.head_padding == "uneven" and heads % spec.ulysses != 0
        if role == "o" and uneven:
            new = splice(
                gm.graph, end, heads_to_seq_uneven, [src, spec, True], origin=end, pass_name=PASS
            )
        elif role == "o":
            new = splice(gm.graph, end, heads_to_seq_fp8, [src, spec], origin=end, pass_name=PASS)
        elif uneven:
            new = splice(
                gm.graph,
                end,
                seq_to_heads_uneven,
                [src, spec, heads, role, True],
                origin=end,
                pass_name=PASS,
            )
        else:
            new = splice(
                gm.graph,
                end,
                seq_to_heads_fp8,
                [src, spec, heads, role],
                origin=end,
                pass_name=PASS,
            )
        end.replace_all_uses_with(new)
        _erase_chain(gm.graph, end, src)
        counters[PASS][role] += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
