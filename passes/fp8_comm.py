"""fp8_comm: choose the FP8 payload codec for the Q, V and O all-to-alls (K keeps its dtype).

Preconditions: `shard_tokens` ran; each `cpfx::sharded_attention` placeholder carries its
`AttnSite`. Runs before `lower_attention`, which reads the choice.
Postconditions: the graph is unchanged but for `meta["cpfx_fp8"] = {"q", "v", "o"}` on each
placeholder of a mesh with a Ulysses dim. `lower_attention` then sends those payloads through
`cpfx.attention.Fp8`: `cpfx::fp8_quantize` (fused permute + per-(token, head) scale, scale bytes
inline at the end of each row) -> one uint8 all-to-all -> `cpfx::fp8_dequantize`. FP8 crosses the
collective only as uint8 (gloo refuses float8 dtypes). K keeps its dtype: softmax(Q K^T) is the
sensitive part. Bytes per element: (D + 4) / D instead of 2 (bf16) or 4 (fp32).

    lowered without:  q2 = permute(wait(all_to_all(reshape(permute(q)))))
    lowered with:     q2 = fp8_dequantize(wait(all_to_all(fp8_quantize(q, U))))
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

import cpfx.kernels.fp8  # noqa: F401  (registers torch.ops.cpfx.fp8_*)
from cpfx.context import PassContext
from cpfx.debug import counters
from cpfx.errors import ConfigError

log = logging.getLogger(__name__)
PASS = "fp8_comm"
FP8_ROLES = frozenset({"q", "v", "o"})
SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def fp8_comm_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    target = torch.ops.cpfx.sharded_attention.default
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]
    if ctx.mesh.ulysses == 1:
        log.warning("fp8_comm: no Ulysses dim in the mesh, nothing travels as FP8 (graph %d)",
                    ctx.graph_id)
        return gm
    for n in sites:
        site = n.meta["cpfx_attn"]
        if site.dtype not in SUPPORTED:
            raise ConfigError(
                f"fp8_comm: attention at {site.where} runs in {site.dtype}; FP8 all-to-all "
                f"supports {[str(d) for d in SUPPORTED]}. Set ParallelConfig(fp8_comm=False) "
                "or cast the model."
            )
        n.meta["cpfx_fp8"] = FP8_ROLES
        for role in sorted(FP8_ROLES):
            counters[PASS][role] += 1
    return gm
