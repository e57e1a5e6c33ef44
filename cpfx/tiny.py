"""Tiny random diffusers transformers and their inputs, built offline and deterministically.

One builder per supported model family; each returns `(model.eval(), forward_kwargs)` with
`return_dict=False` (1-2 layers of each kind, a few heads, tens to thousands of tokens as asked).
Used by the tests, the benchmarks and `python -m cpfx explain`; no downloads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + 1)


def _text_mask(txt: int, valid: int | None = None) -> torch.Tensor:
    """[1, txt] long mask: the prompt, then padding at the end."""
    mask = torch.ones(1, txt, dtype=torch.long)
    mask[0, (valid if valid is not None else txt - 2) :] = 0
    return mask


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
    g = _gen(seed)
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


class FluxBlock(torch.nn.Module):
    """One Flux double-stream block driven directly, RoPE tables passed in over the joined
    [txt | img] sequence (as code that runs the blocks itself does); returns [txt | img]."""

    def __init__(self, heads: int, head_dim: int):
        from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

        super().__init__()
        self.block = FluxTransformerBlock(heads * head_dim, heads, head_dim)

    def forward(self, hidden_states, encoder_hidden_states, temb, cos, sin):
        txt, img = self.block(hidden_states, encoder_hidden_states, temb, (cos, sin))
        return torch.cat([txt, img], dim=1)


def flux_block(img: int = 64, txt: int = 8, heads: int = 2, head_dim: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    m = FluxBlock(heads, head_dim).eval()
    g = _gen(seed)
    dim = heads * head_dim
    angles = torch.rand(txt + img, head_dim, generator=g) * 6.28
    kw = {
        "hidden_states": torch.randn(1, img, dim, generator=g),
        "encoder_hidden_states": torch.randn(1, txt, dim, generator=g),
        "temb": torch.randn(1, dim, generator=g),
        "cos": angles.cos(),
        "sin": angles.sin(),
    }
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
    g = _gen(seed)
    mask = _text_mask(txt)  # padding at the end
    mask[0, 2] = 0  # and a hole inside the prompt
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
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(1, 4, frames, h, w, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        return_dict=False,
    )
    return m, kw


def flux2(
    h: int = 8,
    w: int = 8,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 1,
    single: int = 1,
    seed: int = 0,
):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    m = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=layers,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        timestep_guidance_channels=32,
        axes_dims_rope=(head_dim // 4,) * 4,
        guidance_embeds=True,
    ).eval()
    g = _gen(seed)
    # Position ids as the Flux2 pipeline builds them: image (t, h, w, l) = (0, y, x, 0),
    # text (0, 0, 0, l).
    img_ids = torch.cartesian_prod(
        torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)
    ).float()
    txt_ids = torch.cartesian_prod(
        torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(txt)
    ).float()
    kw = dict(
        hidden_states=torch.randn(1, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids[None],
        txt_ids=txt_ids[None],
        guidance=torch.tensor([4.0]),
        return_dict=False,
    )
    return m, kw


def ltx(
    frames: int = 2,
    h: int = 8,
    w: int = 8,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    seed: int = 0,
):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    m = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        cross_attention_dim=heads * head_dim,
        num_layers=layers,
        caption_channels=32,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(1, frames * h * w, 8, generator=g),  # already patchified
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        timestep=torch.tensor([500]),
        encoder_attention_mask=_text_mask(txt),
        num_frames=frames,
        height=h,
        width=w,
        rope_interpolation_scale=(
            8 / 25,
            32,
            32,
        ),  # what LTXPipeline passes (temporal/fps, spatial)
        return_dict=False,
    )
    return m, kw


def hunyuan_video(
    frames: int = 2,
    h: int = 16,
    w: int = 16,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 1,
    single: int = 1,
    seed: int = 0,
):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    m = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=layers,
        num_single_layers=single,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=32,
        pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(1, 4, frames, h, w, generator=g),  # 2 x 8 x 8 = 128 tokens
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        encoder_attention_mask=_text_mask(txt),
        pooled_projections=torch.randn(1, 16, generator=g),
        guidance=torch.tensor([6000.0]),
        return_dict=False,
    )
    return m, kw


def hunyuan_image(
    h: int = 8,
    w: int = 8,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 1,
    single: int = 1,
    seed: int = 0,
):
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(seed)
    m = HunyuanImageTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=layers,
        num_single_layers=single,
        num_refiner_layers=1,
        patch_size=(1, 1),
        text_embed_dim=32,
        rope_axes_dim=(head_dim // 2, head_dim // 2),
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(1, 4, h, w, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        encoder_attention_mask=_text_mask(txt),
        return_dict=False,
    )
    return m, kw


def cogvideox(
    frames: int = 2,
    h: int = 16,
    w: int = 16,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    seed: int = 0,
):
    """CogVideoX 1.0 (2B-like): sinusoidal 3-D positional embedding added after the [text|video] cat."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    m = CogVideoXTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=layers,
        sample_width=w,
        sample_height=h,
        sample_frames=(frames - 1) * 4 + 1,
        patch_size=2,
        max_text_seq_length=txt,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(1, frames, 4, h, w, generator=g),  # 2 x 8 x 8 = 128 tokens
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        timestep=torch.tensor([500]),
        return_dict=False,
    )
    return m, kw


def cogvideox15(
    frames: int = 4,
    h: int = 16,
    w: int = 16,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    seed: int = 0,
):
    """CogVideoX 1.5-like: temporal patching (patch_size_t=2), 3-D RoPE passed in as an input."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.manual_seed(seed)
    m = CogVideoXTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=layers,
        sample_width=w,
        sample_height=h,
        sample_frames=(frames - 1) * 4 + 1,
        patch_size=2,
        patch_size_t=2,
        max_text_seq_length=txt,
        use_rotary_positional_embeddings=True,
        patch_bias=False,
    ).eval()
    g = _gen(seed)
    p, p_t = 2, 2
    # As CogVideoXPipeline._prepare_rotary_positional_embeddings does for 1.5.
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=head_dim,
        crops_coords=None,
        grid_size=(h // p, w // p),
        temporal_size=(frames + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(h // p, w // p),
    )
    kw = dict(
        hidden_states=torch.randn(1, frames, 4, h, w, generator=g),  # 2 x 8 x 8 = 128 tokens
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        timestep=torch.tensor([500]),
        image_rotary_emb=(cos, sin),
        return_dict=False,
    )
    return m, kw


def _cogview_sizes(h: int, w: int) -> dict[str, torch.Tensor]:
    return dict(
        original_size=torch.tensor([[h * 8.0, w * 8.0]]),
        target_size=torch.tensor([[h * 8.0, w * 8.0]]),
        crop_coords=torch.tensor([[0.0, 0.0]]),
    )


def cogview3plus(
    h: int = 16,
    w: int = 16,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    seed: int = 0,
):
    from diffusers import CogView3PlusTransformer2DModel

    torch.manual_seed(seed)
    m = CogView3PlusTransformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        out_channels=4,
        text_embed_dim=32,
        time_embed_dim=32,
        condition_dim=8,
        pos_embed_max_size=16,
        sample_size=16,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(1, 4, h, w, generator=g),  # 8 x 8 = 64 tokens
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        timestep=torch.tensor([500]),
        **_cogview_sizes(h, w),
        return_dict=False,
    )
    return m, kw


def cogview4(
    h: int = 16,
    w: int = 16,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    seed: int = 0,
):
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(seed)
    m = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        text_embed_dim=32,
        time_embed_dim=32,
        condition_dim=8,
        pos_embed_max_size=16,
        sample_size=16,
        rope_axes_dim=(32, 32),
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(1, 4, h, w, generator=g),  # 8 x 8 = 64 tokens
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        timestep=torch.tensor([500]),
        **_cogview_sizes(h, w),
        return_dict=False,
    )
    return m, kw


def z_image(
    h: int = 16,
    w: int = 16,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 32,
    layers: int = 2,
    seed: int = 0,
):
    """Z-Image: list inputs ([C, F, H, W] latents, [L, D] captions); sequences padded to 32 inside."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    m = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=heads * head_dim,
        n_layers=layers,
        n_refiner_layers=1,
        n_heads=heads,
        n_kv_heads=heads,
        cap_feat_dim=32,
        axes_dims=[head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8],
        axes_lens=[64, 32, 32],
    ).eval()
    g = _gen(seed)
    kw = dict(
        x=[torch.randn(4, 1, h, w, generator=g)],  # 8 x 8 = 64 tokens
        t=torch.tensor([0.5]),
        cap_feats=[torch.randn(txt, 32, generator=g)],
        return_dict=False,
    )
    return m, kw


def ovis_image(
    h: int = 8,
    w: int = 8,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 1,
    single: int = 1,
    seed: int = 0,
):
    from diffusers import OvisImageTransformer2DModel

    torch.manual_seed(seed)
    m = OvisImageTransformer2DModel(
        patch_size=1,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        axes_dims_rope=(head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8),
    ).eval()
    g = _gen(seed)
    img_ids = torch.zeros(h * w, 3)
    img_ids[:, 1] = torch.arange(h * w) // w
    img_ids[:, 2] = torch.arange(h * w) % w
    kw = dict(
        hidden_states=torch.randn(1, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(txt, 3),
        return_dict=False,
    )
    return m, kw


def wan22(
    frames: int = 2,
    h: int = 16,
    w: int = 16,
    txt: int = 8,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    seed: int = 0,
):
    """Wan 2.2 TI2V-like: 48-channel-style latents (12 here) and a per-token timestep [B, seq]
    (what WanPipeline passes with `expand_timesteps=True`; first-frame tokens at t=0 as in I2V)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=12,
        out_channels=12,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=layers,
        rope_max_seq_len=32,
    ).eval()
    g = _gen(seed)
    pf, ph, pw = frames, h // 2, w // 2
    ts = torch.full((pf, ph, pw), 500.0)
    ts[0] = 0.0  # the conditioning frame is clean
    kw = dict(
        hidden_states=torch.randn(1, 12, frames, h, w, generator=g),  # 2 x 8 x 8 = 128 tokens
        timestep=ts.flatten()[None],
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
        return_dict=False,
    )
    return m, kw


BUILDERS: dict[str, Callable[..., tuple[torch.nn.Module, dict[str, Any]]]] = {
    "flux": flux,
    "qwen": qwen,
    "wan": wan,
    "flux2": flux2,
    "ltx": ltx,
    "hunyuan_image": hunyuan_image,
    "hunyuan_video": hunyuan_video,
    "cogvideox": cogvideox,
    "cogvideox15": cogvideox15,
    "cogview3plus": cogview3plus,
    "cogview4": cogview4,
    "z_image": z_image,
    "ovis_image": ovis_image,
    "wan22": wan22,
    "flux_block": flux_block,
}
"""Every model family cpfx is tested on, by name."""
EXTRA = sorted(set(BUILDERS) - {"flux", "qwen", "wan", "flux_block"})
"""The families beyond the three core ones (tested in tests/test_models.py)."""


def build(
    name: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kw: Any,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, forward kwargs) of a builder; `device` / `dtype` move the model and the tensor
    inputs (`dtype` only the floating-point ones: ids and masks keep theirs)."""
    m, inputs = BUILDERS[name](**kw)
    if device is None and dtype is None:
        return m, inputs

    def move(v: Any) -> Any:
        if not torch.is_tensor(v):
            return v
        return v.to(device, dtype) if v.is_floating_point() else v.to(device)

    return m.to(device, dtype), {k: move(v) for k, v in inputs.items()}
