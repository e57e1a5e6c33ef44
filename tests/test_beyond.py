"""Parallel beyond attention, on real gloo ranks: reductions over the sharded tokens (partial
values and one all-reduce) and convolutions over a token grid whose rows are sharded (halos from
the neighbours), exact against the single process and without gathering the sequence."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from cpfx.testing.parity import compare, fresh

TOL = 1e-5


class GridBlock(torch.nn.Module):
    """Self-attention over an H x W token grid, then a convolutional feed-forward on the grid
    (depthwise 3x3, a dilated 5x5, pointwise 1x1), a linear-attention-style K^T V summed over the
    tokens, and a gate from the mean over the tokens (Sana-like, with more reductions)."""

    def __init__(self, h: int, w: int, c: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.h, self.w, self.heads = h, w, heads
        self.qkv = torch.nn.Linear(c, 3 * c)
        self.out = torch.nn.Linear(c, c)
        self.dw = torch.nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.dilated = torch.nn.Conv2d(c, c, 5, padding=4, dilation=2)
        self.pw = torch.nn.Conv2d(c, c, 1)
        self.k = torch.nn.Linear(c, c)
        self.v = torch.nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.out(a)
        g = x.transpose(1, 2).unflatten(2, (self.h, self.w))  # [B, C, H, W]
        g = self.pw(F.silu(self.dilated(self.dw(g))))
        x = x + g.flatten(2).transpose(1, 2)
        kv = torch.matmul(F.relu(self.k(x)).transpose(1, 2), self.v(x))  # [B, C, C]: over tokens
        x = x + torch.matmul(x, kv) / n
        return x * x.mean(dim=1, keepdim=True).sigmoid() + x.abs().amax()


@pytest.mark.parametrize(
    "world, h, w", [(2, 6, 5), (3, 6, 5), (2, 8, 3)], ids=["2x(3 rows)", "3x(2 rows)", "2x(4 rows)"]
)
def test_grid_block_exact_without_gathering_the_sequence(pools, world, h, w):
    for res in pools(world).run(grid_parity, h=h, w=w):
        assert res["max_abs"] <= TOL, res
        c = res["counters"]
        assert c.get("convolution_halo", 0) == 2 and c.get("convolution_rows", 0) == 1, c
        assert c.get("reduce", 0) >= 3, c  # K^T V, the mean, the amax
        assert c.get("gather", 0) == 1, c  # the output only


def test_grid_rows_not_aligned_are_gathered_exactly(pools):
    """35 tokens of 5 x 7 over 2 ranks: shards split a row; the convolution input is gathered."""
    for res in pools(2).run(grid_parity, h=5, w=7):
        assert res["max_abs"] <= TOL, res
        assert res["counters"].get("convolution_halo", 0) == 0


# --- tasks run by every rank of a gloo pool ------------------------------------------------------


def grid_parity(h: int, w: int) -> dict[str, Any]:
    fresh()
    torch.manual_seed(0)
    model = GridBlock(h, w).eval()
    x = torch.randn(2, h * w, 8, generator=torch.Generator().manual_seed(1))
    res = compare(model, {"x": x}, config={"check_collectives": True})
    return {"max_abs": res["max_abs"], "counters": res["counters"].get("shard_tokens", {})}
