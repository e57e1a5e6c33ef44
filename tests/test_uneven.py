"""Any sequence length and any head count: gloo numerics and counted bytes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cpfx.testing.parity import fresh, make_mesh, parity
from tests.graphs import payload_bytes, rewrite
from tests.test_parity import check

ODD = {"img": 1023, "txt": 77}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_flux_1023_plus_77_tokens(pools, world):
    check(pools(world).run(parity, model="flux", model_kwargs=ODD))


@pytest.mark.parametrize(
    "world,heads,mode",
    [
        (2, 3, "auto"),
        (4, 6, "auto"),
        (4, 7, "auto"),
        (4, 30, "auto"),
        (4, 7, "pad"),
        (4, 6, "pad"),
    ],
)
def test_heads_not_divisible(pools, world, heads, mode):
    kw = {"heads": heads, "img": 64, "txt": 8}
    check(pools(world).run(parity, model="flux", model_kwargs=kw, config={"head_padding": mode}))


def test_uneven_heads_and_sequence_together(pools):
    kw = {"heads": 7, "img": 61, "txt": 7}
    check(pools(4).run(parity, model="flux", model_kwargs=kw))
    check(pools(4).run(parity, model="qwen", model_kwargs={"heads": 3, "h": 6, "w": 10, "txt": 7}))


@pytest.mark.parametrize("rotate", ["p2p", "allgather"])
def test_ring_uneven(pools, rotate):
    check(
        pools(3).run(
            parity,
            model="flux",
            model_kwargs={"img": 61, "txt": 7},
            mesh_names=("ring",),
            config={"ring_rotate": rotate},
        )
    )
    check(
        pools(3).run(
            parity,
            model="qwen",
            model_kwargs={"h": 6, "w": 10, "txt": 7},
            mesh_names=("ring",),
            config={"ring_rotate": rotate},
        )
    )


def test_usp_uneven_sequence_and_heads(pools):
    check(
        pools(4).run(
            parity,
            model="flux",
            model_kwargs={"heads": 3, "img": 61, "txt": 7},
            mesh_shape=(2, 2),
            mesh_names=("ring", "ulysses"),
        )
    )


def test_wan_uneven(pools):
    check(pools(3).run(parity, model="wan", model_kwargs={"h": 6, "w": 10, "heads": 4}))


def test_bytes_padded_vs_padding_free():
    """7 heads on 4 ranks, 64 + 8 tokens (18 per rank), head_dim 16, fp32, per attention."""
    kw = {"heads": 7, "img": 64, "txt": 8}
    one = {"qkv_all_to_all": "three"}
    (pad,) = rewrite("flux", world=4, model_kwargs=kw, head_padding="pad", **one)
    (free,) = rewrite("flux", world=4, model_kwargs=kw, head_padding="uneven", **one)
    s_loc, d, el, n_attn = 18, 16, 4, 2
    # padded: Q, K, V, O each move 8 heads (7 + 1 zero head) of every local token
    assert payload_bytes(pad) == {r: n_attn * s_loc * 8 * d * el for r in "qkvo"}
    # padding-free: Q, K, V send exactly the 7 real heads; O returns rank 0's 2 heads of all 72 tokens
    expected = {r: n_attn * s_loc * 7 * d * el for r in "qkv"}
    expected["o"] = n_attn * 72 * 2 * d * el
    assert payload_bytes(free) == expected


@pytest.mark.parametrize(
    "world,heads,kv_heads,names",
    [
        (2, 4, 2, ("ulysses",)),  # K/V heads divide: GQA kept through the all-to-all
        (4, 4, 1, ("ulysses",)),  # fewer K/V heads than ranks: K/V expanded before the all-to-all
        (4, 6, 2, ("ulysses",)),  # uneven query heads
        (2, 4, 2, ("ring",)),
    ],
)
def test_gqa(pools, world, heads, kv_heads, names):
    res = pools(world).run(gqa_parity, heads=heads, kv_heads=kv_heads, names=names)
    assert max(res) <= 1e-5, res


# --- tasks run by every rank of a gloo pool --------------------------------------------------


class GQAAttention(torch.nn.Module):
    """Self-attention with fewer K/V heads than query heads (enable_gqa), a mask and RoPE-like scale."""

    def __init__(self, heads: int, kv_heads: int, dim: int = 16):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, dim
        self.q = torch.nn.Linear(32, heads * dim)
        self.k = torch.nn.Linear(32, kv_heads * dim)
        self.v = torch.nn.Linear(32, kv_heads * dim)
        self.o = torch.nn.Linear(heads * dim, 32)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (self.h, self.d)).transpose(1, 2)
        k = self.k(x).unflatten(-1, (self.kv, self.d)).transpose(1, 2)
        v = self.v(x).unflatten(-1, (self.kv, self.d)).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=True, scale=0.3
        )
        return self.o(out.transpose(1, 2).flatten(2))


def gqa_parity(
    heads: int, kv_heads: int, tokens: int = 30, names: tuple[str, ...] = ("ulysses",)
) -> float:
    import cpfx

    fresh()
    torch.manual_seed(0)
    m = GQAAttention(heads, kv_heads).eval()
    x = torch.randn(1, tokens, 32)
    mask = torch.rand(1, tokens) > 0.3
    with torch.no_grad():
        ref = m(x, mask)
        cpfx.parallelize(m, make_mesh((dist.get_world_size(),), names))
        out = m(x, mask)
    assert cpfx.counters["shard_tokens"]["attention_sharded"] == 1
    return (out - ref).abs().max().item()
