"""cpfx's own graph ops: placeholders that passes lower before the graph runs."""

from __future__ import annotations

import torch

from cpfx.errors import CpfxError


@torch.library.custom_op("cpfx::sharded_attention", mutates_args=())
def sharded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention over a token-sharded sequence, before a strategy is chosen. Never runs."""
    raise CpfxError(
        "cpfx::sharded_attention reached execution: the attention lowering pass was skipped "
        "(remove 'lower_attention' from ParallelConfig.skip_passes)"
    )


@sharded_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("cpfx::positions", mutates_args=())
def positions(like: torch.Tensor, starts: list[int], lengths: list[int]) -> torch.Tensor:
    """The global positions `start .. start + length - 1` of each piece, concatenated (int64, on
    `like`'s device): which tokens a shard holds, for masks built from positions (causal)."""
    parts = [torch.arange(s, s + n, device=like.device) for s, n in zip(starts, lengths)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=like.device)


@positions.register_fake
def _(like: torch.Tensor, starts: list[int], lengths: list[int]) -> torch.Tensor:
    return like.new_empty(sum(lengths), dtype=torch.long)
