"""Tiny random diffusers transformers and their inputs, built offline and deterministically.

Used by the tests, benchmarks and `python -m cpfx explain`; no downloads."""

from __future__ import annotations

from typing import Any

import torch


def flux(
    img: int = 64,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 1,
    single: int = 1,
    seed: int = 0,
):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    rope = (head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8)
    m = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=layers,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=rope,
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.zeros(img, 3)
    ids[:, 1] = torch.arange(img) // 8
    ids[:, 2] = torch.arange(img) % 8
    kw = dict(
        hidden_states=torch.randn(1, img, 4, generator=g),
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=ids,
        txt_ids=torch.zeros(txt, 3),
        return_dict=False,
    )
    return m, kw


def qwen(
    h: int = 8,
    w: int = 8,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    seed: int = 0,
):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    m = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        axes_dims_rope=(head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8),
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.ones(1, txt, dtype=torch.long)
    mask[0, 2] = 0  # a hole inside the prompt
    mask[0, txt - 2 :] = 0  # padding at the end
    kw = dict(
        hidden_states=torch.randn(1, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        encoder_hidden_states_mask=mask,
        timestep=torch.tensor([0.5]),
        img_shapes=[(1, h, w)],
        return_dict=False,
    )
    return m, kw


def wan(
    frames: int = 2,
    h: int = 8,
    w: int = 8,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    seed: int = 0,
):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=layers,
        rope_max_seq_len=32,
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    kw = dict(
        hidden_states=torch.randn(1, 4, frames, h, w, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        return_dict=False,
    )
    return m, kw


BUILDERS = {"flux": flux, "qwen": qwen, "wan": wan}


def build(name: str, **kw: Any):
    return BUILDERS[name](**kw)
