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
