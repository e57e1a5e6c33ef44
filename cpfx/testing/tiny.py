"""Tiny random diffusers transformers of the seed model families, built offline, deterministically.

`FAMILIES` is one table: per family, the diffusers class, its default sizes, the constructor config
and the forward inputs as functions of the sizes. `build(name, **sizes)` is the one builder:
`torch.manual_seed(seed)`, the model (1-2 layers of each kind, a few heads), then the inputs drawn
from a generator seeded with `seed + 1`; it returns `(model.eval(), forward kwargs)` with
`return_dict=False`. Used by the tests, the benchmarks, the demo and `python -m cpfx explain`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

Sizes = SimpleNamespace
"""A family's size arguments (`img`, `txt`, `heads`, `head_dim`, `layers`, ...) by attribute."""
Inputs = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: a class, its default sizes, and how the sizes make it and its inputs."""

    cls: str | type[torch.nn.Module]
    """A class name in the `diffusers` namespace, or a module class (then no `return_dict`)."""
    sizes: dict[str, int]
    """Default size arguments; `build(name, **sizes)` overrides them by name."""
    init: Callable[[Sizes], dict[str, Any]]
    """Constructor keyword arguments for the sizes."""
    inputs: Callable[[Sizes, torch.Generator], Inputs]
    """Forward keyword arguments; random tensors drawn from the generator, in this order."""


# ---------------------------------------------------------------------------------------------
# Pieces the families share


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _text(s: Sizes, g: torch.Generator) -> torch.Tensor:
    """Prompt embeddings [1, txt, 32]."""
    return torch.randn(1, s.txt, 32, generator=g)


def _text_mask(txt: int) -> torch.Tensor:
    """[1, txt] long mask: the prompt, then two padding tokens at the end."""
    mask = torch.ones(1, txt, dtype=torch.long)
    mask[0, txt - 2 :] = 0
    return mask


def _heads(s: Sizes) -> dict[str, int]:
    return {"attention_head_dim": s.head_dim, "num_attention_heads": s.heads}


def _rope3(head_dim: int) -> tuple[int, int, int]:
    """Three RoPE axes (time, y, x) splitting one head."""
    return (head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8)


def _grid_ids(h: int, w: int, cols: int) -> torch.Tensor:
    """[h * w, 3] position ids (0, y, x) of a row-major grid `cols` wide."""
    ids = torch.zeros(h * w, 3)
    ids[:, 1] = torch.arange(h * w) // cols
    ids[:, 2] = torch.arange(h * w) % cols
    return ids


def _cogview_sizes(h: int, w: int) -> dict[str, torch.Tensor]:
    return {
        "original_size": torch.tensor([[h * 8.0, w * 8.0]]),
        "target_size": torch.tensor([[h * 8.0, w * 8.0]]),
        "crop_coords": torch.tensor([[0.0, 0.0]]),
    }


# ---------------------------------------------------------------------------------------------
# Inputs of the families whose inputs need more than a line


def _flux_inputs(s: Sizes, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, 1, s.img, 4),
        "encoder_hidden_states": _text(s, g),
        "pooled_projections": _randn(g, 1, 32),
        "timestep": torch.tensor([0.5]),
        "img_ids": _grid_ids(s.img, 1, 8),
        "txt_ids": torch.zeros(s.txt, 3),
    }


class FluxBlock(torch.nn.Module):
    """One Flux double-stream block driven directly, RoPE tables passed in over the joined
    [txt | img] sequence (as code that runs the blocks itself does); returns [txt | img]."""

    def __init__(self, heads: int, head_dim: int) -> None:
        from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

        super().__init__()
        self.block = FluxTransformerBlock(heads * head_dim, heads, head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        txt, img = self.block(hidden_states, encoder_hidden_states, temb, (cos, sin))
        return torch.cat([txt, img], dim=1)


def _flux_block_inputs(s: Sizes, g: torch.Generator) -> Inputs:
    dim = s.heads * s.head_dim
    angles = torch.rand(s.txt + s.img, s.head_dim, generator=g) * 6.28
    return {
        "hidden_states": _randn(g, 1, s.img, dim),
        "encoder_hidden_states": _randn(g, 1, s.txt, dim),
        "temb": _randn(g, 1, dim),
        "cos": angles.cos(),
        "sin": angles.sin(),
    }


def _qwen_inputs(s: Sizes, g: torch.Generator) -> Inputs:
    mask = _text_mask(s.txt)  # padding at the end
    mask[0, 2] = 0  # and a hole inside the prompt
    return {
        "hidden_states": _randn(g, 1, s.h * s.w, 16),
        "encoder_hidden_states": _text(s, g),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor([0.5]),
        "img_shapes": [(1, s.h, s.w)],
    }


def _flux2_inputs(s: Sizes, g: torch.Generator) -> Inputs:
    # Position ids as the Flux2 pipeline builds them: image (t, h, w, l) = (0, y, x, 0),
    # text (0, 0, 0, l).
    one = torch.arange(1)
    img_ids = torch.cartesian_prod(one, torch.arange(s.h), torch.arange(s.w), one).float()
    txt_ids = torch.cartesian_prod(one, one, one, torch.arange(s.txt)).float()
    return {
        "hidden_states": _randn(g, 1, s.h * s.w, 16),
        "encoder_hidden_states": _text(s, g),
        "timestep": torch.tensor([0.5]),
        "img_ids": img_ids[None],
        "txt_ids": txt_ids[None],
        "guidance": torch.tensor([4.0]),
    }


def _ltx_inputs(s: Sizes, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, 1, s.frames * s.h * s.w, 8),  # already patchified
        "encoder_hidden_states": _text(s, g),
        "timestep": torch.tensor([500]),
        "encoder_attention_mask": _text_mask(s.txt),
        "num_frames": s.frames,
        "height": s.h,
        "width": s.w,
        "rope_interpolation_scale": (8 / 25, 32, 32),  # what LTXPipeline passes (time/fps, space)
    }


def _hunyuan_video_inputs(s: Sizes, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, 1, 4, s.frames, s.h, s.w),  # 2 x 8 x 8 = 128 tokens
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": _text(s, g),
        "encoder_attention_mask": _text_mask(s.txt),
        "pooled_projections": _randn(g, 1, 16),
        "guidance": torch.tensor([6000.0]),
    }


def _cogvideox15_inputs(s: Sizes, g: torch.Generator) -> Inputs:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p, p_t = 2, 2
    # As CogVideoXPipeline._prepare_rotary_positional_embeddings does for 1.5.
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=s.head_dim,
        crops_coords=None,
        grid_size=(s.h // p, s.w // p),
        temporal_size=(s.frames + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(s.h // p, s.w // p),
    )
    return {
        "hidden_states": _randn(g, 1, s.frames, 4, s.h, s.w),  # 2 x 8 x 8 = 128 tokens
        "encoder_hidden_states": _text(s, g),
        "timestep": torch.tensor([500]),
        "image_rotary_emb": (cos, sin),
    }


def _wan22_inputs(s: Sizes, g: torch.Generator) -> Inputs:
    ts = torch.full((s.frames, s.h // 2, s.w // 2), 500.0)
    ts[0] = 0.0  # the conditioning frame is clean
    return {
        "hidden_states": _randn(g, 1, 12, s.frames, s.h, s.w),  # 2 x 8 x 8 = 128 tokens
        "timestep": ts.flatten()[None],
        "encoder_hidden_states": _text(s, g),
    }


# ---------------------------------------------------------------------------------------------
# Constructor configs that two families share


def _wan_init(channels: int) -> Callable[[Sizes], dict[str, Any]]:
    return lambda s: dict(
        patch_size=(1, 2, 2), **_heads(s), in_channels=channels, out_channels=channels,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=s.layers, rope_max_seq_len=32,
    )  # fmt: skip


def _cogvideox_init(s: Sizes, **extra: Any) -> dict[str, Any]:
    return dict(
        **_heads(s), in_channels=4, out_channels=4, time_embed_dim=32, text_embed_dim=32,
        num_layers=s.layers, sample_width=s.w, sample_height=s.h,
        sample_frames=(s.frames - 1) * 4 + 1, patch_size=2, max_text_seq_length=s.txt, **extra,
    )  # fmt: skip


def _hunyuan_init(s: Sizes, **extra: Any) -> dict[str, Any]:
    return dict(
        in_channels=4, out_channels=4, **_heads(s), num_layers=s.layers,
        num_single_layers=s.single, num_refiner_layers=1, text_embed_dim=32, **extra,
    )  # fmt: skip


def _cogview_init(s: Sizes, **extra: Any) -> dict[str, Any]:
    return dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=s.layers, **_heads(s),
        text_embed_dim=32, time_embed_dim=32, condition_dim=8, pos_embed_max_size=16,
        sample_size=16, **extra,
    )  # fmt: skip


def _cogview_inputs(s: Sizes, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, 1, 4, s.h, s.w),  # 8 x 8 = 64 tokens
        "encoder_hidden_states": _text(s, g),
        "timestep": torch.tensor([500]),
        **_cogview_sizes(s.h, s.w),
    }


# ---------------------------------------------------------------------------------------------
# The table

_IMAGE = {"h": 8, "w": 8, "txt": 8, "heads": 2, "head_dim": 16}
_IMAGE16 = {**_IMAGE, "h": 16, "w": 16}
_VIDEO = {"frames": 2, **_IMAGE}
_VIDEO16 = {"frames": 2, **_IMAGE16}

# fmt: off
FAMILIES: dict[str, Family] = {
    "flux": Family(
        "FluxTransformer2DModel",
        {"img": 64, "txt": 8, "heads": 2, "head_dim": 16, "layers": 1, "single": 1},
        lambda s: dict(
            patch_size=1, in_channels=4, num_layers=s.layers, num_single_layers=s.single,
            **_heads(s), joint_attention_dim=32, pooled_projection_dim=32,
            axes_dims_rope=_rope3(s.head_dim),
        ),
        _flux_inputs,
    ),
    "flux_block": Family(
        FluxBlock,
        {"img": 64, "txt": 8, "heads": 2, "head_dim": 16},
        lambda s: {"heads": s.heads, "head_dim": s.head_dim},
        _flux_block_inputs,
    ),
    "qwen": Family(
        "QwenImageTransformer2DModel",
        {**_IMAGE, "layers": 2},
        lambda s: dict(
            patch_size=2, in_channels=16, out_channels=4, num_layers=s.layers, **_heads(s),
            joint_attention_dim=32, axes_dims_rope=_rope3(s.head_dim),
        ),
        _qwen_inputs,
    ),
    "wan": Family(
        "WanTransformer3DModel",
        {**_VIDEO, "layers": 2},
        _wan_init(4),
        lambda s, g: {
            "hidden_states": _randn(g, 1, 4, s.frames, s.h, s.w),
            "timestep": torch.tensor([500]),
            "encoder_hidden_states": _text(s, g),
        },
    ),
    "wan22": Family(
        # Wan 2.2 TI2V-like: 48-channel-style latents (12 here) and a per-token timestep [B, seq]
        # (what WanPipeline passes with `expand_timesteps=True`; first-frame tokens at t=0 as I2V).
        "WanTransformer3DModel",
        {**_VIDEO16, "layers": 2},
        _wan_init(12),
        _wan22_inputs,
    ),
    "flux2": Family(
        "Flux2Transformer2DModel",
        {**_IMAGE, "layers": 1, "single": 1},
        lambda s: dict(
            patch_size=1, in_channels=16, num_layers=s.layers, num_single_layers=s.single,
            **_heads(s), joint_attention_dim=32, timestep_guidance_channels=32,
            axes_dims_rope=(s.head_dim // 4,) * 4, guidance_embeds=True,
        ),
        _flux2_inputs,
    ),
    "ltx": Family(
        "LTXVideoTransformer3DModel",
        {**_VIDEO, "layers": 2},
        lambda s: dict(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, **_heads(s),
            cross_attention_dim=s.heads * s.head_dim, num_layers=s.layers, caption_channels=32,
        ),
        _ltx_inputs,
    ),
    "hunyuan_video": Family(
        "HunyuanVideoTransformer3DModel",
        {**_VIDEO16, "layers": 1, "single": 1},
        lambda s: _hunyuan_init(
            s, patch_size=2, patch_size_t=1, guidance_embeds=True, pooled_projection_dim=16,
            rope_axes_dim=(4, 6, 6),
        ),
        _hunyuan_video_inputs,
    ),
    "hunyuan_image": Family(
        "HunyuanImageTransformer2DModel",
        {**_IMAGE, "layers": 1, "single": 1},
        lambda s: _hunyuan_init(
            s, patch_size=(1, 1), rope_axes_dim=(s.head_dim // 2, s.head_dim // 2)
        ),
        lambda s, g: {
            "hidden_states": _randn(g, 1, 4, s.h, s.w),
            "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": _text(s, g),
            "encoder_attention_mask": _text_mask(s.txt),
        },
    ),
    "cogvideox": Family(
        # CogVideoX 1.0 (2B-like): sinusoidal 3-D positional embedding added after [text|video].
        "CogVideoXTransformer3DModel",
        {**_VIDEO16, "layers": 2},
        _cogvideox_init,
        lambda s, g: {
            "hidden_states": _randn(g, 1, s.frames, 4, s.h, s.w),  # 2 x 8 x 8 = 128 tokens
            "encoder_hidden_states": _text(s, g),
            "timestep": torch.tensor([500]),
        },
    ),
    "cogvideox15": Family(
        # CogVideoX 1.5-like: temporal patching (patch_size_t=2), 3-D RoPE passed in as an input.
        "CogVideoXTransformer3DModel",
        {**_VIDEO16, "frames": 4, "layers": 2},
        lambda s: _cogvideox_init(
            s, patch_size_t=2, use_rotary_positional_embeddings=True, patch_bias=False
        ),
        _cogvideox15_inputs,
    ),
    "cogview3plus": Family(
        "CogView3PlusTransformer2DModel",
        {**_IMAGE16, "layers": 2},
        _cogview_init,
        _cogview_inputs,
    ),
    "cogview4": Family(
        "CogView4Transformer2DModel",
        {**_IMAGE16, "layers": 2},
        lambda s: _cogview_init(s, rope_axes_dim=(32, 32)),
        _cogview_inputs,
    ),
    "z_image": Family(
        # Z-Image: list inputs ([C, F, H, W] latents, [L, D] captions); sequences padded to 32.
        "ZImageTransformer2DModel",
        {**_IMAGE16, "head_dim": 32, "layers": 2},
        lambda s: dict(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=s.heads * s.head_dim,
            n_layers=s.layers, n_refiner_layers=1, n_heads=s.heads, n_kv_heads=s.heads,
            cap_feat_dim=32, axes_dims=list(_rope3(s.head_dim)), axes_lens=[64, 32, 32],
        ),
        lambda s, g: {
            "x": [_randn(g, 4, 1, s.h, s.w)],  # 8 x 8 = 64 tokens
            "t": torch.tensor([0.5]),
            "cap_feats": [_randn(g, s.txt, 32)],
        },
    ),
    "ovis_image": Family(
        "OvisImageTransformer2DModel",
        {**_IMAGE, "layers": 1, "single": 1},
        lambda s: dict(
            patch_size=1, in_channels=16, out_channels=16, num_layers=s.layers,
            num_single_layers=s.single, **_heads(s), joint_attention_dim=32,
            axes_dims_rope=_rope3(s.head_dim),
        ),
        lambda s, g: {
            "hidden_states": _randn(g, 1, s.h * s.w, 16),
            "encoder_hidden_states": _text(s, g),
            "timestep": torch.tensor([0.5]),
            "img_ids": _grid_ids(s.h, s.w, s.w),
            "txt_ids": torch.zeros(s.txt, 3),
        },
    ),
}
"""Every model family cpfx is tested on, by name."""
# fmt: on

NAMES = sorted(FAMILIES)
EXTRA = sorted(set(FAMILIES) - {"flux", "qwen", "wan", "flux_block"})
"""The families beyond the three core ones (tested in tests/test_models.py)."""


def build(
    name: str,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **sizes: int,
) -> tuple[torch.nn.Module, Inputs]:
    """(model, forward kwargs) of family `name` at `sizes` (the family's defaults for the rest).

    `device` / `dtype` move the model and the tensor inputs (`dtype` only the floating-point
    ones: ids and masks keep theirs)."""
    fam = FAMILIES[name]
    unknown = sorted(set(sizes) - set(fam.sizes))
    if unknown:
        known = sorted(fam.sizes)
        raise TypeError(f"tiny.build({name!r}): unknown sizes {unknown}; known: {known}")
    s = Sizes(**{**fam.sizes, **sizes})
    cls = fam.cls
    if isinstance(cls, str):
        import diffusers

        cls = getattr(diffusers, cls)
    torch.manual_seed(seed)
    model = cls(**fam.init(s)).eval()
    inputs = fam.inputs(s, torch.Generator().manual_seed(seed + 1))
    if isinstance(fam.cls, str):
        inputs["return_dict"] = False
    if device is None and dtype is None:
        return model, inputs

    def move(v: Any) -> Any:
        if not torch.is_tensor(v):
            return v
        return v.to(device, dtype) if v.is_floating_point() else v.to(device)

    return model.to(device, dtype), {k: move(v) for k, v in inputs.items()}


def flux_pipeline(transformer: torch.nn.Module) -> Any:
    """A diffusers FluxPipeline around a tiny Flux `transformer`: a tiny random VAE (seeded), no
    text encoders (call it with prompt embeddings: `flux_images`), no progress bar."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    pipe: Any = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_images(pipe: Any, steps: int) -> torch.Tensor:
    """`steps` denoising steps of a 32 x 32 image by a `flux_pipeline`, from fixed random prompt
    embeddings ([1, 8, 32] and pooled [1, 32]) and latents; no gradients."""
    g = torch.Generator().manual_seed(0)
    emb, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    with torch.no_grad():
        return pipe(
            prompt_embeds=emb,
            pooled_prompt_embeds=pooled,
            height=32,
            width=32,
            num_inference_steps=steps,
            guidance_scale=1.0,
            output_type="pt",
            generator=torch.Generator().manual_seed(1),
        ).images
