"""Tier C: what only a GPU shows (skipped without CUDA). Kernel checks are in test_fp8_kernels.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpfx.attention import AttnSpec, attention_lse, merge_lse
from cpfx.sharding.layout import Layout

pytestmark = pytest.mark.gpu


def _spec(dtype, mask_shape):
    from cpfx.attention import AttnSite
    from cpfx.mesh import MeshInfo

    site = AttnSite(
        q_layout=Layout.even(96, 1), kv_layout=Layout.even(96, 1), batch=1, heads=4, kv_heads=4,
        head_dim=64, value_dim=64, scale=None, enable_gqa=False, causal=False, dtype=dtype,
        mask_shape=mask_shape, mask_ndim=4, mask_is_bool=True, where="test",
    )
    mesh = MeshInfo(
        world=2, cp_rank=0, cp_group="", ulysses=1, ring=2, ulysses_index=0, ring_index=0,
        ulysses_group="", ring_group="", ring_ranks=(0, 1), device_type="cuda",
    )
    return AttnSpec(site=site, mesh=mesh)


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
def test_ring_blocks_with_lse_match_sdpa_on_cuda(dtype, tol):
    """Ring's CUDA path (efficient attention with log-sum-exp) over two uneven K/V blocks."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, 4, n, 64, device="cuda", generator=g, dtype=dtype) for n in (64, 96, 96)
    )
    mask = torch.rand(1, 1, 64, 96, device="cuda", generator=g) > 0.3
    mask[..., 40:] = False  # the second block is fully masked for some rows' keys
    mask[..., 0, :] = False
    mask[..., 0, 50] = True  # row 0 sees one key, in block 2 only
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    spec = _spec(dtype, (1, 1, 64, 96))
    acc = lse = None
    for lo, hi in ((0, 40), (40, 96)):
        o, l = attention_lse(
            q, k[:, :, lo:hi], v[:, :, lo:hi], mask[..., lo:hi], spec, (1, 4, 64, hi - lo)
        )
        acc, lse = merge_lse(acc, lse, o, l)
    torch.testing.assert_close(acc.to(dtype), ref, atol=tol, rtol=tol)
