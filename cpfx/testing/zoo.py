"""Every transformer class diffusers exports, as tiny random models with inputs a new user would pass.

`CASES` holds one or more `Case` per class in `sorted(n for n in dir(diffusers) if "Transformer" in n
and inspect.isclass(getattr(diffusers, n)))`; `build(case, seed)` returns `(model.eval(), forward
kwargs)`, deterministically and offline. The configurations follow diffusers' own model tests
(`tests/models/transformers/test_models_transformer_*.py`: `get_init_dict`, `get_dummy_inputs`) or,
for classes those tests do not cover, the class's pipeline. The inputs deliberately differ from what
the configuration's defaults fix: sizes other than `sample_size` / `sample_frames`, batch 2 where the
model allows it, text masks with padding (or a hole), token counts that 2 and 3 do not divide.

`outputs(result)` turns a forward's result into the list of tensors to compare; `FAST` names a few
cases that together cover the distinct attention patterns, for the test suite.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

Inputs = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Case:
    """One tiny configuration of one diffusers class, and how to call it."""

    name: str
    """Unique case name (the class's short name, plus the mode when a class has several)."""
    cls: str
    """The class's name in the `diffusers` namespace."""
    init: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    """Constructor keyword arguments (1-2 layers of each kind, few heads, small dims)."""
    inputs: Callable[[int], Inputs] | None = dataclasses.field(default=None, hash=False)
    """`seed -> forward kwargs`; tensors drawn from a `torch.Generator` seeded from `seed`."""
    note: str = ""
    """What the case exercises (token layout, masks, positions)."""
    skip_reason: str | None = None
    """Why the class cannot be built or run at all, even in a single process."""


# ---------------------------------------------------------------------------------------------
# Input helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + seed)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _steps(g: torch.Generator, batch: int, scale: float = 1000.0) -> torch.Tensor:
    """Float timesteps in (0, scale), one per sample."""
    return torch.rand(batch, generator=g) * scale


def _int_steps(g: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randint(0, 1000, (batch,), generator=g)


def _lengths_mask(
    lengths: Sequence[int], total: int, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """[B, total]: ones on the first `lengths[b]` tokens of sample b, padding after."""
    mask = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    return mask.to(dtype)


def _holed_mask(lengths: Sequence[int], total: int, hole: int, dtype: torch.dtype) -> torch.Tensor:
    """Like `_lengths_mask`, and token `hole` of sample 0 masked out too."""
    mask = _lengths_mask(lengths, total, dtype)
    mask[0, hole] = 0
    return mask


def _grid_ids(h: int, w: int, t: int = 0, axes: int = 3) -> torch.Tensor:
    """[h*w, axes] position ids (t, y, x[, 0]) of an image grid, as the Flux-family pipelines build them."""
    ids = torch.zeros(h, w, axes)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, axes)


def _text_ids(n: int, axes: int = 3, along_last: bool = False) -> torch.Tensor:
    """[n, axes] text position ids: zeros (Flux), or 0..n-1 in the last axis (Flux2's `l`)."""
    ids = torch.zeros(n, axes)
    if along_last:
        ids[:, -1] = torch.arange(n)
    return ids


# ---------------------------------------------------------------------------------------------
# Input makers, one per case (alphabetical by class)


def _flux_family(seed: int, txt: int, pooled: bool = False, **more: Any) -> Inputs:
    """Inputs of the Flux-like classes: batch 2, a 5 x 7 grid of 4-channel latents, `txt` text
    tokens 32 wide, position ids; `pooled` adds pooled projections, `more` further inputs."""
    g = _gen(seed)
    b, h, w = 2, 5, 7
    kw = {"hidden_states": _randn(g, b, h * w, 4), "encoder_hidden_states": _randn(g, b, txt, 32)}
    if pooled:
        kw["pooled_projections"] = _randn(g, b, 32)
    kw.update(timestep=torch.tensor([0.7, 0.3]), img_ids=_grid_ids(h, w), txt_ids=_text_ids(txt))
    return {**kw, **more, "return_dict": False}


def _ace_step(seed: int) -> Inputs:
    g = _gen(seed)
    b, seq = 2, 46  # patch 2 -> 23 tokens, more than the sliding window of 8
    return {
        "hidden_states": _randn(g, b, seq, 8),
        "timestep": torch.rand(b, generator=g),
        "timestep_r": torch.rand(b, generator=g),
        "encoder_hidden_states": _randn(g, b, 9, 32),
        "context_latents": _randn(g, b, seq, 16),
        "return_dict": False,
    }


def _allegro(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        # 3 x 5 x 7 tokens; config says 8 frames, 8 x 8
        "hidden_states": _randn(g, 2, 4, 3, 10, 14),
        "encoder_hidden_states": _randn(g, 2, 9, 8),
        "timestep": _int_steps(g, 2),
        "encoder_attention_mask": _lengths_mask([9, 6], 9, torch.long),
        "return_dict": False,
    }


def _anyflow(seed: int) -> Inputs:
    g = _gen(seed)
    b, f = 2, 3
    return {
        "hidden_states": _randn(g, b, f, 4, 10, 14),  # [B, F, C, H, W]: 3 x 5 x 7 tokens
        "timestep": torch.full((b, f), 500.0),
        "r_timestep": torch.full((b, f), 250.0),
        "encoder_hidden_states": _randn(g, b, 11, 16),
        "return_dict": False,
    }


def _anyflow_far(seed: int) -> Inputs:
    g = _gen(seed)
    partition = [1, 2]
    f = sum(partition)
    return {
        "hidden_states": _randn(g, 1, f, 4, 12, 20),  # compressed 3 x 5, full 6 x 10 per frame
        "timestep": torch.full((1, f), 500.0),
        "r_timestep": torch.full((1, f), 250.0),
        "encoder_hidden_states": _randn(g, 1, 11, 16),
        "chunk_partition": partition,
        "return_dict": False,
    }


def _aura_flow(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, 2, 4, 18, 26),  # 9 x 13 = 117 tokens; config sample_size 32
        "encoder_hidden_states": _randn(g, 2, 13, 32),
        "timestep": _int_steps(g, 2),
        "return_dict": False,
    }


def _bria_fibo2(seed: int) -> Inputs:
    g = _gen(seed)
    b, txt = 2, 12
    return {
        "hidden_states": _randn(g, b, 4, 10, 14),  # patch 2 -> 5 x 7 tokens
        "timestep": torch.rand(b, generator=g),
        # perceiver bundle + 2 injection bundles
        "encoder_hidden_states": _randn(g, b, 1 + 2, txt, 32),
        "encoder_attention_mask": _lengths_mask([txt, 9], txt),
        "return_dict": False,
    }


def _bria_fibo(seed: int) -> Inputs:
    g = _gen(seed)
    b, h, w, txt = 2, 5, 7, 13
    ehs = _randn(g, b, txt, 64)
    return {
        "hidden_states": _randn(g, b, h * w, 48),
        "encoder_hidden_states": ehs,
        "text_encoder_layers": [ehs[..., :32], ehs[..., 32:]],
        "timestep": torch.tensor([0.7, 0.3]),
        "img_ids": _grid_ids(h, w),
        "txt_ids": _text_ids(txt),
        "return_dict": False,
    }


def _bria(seed: int) -> Inputs:
    return _flux_family(seed, 13)


def _chroma(seed: int) -> Inputs:
    # ChromaPipeline: the text mask keeps one padding token, then ones over the image tokens.
    text_mask = _lengths_mask([13, 9], 13)
    image = torch.ones(2, 5 * 7, dtype=torch.bool)
    return _flux_family(seed, 13, attention_mask=torch.cat([text_mask, image], dim=1))


def _chronoedit(frames: int, image: bool) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        kw = {
            "hidden_states": _randn(g, 2, 36, frames, 10, 14),  # latent, mask, condition
            "timestep": _int_steps(g, 2),
            "encoder_hidden_states": _randn(g, 2, 11, 32),
            "return_dict": False,
        }
        if image:
            kw["encoder_hidden_states_image"] = _randn(g, 2, 9, 16)
        return kw

    return make


def _cogvideox(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        # [B, F, C, H, W]: 3 x 5 x 7; config 8 frames, 8 x 8
        "hidden_states": _randn(g, 2, 3, 4, 10, 14),
        "encoder_hidden_states": _randn(g, 2, 8, 8),
        "timestep": _int_steps(g, 2),
        "return_dict": False,
    }


def _cogvideox15(seed: int) -> Inputs:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    g = _gen(seed)
    frames, h, w, p, p_t = 4, 10, 14, 2, 2
    # As CogVideoXPipeline._prepare_rotary_positional_embeddings does for 1.5 (patch_size_t set).
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=16,
        crops_coords=None,
        grid_size=(h // p, w // p),
        temporal_size=frames // p_t,
        grid_type="slice",
        max_size=(h // p, w // p),
    )
    return {
        "hidden_states": _randn(g, 2, frames, 4, h, w),  # 2 x 5 x 7 tokens after temporal patching
        "encoder_hidden_states": _randn(g, 2, 8, 8),
        "timestep": _int_steps(g, 2),
        "image_rotary_emb": (cos, sin),
        "return_dict": False,
    }


def _cogview_sizes(b: int, h: int, w: int) -> Inputs:
    return {
        "original_size": torch.tensor([[h * 8.0, w * 8.0]] * b),
        "target_size": torch.tensor([[h * 8.0, w * 8.0]] * b),
        "crop_coords": torch.zeros(b, 2),
    }


def _cogview3plus(seed: int) -> Inputs:
    g = _gen(seed)
    return dict(
        hidden_states=_randn(g, 2, 4, 10, 14),  # 5 x 7 tokens; config sample_size 8
        encoder_hidden_states=_randn(g, 2, 9, 8),
        timestep=_int_steps(g, 2),
        **_cogview_sizes(2, 10, 14),
        return_dict=False,
    )


def _cogview4(seed: int) -> Inputs:
    g = _gen(seed)
    return dict(
        hidden_states=_randn(g, 2, 4, 10, 14),
        encoder_hidden_states=_randn(g, 2, 9, 8),
        timestep=_int_steps(g, 2),
        **_cogview_sizes(2, 10, 14),
        return_dict=False,
    )


def _consisid(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, 2, 2, 4, 10, 14),  # 2 x 5 x 7 tokens; config 8 frames, 8 x 8
        "encoder_hidden_states": _randn(g, 2, 8, 8),
        "timestep": _int_steps(g, 2),
        "id_vit_hidden": [_randn(g, 2, 2, 2)],
        "id_cond": _randn(g, 2, 2),
        "return_dict": False,
    }


def _cosmos3(seed: int) -> Inputs:
    g = _gen(seed)
    h, w, und = 5, 7, 3
    n_vis = h * w
    total = und + n_vis
    vis = torch.arange(und, total)
    return {
        "input_ids": torch.tensor([1, 2, 3]),
        "text_indexes": torch.arange(und),
        "position_ids": torch.zeros(3, total, dtype=torch.long),
        "und_len": und,
        "sequence_length": total,
        "vision_tokens": [_randn(g, 1, 2, 1, h, w)],
        "vision_token_shapes": [(1, h, w)],
        "vision_sequence_indexes": vis,
        "vision_mse_loss_indexes": vis,
        "vision_timesteps": torch.full((n_vis,), 0.5),
        "vision_noisy_frame_indexes": [torch.tensor([0])],
        "return_dict": False,
    }


def _cosmos(video2world: bool) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        b, f, h, w, txt = 2, 2, 10, 14, 12
        kw = {
            "hidden_states": _randn(g, b, 4, f, h, w),  # 2 x 5 x 7 tokens
            "timestep": _int_steps(g, b).float(),
            "encoder_hidden_states": _randn(g, b, txt, 16),
            "attention_mask": _lengths_mask([txt, 8], txt, torch.float32),
            "fps": 24,
            "padding_mask": torch.zeros(b, 1, h, w),
            "return_dict": False,
        }
        if video2world:
            cond = torch.zeros(b, 1, f, h, w)
            cond[:, :, 0] = 1.0  # the first frame is given
            kw["condition_mask"] = cond
        return kw

    return make


def _dit(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        # 5 x 5 tokens (unpatchify assumes square); config 4 x 4
        "hidden_states": _randn(g, 2, 4, 10, 10),
        "timestep": _int_steps(g, 2),
        "class_labels": torch.tensor([1, 3]),
        "return_dict": False,
    }


def _dreamlite(seed: int) -> Inputs:
    return _transformer_2d_continuous(seed)  # the same UNet feature map and text


def _easyanimate(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, 2, 4, 2, 10, 14),  # 2 x 5 x 7 tokens; config sample 60 x 90
        "timestep": _int_steps(g, 2),
        "encoder_hidden_states": _randn(g, 2, 11, 16),
        "return_dict": False,
    }


def _ernie_image(seed: int) -> Inputs:
    g = _gen(seed)
    txt = 16
    return {
        "hidden_states": _randn(g, 2, 16, 5, 7),  # patch 1 -> 35 tokens
        "timestep": torch.tensor([0.7, 0.3]),
        "text_bth": _randn(g, 2, txt, 16),
        "text_lens": torch.tensor([txt, 11]),  # the second prompt is padded
        "return_dict": False,
    }


def _flux2(ref_tokens: int) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        b, h, w, txt = 2, 5, 7, 11
        img_ids = _grid_ids(h, w, axes=4)
        if ref_tokens:  # a reference image ahead of the target, at t = 1 (Flux2 edit)
            img_ids = torch.cat([_grid_ids(1, ref_tokens, t=1, axes=4), img_ids])
        kw = {
            "hidden_states": _randn(g, b, ref_tokens + h * w, 4),
            "encoder_hidden_states": _randn(g, b, txt, 32),
            "timestep": torch.tensor([0.7, 0.3]),
            "img_ids": img_ids[None].expand(b, -1, -1),
            "txt_ids": _text_ids(txt, axes=4, along_last=True)[None].expand(b, -1, -1),
            "guidance": torch.tensor([3.5, 3.5]),
            "return_dict": False,
        }
        if ref_tokens:
            kw["num_ref_tokens"] = ref_tokens
        return kw

    return make


def _flux3(image_cond: bool) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        b, h, w, txt = 2, 5, 7, 11
        kw = {
            "hidden_states": _randn(g, b, h * w, 8),
            "encoder_hidden_states": _randn(g, b, txt, 32),
            "timestep": torch.tensor([0.7, 0.3]),
            "img_ids": _grid_ids(h, w, axes=4),
            "txt_ids": _text_ids(txt, axes=4, along_last=True),
            "return_dict": False,
        }
        if image_cond:
            kw["image_cond_hidden_states"] = _randn(g, b, 3 * 4, 8)
            kw["image_cond_ids"] = _grid_ids(3, 4, t=1, axes=4)
        return kw

    return make


def _flux(seed: int) -> Inputs:
    return _flux_family(seed, 11, pooled=True, guidance=torch.tensor([3.5, 3.5]))


def _glm_image(seed: int) -> Inputs:
    g = _gen(seed)
    b, h, w = 2, 10, 14
    tokens = (h // 2) * (w // 2)
    return {
        "hidden_states": _randn(g, b, 4, h, w),
        "encoder_hidden_states": _randn(g, b, 11, 32),
        "prior_token_id": torch.randint(0, 64, (b, tokens), generator=g),
        "prior_token_drop": torch.zeros(b, tokens, dtype=torch.bool),
        "timestep": _int_steps(g, b),
        "target_size": torch.tensor([[h * 8.0, w * 8.0]] * b),
        "crop_coords": torch.zeros(b, 2),
        "return_dict": False,
    }


def _helios(seed: int) -> Inputs:
    g = _gen(seed)
    b, c, f, h, w = 2, 4, 2, 16, 24
    return {
        "hidden_states": _randn(g, b, c, f, h, w),
        "timestep": _int_steps(g, b),
        "encoder_hidden_states": _randn(g, b, 11, 16),
        "indices_hidden_states": torch.arange(3, 3 + f)[None].float().expand(b, -1),
        "indices_latents_history_short": torch.full((b, 1), 2.0),
        "indices_latents_history_mid": torch.ones(b, 1),
        "indices_latents_history_long": torch.zeros(b, 4),
        "latents_history_short": _randn(g, b, c, 1, h, w),
        "latents_history_mid": _randn(g, b, c, 1, h, w),
        "latents_history_long": _randn(g, b, c, 4, h, w),
        "return_dict": False,
    }


def _hidream(seed: int) -> Inputs:
    g = _gen(seed)
    b, txt = 2, 7
    return {
        "hidden_states": _randn(g, b, 4, 10, 14),  # 5 x 7 patches; config max_resolution 32 x 32
        "timesteps": _int_steps(g, b),
        "encoder_hidden_states_t5": _randn(g, b, txt, 8),
        "encoder_hidden_states_llama3": _randn(g, 2, b, txt, 4),  # [llama layer, B, L, D]
        "pooled_embeds": _randn(g, b, 8),
        "return_dict": False,
    }


def _hunyuan_image(seed: int) -> Inputs:
    g = _gen(seed)
    b, txt = 2, 11
    return {
        "hidden_states": _randn(g, b, 4, 5, 7),  # patch 1 -> 35 tokens
        "timestep": _int_steps(g, b).float(),
        "encoder_hidden_states": _randn(g, b, txt, 32),
        "encoder_attention_mask": _lengths_mask([txt, 7], txt, torch.long),
        "return_dict": False,
    }


def _hunyuan_video15(seed: int) -> Inputs:
    g = _gen(seed)
    b, txt, txt2 = 2, 9, 5
    return {
        "hidden_states": _randn(g, b, 4, 2, 5, 7),  # patch 1 -> 70 tokens
        "timestep": torch.tensor([700.0, 300.0]),
        "encoder_hidden_states": _randn(g, b, txt, 16),
        "encoder_attention_mask": _lengths_mask([txt, 6], txt, torch.long),
        "encoder_hidden_states_2": _randn(g, b, txt2, 8),
        "encoder_attention_mask_2": _lengths_mask([txt2, 3], txt2, torch.long),
        "image_embeds": torch.zeros(b, 3, 12),  # text-to-video: no image
        "return_dict": False,
    }


def _hunyuan_video_framepack(seed: int) -> Inputs:
    g = _gen(seed)
    b, c, f, h, w, txt = 1, 4, 3, 8, 12, 11
    return {
        "hidden_states": _randn(g, b, c, f, h, w),
        "timestep": _int_steps(g, b).float(),
        "encoder_hidden_states": _randn(g, b, txt, 16),
        "encoder_attention_mask": _lengths_mask([8], txt, torch.long),
        "pooled_projections": _randn(g, b, 8),
        "image_embeds": _randn(g, b, 7, 16),
        "indices_latents": torch.arange(1, 1 + f),
        "guidance": torch.tensor([6000.0]),
        "latents_clean": _randn(g, b, c, 2, h, w),
        "indices_latents_clean": torch.tensor([0, 4]),
        "latents_history_2x": _randn(g, b, c, 2, h, w),
        "indices_latents_history_2x": torch.tensor([5, 6]),
        "latents_history_4x": _randn(g, b, c, 8, h, w),
        "indices_latents_history_4x": torch.arange(7, 15),
        "return_dict": False,
    }


def _hunyuan_video(seed: int) -> Inputs:
    g = _gen(seed)
    b, txt = 2, 11
    return {
        "hidden_states": _randn(g, b, 4, 2, 5, 7),  # patch 1 -> 70 tokens
        "timestep": _int_steps(g, b).float(),
        "encoder_hidden_states": _randn(g, b, txt, 16),
        "encoder_attention_mask": _lengths_mask([txt, 7], txt, torch.long),
        "pooled_projections": _randn(g, b, 8),
        "guidance": torch.tensor([6000.0, 6000.0]),
        "return_dict": False,
    }


def _ideogram4(seed: int) -> Inputs:
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET,
        LLM_TOKEN_INDICATOR,
        OUTPUT_IMAGE_INDICATOR,
    )

    g = _gen(seed)
    txt, h, w = 6, 5, 7
    img = h * w
    seq = txt + img
    hidden = torch.zeros(1, seq, 16)
    hidden[:, txt:] = _randn(g, 1, img, 16)
    ehs = torch.zeros(1, seq, 24)
    ehs[:, :txt] = _randn(g, 1, txt, 24)
    pos = torch.zeros(1, seq, 3, dtype=torch.long)
    pos[:, :txt] = torch.arange(txt)[:, None]
    pos[:, txt:, 0] = IMAGE_POSITION_OFFSET
    pos[:, txt:, 1] = torch.arange(h).repeat_interleave(w) + IMAGE_POSITION_OFFSET
    pos[:, txt:, 2] = torch.arange(w).repeat(h) + IMAGE_POSITION_OFFSET
    indicator = torch.full((1, seq), OUTPUT_IMAGE_INDICATOR, dtype=torch.long)
    indicator[:, :txt] = LLM_TOKEN_INDICATOR
    return {
        "hidden_states": hidden,
        "timestep": torch.tensor([0.5]),
        "encoder_hidden_states": ehs,
        "position_ids": pos,
        "segment_ids": torch.ones(1, seq, dtype=torch.long),
        "indicator": indicator,
        "return_dict": False,
    }


def _joyimage_edit_plus(seed: int) -> Inputs:
    g = _gen(seed)
    txt = 12
    # Tokens arrive patchified, [B, tokens, C, 1, 2, 2], images packed per sample: sample 0 a 2 x 3
    # reference then its 5 x 7 target (41 tokens), sample 1 only a 5 x 7 target, padded to 41.
    hidden = _randn(g, 2, 41, 16, 1, 2, 2)
    hidden[1, 35:] = 0.0
    return {
        "hidden_states": hidden,
        "timestep": torch.tensor([0.7, 0.3]),
        "encoder_hidden_states": _randn(g, 2, txt, 16),
        "encoder_hidden_states_mask": _lengths_mask([txt, 9], txt, torch.long),
        "shape_list": [[(1, 2, 3), (1, 5, 7)], [(1, 5, 7)]],
        "return_dict": False,
    }


def _joyimage_edit(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, 2, 16, 1, 10, 14),  # 5 x 7 tokens
        "timestep": torch.tensor([0.7, 0.3]),
        "encoder_hidden_states": _randn(g, 2, 11, 16),
        "return_dict": False,
    }


def _kandinsky5(seed: int) -> Inputs:
    g = _gen(seed)
    b, f, h, w, txt = 2, 2, 10, 14, 11
    return {
        "hidden_states": _randn(g, b, f, h, w, 16),  # [B, T, H, W, C]: 2 x 5 x 7 tokens
        "encoder_hidden_states": _randn(g, b, txt, 32),
        "timestep": _int_steps(g, b).float(),
        "pooled_projections": _randn(g, b, 16),
        "visual_rope_pos": [torch.arange(f), torch.arange(h // 2), torch.arange(w // 2)],
        "text_rope_pos": torch.arange(txt),
        "return_dict": False,
    }


def _kandinsky6(audio: bool) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        b, f, h, w, txt = 2, 2, 10, 14, 11
        kw = {
            "hidden_states": _randn(g, b, f, h, w, 2 * 4 + 1),  # latent, condition, condition mask
            "encoder_hidden_states": _randn(g, b, txt, 32),
            "pooled_projections": _randn(g, b, 16),
            "timestep": _int_steps(g, b).float(),
            "encoder_attention_mask": _lengths_mask([txt, 7], txt),
            "return_dict": False,
        }
        if audio:
            kw["audio_hidden_states"] = _randn(g, b, 13, 20)
        return kw

    return make


def _kandinsky6_sr(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, 2, 2, 8, 16, 2 * 4 + 1),  # token grid divisible by 8 (NABLA)
        "timestep": _int_steps(g, 2).float(),
        "return_dict": False,
    }


def _krea2(seed: int) -> Inputs:
    g = _gen(seed)
    b, txt, h, w = 2, 6, 5, 7
    img = h * w
    pos = torch.zeros(txt + img, 3)
    pos[txt:, 1] = torch.arange(h).repeat_interleave(w).float()
    pos[txt:, 2] = torch.arange(w).repeat(h).float()
    return {
        "hidden_states": _randn(g, b, img, 16),
        "encoder_hidden_states": _randn(g, b, txt, 3, 16),  # [B, L, text layers, D]
        "timestep": torch.tensor([0.7, 0.3]),
        "position_ids": pos,
        "encoder_attention_mask": _lengths_mask([txt, 4], txt),
        "return_dict": False,
    }


def _ltx2(seed: int) -> Inputs:
    g = _gen(seed)
    b, f, h, w, txt, audio = 2, 2, 5, 7, 11, 9
    return {
        "hidden_states": _randn(g, b, f * h * w, 4),  # already patchified: 70 tokens
        "audio_hidden_states": _randn(g, b, audio, 4),
        "encoder_hidden_states": _randn(g, b, txt, 16),
        "audio_encoder_hidden_states": _randn(g, b, txt, 16),
        "timestep": _steps(g, b),
        "encoder_attention_mask": _lengths_mask([txt, 8], txt, torch.long),
        "audio_encoder_attention_mask": _lengths_mask([txt, 8], txt, torch.long),
        "num_frames": f,
        "height": h,
        "width": w,
        "audio_num_frames": audio,
        "fps": 25.0,
        "return_dict": False,
    }


def _ltx(seed: int) -> Inputs:
    g = _gen(seed)
    b, f, h, w, txt = 2, 2, 5, 7, 11
    return {
        "hidden_states": _randn(g, b, f * h * w, 4),  # already patchified: 70 tokens
        "encoder_hidden_states": _randn(g, b, txt, 16),
        "timestep": _int_steps(g, b),
        "encoder_attention_mask": _lengths_mask([txt, 8], txt, torch.long),
        "num_frames": f,
        "height": h,
        "width": w,
        "rope_interpolation_scale": (8 / 25, 32, 32),  # what LTXPipeline passes
        "return_dict": False,
    }


def _latte(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, 2, 4, 3, 10, 14),  # 3 frames of 5 x 7 tokens; config sample 8
        "timestep": _int_steps(g, 2),
        "encoder_hidden_states": _randn(g, 2, 9, 8),  # no text mask: LattePipeline passes none
        "enable_temporal_attentions": True,
        "return_dict": False,
    }


def _longcat_audio_dit(seed: int) -> Inputs:
    g = _gen(seed)
    b, seq, txt = 2, 37, 10
    return {
        "hidden_states": _randn(g, b, seq, 8),
        "encoder_hidden_states": _randn(g, b, txt, 32),
        "encoder_attention_mask": _lengths_mask([txt, 7], txt),
        "timestep": torch.tensor([0.7, 0.3]),
        "attention_mask": _lengths_mask([seq, 30], seq),  # the second clip is shorter
        "return_dict": False,
    }


def _longcat_image(seed: int) -> Inputs:
    return _flux_family(seed, 11, guidance=torch.tensor([3.5, 3.5]))


def _lumina2(seed: int) -> Inputs:
    g = _gen(seed)
    b, txt = 2, 11
    return {
        "hidden_states": _randn(g, b, 4, 10, 14),  # 5 x 7 tokens; config sample_size 16
        "timestep": torch.tensor([0.7, 0.3]),
        "encoder_hidden_states": _randn(g, b, txt, 32),
        "encoder_attention_mask": _lengths_mask([txt, 7], txt),
        "return_dict": False,
    }


def _minimax_h3(seed: int) -> Inputs:
    g = _gen(seed)
    b, txt, audio, video = 2, 5, 7, 23
    seq = txt + audio + video
    text_idx = torch.arange(txt)
    audio_idx = torch.arange(txt, txt + audio)
    video_idx = torch.arange(txt + audio, seq)
    tags = torch.zeros(seq, dtype=torch.long)
    tags[text_idx], tags[audio_idx] = 1, 2
    ts_idx = torch.zeros(seq, dtype=torch.long)
    ts_idx[audio_idx] = 1
    pos = torch.zeros(seq, 3)
    pos[:, 0] = torch.arange(seq).float()
    pos[video_idx, 1] = (torch.arange(video) % 4).float()
    pos[video_idx, 2] = (torch.arange(video) % 2).float()
    return {
        "hidden_states": _randn(g, b, video, 16),
        "audio_hidden_states": _randn(g, b, audio, 6),
        "encoder_hidden_states": _randn(g, b, txt, 8),
        "timestep": torch.tensor([0.7, 0.3]),
        "timestep_indices": ts_idx,
        "token_tags": tags,
        "position_ids": pos,
        "video_indices": video_idx,
        "audio_indices": audio_idx,
        "text_indices": text_idx,
        "return_dict": False,
    }


def _minimax_music3(seed: int) -> Inputs:
    g = _gen(seed)
    b, length = 2, 37
    return {
        "hidden_states": _randn(g, b, 8, length),
        "timestep": torch.tensor([0.7, 0.3]),
        "encoder_hidden_states": _randn(g, b, length, 16),
        "return_dict": False,
    }


def _mochi(seed: int) -> Inputs:
    g = _gen(seed)
    b, txt = 2, 11
    return {
        "hidden_states": _randn(g, b, 4, 2, 10, 14),  # 2 x 5 x 7 tokens
        "encoder_hidden_states": _randn(g, b, txt, 16),
        "timestep": _int_steps(g, b),
        "encoder_attention_mask": _lengths_mask([txt, 7], txt),
        "return_dict": False,
    }


def _motif_video(seed: int) -> Inputs:
    g = _gen(seed)
    b, txt = 2, 12
    return {
        "hidden_states": _randn(g, b, 33, 3, 5, 7),  # latent + condition + mask; 3 x 5 x 7 tokens
        "timestep": _int_steps(g, b),
        "encoder_hidden_states": _randn(g, b, txt, 32),
        "encoder_attention_mask": _lengths_mask([txt, 9], txt, torch.long),
        "return_dict": False,
    }


def _nucleusmoe_image(seed: int) -> Inputs:
    g = _gen(seed)
    b, h, w, txt = 2, 5, 7, 9
    return {
        "hidden_states": _randn(g, b, h * w, 16),  # packed 2 x 2 latents: 35 tokens
        "img_shapes": [(1, h, w)] * b,
        "encoder_hidden_states": _randn(g, b, txt, 16),
        "encoder_hidden_states_mask": _holed_mask([txt, 6], txt, hole=2, dtype=torch.long),
        "timestep": torch.tensor([0.7, 0.3]),
        "return_dict": False,
    }


def _omnigen(seed: int) -> Inputs:
    g = _gen(seed)
    b, txt, h, w = 2, 13, 10, 14
    img = (h // 2) * (w // 2)
    seq = txt + 1 + img  # text, the time token, the image being generated
    mask = torch.tril(torch.ones(b, seq, seq))
    mask[:, -img:, -img:] = 1.0  # image tokens attend bidirectionally among themselves
    return {
        "hidden_states": _randn(g, b, 4, h, w),
        "timestep": torch.tensor([0.7, 0.3]),
        "input_ids": torch.randint(1, 100, (b, txt), generator=g),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": mask,
        "position_ids": torch.arange(seq)[None].expand(b, -1),
        "return_dict": False,
    }


def _ovis_image(seed: int) -> Inputs:
    return _flux_family(seed, 11)


def _prx(seed: int) -> Inputs:
    g = _gen(seed)
    b, txt = 2, 11
    return {
        "hidden_states": _randn(g, b, 16, 10, 14),  # patch 2 -> 35 tokens
        "timestep": torch.tensor([0.7, 0.3]),
        "encoder_hidden_states": _randn(g, b, txt, 32),
        "attention_mask": _lengths_mask([txt, 7], txt),
        "return_dict": False,
    }


def _pixart(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, 2, 4, 10, 14),  # 5 x 7 tokens; config sample_size 8
        "encoder_hidden_states": _randn(g, 2, 9, 8),
        "timestep": _int_steps(g, 2),
        "added_cond_kwargs": {"aspect_ratio": None, "resolution": None},
        "encoder_attention_mask": _lengths_mask([9, 6], 9, torch.long),
        "return_dict": False,
    }


def _prior(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, 2, 8),
        "timestep": 7,
        "proj_embedding": _randn(g, 2, 8),
        "encoder_hidden_states": _randn(g, 2, 7, 8),
        "attention_mask": _lengths_mask([7, 5], 7),
        "return_dict": False,
    }


def _qwenimage21(edit: bool) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        b, h, w = 2, 6, 10  # the target: 60 latent tokens, 15 vision-language slots
        pre, post = 5, 4  # text before and after the condition image's slots
        cond_h, cond_w = (4, 6) if edit else (0, 0)
        cond_slots = cond_h * cond_w // 4
        vlm = pre + cond_slots + post  # prompt positions the encoder returns
        img_mask = torch.zeros(b, vlm + h * w // 4, dtype=torch.bool)
        img_mask[:, pre : pre + cond_slots] = True
        img_mask[:, vlm:] = True  # the target's slots, appended by the pipeline
        shapes = ([(1, cond_h, cond_w)] if edit else []) + [(1, h, w)]
        return {
            "hidden_states": _randn(g, b, cond_h * cond_w + h * w, 16),
            "encoder_hidden_states": _randn(g, b, vlm, 32),
            "timestep": torch.tensor([0.7, 0.3]),
            "img_shapes": [shapes] * b,
            "img_mask": img_mask,
            "encoder_hidden_states_mask": _lengths_mask([vlm, vlm - 2], vlm),
            "return_dict": False,
        }

    return make


def _qwenimage(edit: bool) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        b, h, w, txt = 2, 5, 7, 9
        shapes = [(1, h, w)] + ([(1, 3, 4)] if edit else [])  # target, then the reference image
        tokens = sum(f * hh * ww for f, hh, ww in shapes)
        return {
            "hidden_states": _randn(g, b, tokens, 16),
            "encoder_hidden_states": _randn(g, b, txt, 16),
            "encoder_hidden_states_mask": _holed_mask([txt, 6], txt, hole=2, dtype=torch.long),
            "timestep": torch.tensor([0.7, 0.3]),
            "img_shapes": [shapes] * b,
            "return_dict": False,
        }

    return make


def _rfd4_proteina(seed: int) -> Inputs:
    g = _gen(seed)
    b, n = 2, 23
    mask = _lengths_mask([n, 17], n)
    return {
        "bb_ca": _randn(g, b, n, 3),
        "local_latents": _randn(g, b, n, 8),
        "bb_ca_time": torch.tensor([0.7, 0.3]),
        "local_latents_time": torch.tensor([0.6, 0.2]),
        "padding_mask": mask,
        "conditioning": {
            "is_in_context_conditioning": torch.zeros(b, n, dtype=torch.bool),
            "supports_local_latent": torch.ones(b, n, dtype=torch.bool),
        },
        "return_dict": False,
    }


def _sd3(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, 2, 4, 10, 14),  # patch 2 -> 35 tokens; config sample_size 32
        "encoder_hidden_states": _randn(g, 2, 13, 32),
        "pooled_projections": _randn(g, 2, 64),
        "timestep": _int_steps(g, 2),
        "return_dict": False,
    }


def _sana(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, 2, 4, 5, 7),  # patch 1 -> 35 tokens; config sample_size 32
        "encoder_hidden_states": _randn(g, 2, 9, 8),
        "timestep": _int_steps(g, 2),
        "encoder_attention_mask": _lengths_mask([9, 6], 9, torch.long),
        "return_dict": False,
    }


def _sana_video(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, 2, 16, 2, 10, 14),  # 2 x 5 x 7 tokens; config sample_size 8
        "encoder_hidden_states": _randn(g, 2, 11, 16),
        "timestep": _int_steps(g, 2),
        "encoder_attention_mask": _lengths_mask([11, 7], 11, torch.long),
        "return_dict": False,
    }


def _sana_wm_refiner(seed: int) -> Inputs:
    from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoRotaryPosEmbed

    g = _gen(seed)
    b, f, h, w, txt = 2, 2, 5, 7, 11
    rope = LTX2AudioVideoRotaryPosEmbed(
        dim=32,
        patch_size=1,
        patch_size_t=1,
        base_num_frames=20,
        base_height=2048,
        base_width=2048,
        scale_factors=(8, 32, 32),
        theta=10000.0,
        causal_offset=1,
        modality="video",
        double_precision=False,
        rope_type="interleaved",
        num_attention_heads=2,
    )
    coords = rope.prepare_video_coords(b, f, h, w, torch.device("cpu"), fps=24.0)
    return {
        "hidden_states": _randn(g, b, f * h * w, 8),
        "encoder_hidden_states": _randn(g, b, txt, 16),
        "timestep": _steps(g, b, 1.0),
        "video_rotary_emb": rope(coords, device=torch.device("cpu")),
        "encoder_attention_mask": _lengths_mask([txt, 8], txt, torch.long),
        "return_dict": False,
    }


def _sana_wm(seed: int) -> Inputs:
    g = _gen(seed)
    b, f, txt = 2, 3, 11
    return {
        "hidden_states": _randn(g, b, 4, f, 5, 7),
        "timestep": torch.full((b, 1, f), 500.0),
        "encoder_hidden_states": _randn(g, b, 1, txt, 16),
        "encoder_attention_mask": _lengths_mask([txt, 8], txt, torch.long),
        "return_dict": False,
    }


def _skyreels_v2(forcing: bool) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        b, f = 2, 3
        kw = {
            "hidden_states": _randn(g, b, 4, f, 10, 14),  # 3 x 5 x 7 tokens
            "timestep": _int_steps(g, b),
            "encoder_hidden_states": _randn(g, b, 11, 16),
            "return_dict": False,
        }
        if forcing:  # diffusion forcing: one timestep per latent frame
            kw["timestep"] = torch.tensor([[0, 400, 800], [200, 600, 999]])
            kw["enable_diffusion_forcing"] = True
        return kw

    return make


def _transformer_2d_continuous(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, 2, 32, 5, 7),  # a UNet feature map: 35 tokens
        "encoder_hidden_states": _randn(g, 2, 9, 16),
        "encoder_attention_mask": _lengths_mask([9, 6], 9, torch.long),
        "return_dict": False,
    }


def _transformer_2d_patched(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, 2, 4, 10, 10),  # 5 x 5 tokens (square only); config 4 x 4
        "timestep": _int_steps(g, 2),
        "class_labels": torch.tensor([1, 3]),
        "return_dict": False,
    }


def _transformer_2d_vectorized(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "hidden_states": torch.randint(0, 16, (2, 25), generator=g),  # VQ codes of a 5 x 5 image
        "encoder_hidden_states": _randn(g, 2, 9, 16),
        "timestep": torch.tensor(500),  # one scalar step, as VQDiffusionPipeline passes
        "return_dict": False,
    }


def _transformer_temporal(seed: int) -> Inputs:
    g = _gen(seed)
    b, f = 2, 7
    return {
        "hidden_states": _randn(g, b * f, 32, 4, 5),  # [B * F, C, H, W]: attention over 7 frames
        "num_frames": f,
        "return_dict": False,
    }


def _wan_animate2(seed: int) -> Inputs:
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    g = _gen(seed)
    f, h, w, txt = 2, 10, 14, 11
    return {
        "hidden_states": [_randn(g, 4, f, h, w)],
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": [_randn(g, txt, 16)],
        "condition_latents": [_randn(g, 4, f, h, w)],
        "encoder_hidden_states_image": _randn(g, 1, 9, 1280),  # CLIP features (fixed width)
        "kv_cache": WanAnimate2KVCache(2),
        "kv_cache_mode": "extract",
        "seq_len": f * (h // 2) * (w // 2),
        "offset_grid_sizes": torch.tensor([[f, h // 2, w // 2]]),
        "return_dict": False,
    }


def _wan_animate(seed: int) -> Inputs:
    g = _gen(seed)
    c, f, h, w = 4, 4, 10, 14
    return {
        # reference frame + 4 frames of 5 x 7
        "hidden_states": _randn(g, 2, 2 * c + 4, f + 1, h, w),
        "timestep": _int_steps(g, 2),
        "encoder_hidden_states": _randn(g, 2, 11, 16),
        "encoder_hidden_states_image": _randn(g, 2, 9, 16),
        "pose_hidden_states": _randn(g, 2, c, f, h, w),
        "face_pixel_values": _randn(g, 2, 3, 13, 16, 16),
        "return_dict": False,
    }


def _wan(mode: str) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        c = 12 if mode == "ti2v" else 4
        f, h, w = 3, 10, 14
        kw = {
            "hidden_states": _randn(g, 2, c, f, h, w),  # 3 x 5 x 7 tokens
            "timestep": _int_steps(g, 2),
            "encoder_hidden_states": _randn(g, 2, 11, 16),
            "return_dict": False,
        }
        if mode == "i2v":
            kw["hidden_states"] = _randn(g, 2, 2 * c + 4, f, h, w)  # latent + condition + mask
            kw["encoder_hidden_states_image"] = _randn(g, 2, 9, 16)
        if mode == "ti2v":  # Wan 2.2: a timestep per token, the first frame clean
            ts = torch.full((f, h // 2, w // 2), 500.0)
            ts[0] = 0.0
            kw["timestep"] = ts.flatten()[None].expand(2, -1)
        return kw

    return make


def _wan_vace(seed: int) -> Inputs:
    g = _gen(seed)
    f, h, w = 3, 10, 14
    return {
        "hidden_states": _randn(g, 2, 16, f, h, w),
        "timestep": _int_steps(g, 2),
        "encoder_hidden_states": _randn(g, 2, 11, 16),
        "control_hidden_states": _randn(g, 2, 48, f, h, w),
        "control_hidden_states_scale": torch.tensor([1.0, 0.5]),
        "return_dict": False,
    }


def _z_image(seed: int) -> Inputs:
    g = _gen(seed)
    # Two samples of different image sizes and caption lengths: packed and padded inside.
    return {
        "x": [_randn(g, 16, 1, 10, 14), _randn(g, 16, 1, 6, 8)],
        "t": torch.tensor([0.7, 0.3]),
        "cap_feats": [_randn(g, 11, 16), _randn(g, 6, 16)],
        "return_dict": False,
    }


# ---------------------------------------------------------------------------------------------
# The table

_WAN_INIT = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}

_CV_INIT = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 2,
    "text_embed_dim": 8,
    "num_layers": 2,
    "sample_width": 8,
    "sample_height": 8,
    "sample_frames": 8,
    "patch_size": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 8,
}

_FLUX_INIT = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": (4, 4, 8),
}

_COSMOS_INIT = {
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "num_layers": 2,
    "mlp_ratio": 2,
    "text_embed_dim": 16,
    "adaln_lora_dim": 4,
    "max_size": (4, 32, 32),
    "patch_size": (1, 2, 2),
    "rope_scale": (2.0, 1.0, 1.0),
    "concat_padding_mask": True,
    "extra_pos_embed_type": "learnable",
}

_CHRONOEDIT_INIT = dict(
    _WAN_INIT,
    in_channels=36,
    out_channels=16,
    text_dim=32,
    freq_dim=16,
    image_dim=16,
    rope_max_seq_len=64,
    rope_temporal_skip_len=8,
)

_FLUX2_INIT = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "timestep_guidance_channels": 256,
    "axes_dims_rope": (4, 4, 4, 4),
}

_FLUX3_INIT = {
    "in_channels": 8,
    "cond_in_channels": 8,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "timestep_channels": 32,
    "axes_dims_rope": (4, 4, 4, 4),
}

_KANDINSKY6_INIT = {
    "in_visual_dim": 4,
    "out_visual_dim": 4,
    "in_text_dim": 32,
    "in_text_dim2": 16,
    "time_dim": 16,
    "model_dim": 32,
    "ff_dim": 64,
    "num_text_blocks": 1,
    "num_visual_blocks": 2,
    "axes_dims": (4, 6, 6),
    "in_audio_dim": 20,
    "out_audio_dim": 20,
}

_QWENIMAGE21_INIT = {
    "patch_size": 1,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "context_in_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}

_QWENIMAGE_INIT = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 16,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 4, 4),
}

_SD3_INIT = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "caption_projection_dim": 32,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 64,
    "out_channels": 4,
    "pos_embed_max_size": 96,
}

CASES: tuple[Case, ...] = (
    Case(
        "ace_step",
        "AceStepTransformer1DModel",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "in_channels": 24,
            "audio_acoustic_hidden_dim": 8,
            "patch_size": 2,
            "sliding_window": 8,
        },
        _ace_step,
        "1-D audio; GQA; sliding-window mask built from positions; cross-attention",
    ),
    Case(
        "allegro",
        "AllegroTransformer3DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 1,
            "cross_attention_dim": 16,
            "sample_width": 8,
            "sample_height": 8,
            "sample_frames": 8,
            "caption_channels": 8,
        },
        _allegro,
        "video 3-D patching; RoPE from the latent shape; padded text mask in cross-attention",
    ),
    Case(
        "anyflow",
        "AnyFlowTransformer3DModel",
        {
            "patch_size": (1, 2, 2),
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "in_channels": 4,
            "out_channels": 4,
            "text_dim": 16,
            "freq_dim": 256,
            "ffn_dim": 32,
            "num_layers": 2,
            "cross_attn_norm": True,
            "rope_max_seq_len": 32,
            "gate_value": 0.25,
            "deltatime_type": "r",
        },
        _anyflow,
        "Wan-like video; per-frame timesteps; batch 2",
    ),
    Case(
        "anyflow_far",
        "AnyFlowFARTransformer3DModel",
        {
            "patch_size": (1, 2, 2),
            "compressed_patch_size": (1, 4, 4),
            "full_chunk_limit": 3,
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "in_channels": 4,
            "out_channels": 4,
            "text_dim": 16,
            "freq_dim": 256,
            "ffn_dim": 32,
            "num_layers": 2,
            "cross_attn_norm": True,
            "rope_max_seq_len": 32,
            "gate_value": 0.25,
            "deltatime_type": "r",
        },
        _anyflow_far,
        "frame-autoregressive chunks with a block-causal flex-attention mask",
    ),
    Case(
        "aura_flow",
        "AuraFlowTransformer2DModel",
        {
            "sample_size": 32,
            "patch_size": 2,
            "in_channels": 4,
            "num_mmdit_layers": 1,
            "num_single_dit_layers": 1,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "caption_projection_dim": 32,
            "joint_attention_dim": 32,
            "out_channels": 4,
            "pos_embed_max_size": 256,
        },
        _aura_flow,
        "joint [txt | img] attention; learned positional table cropped at run time",
    ),
    Case(
        "bria_fibo2",
        "BriaFibo2Transformer2DModel",
        {
            "in_channels": 4,
            "patch_size": 2,
            "dim": 32,
            "n_layers": 2,
            "n_refiner_layers": 1,
            "n_heads": 2,
            "cap_feat_dim": 32,
            "injection_layer_ids": (0, 1),
            "perceiver_num_layers": 1,
            "min_num_gist_tokens": 4,
            "max_num_gist_tokens": 8,
            "gist_step": 2,
            "gist_min_text_len": 4,
            "gist_max_text_len": 16,
            "axes_dims": (4, 6, 6),
            "axes_lens": (32, 32, 32),
        },
        _bria_fibo2,
        "perceiver gist tokens + image tokens; per-prompt gist counts; padded text",
    ),
    Case(
        "bria_fibo",
        "BriaFiboTransformer2DModel",
        {
            "patch_size": 1,
            "in_channels": 48,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": 64,
            "text_encoder_dim": 32,
            "pooled_projection_dim": None,
            "axes_dims_rope": (0, 4, 4),
        },
        _bria_fibo,
        "Flux-like joint attention; per-layer text-encoder features",
    ),
    Case(
        "bria",
        "BriaTransformer2DModel",
        {
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": None,
            "axes_dims_rope": (0, 4, 4),
        },
        _bria,
        "Flux-like joint attention, RoPE from input ids",
    ),
    Case(
        "chroma",
        "ChromaTransformer2DModel",
        dict(
            _FLUX_INIT,
            approximator_num_channels=8,
            approximator_hidden_dim=16,
            approximator_layers=1,
        ),
        _chroma,
        "Flux-like; a [txt | img] key mask with padded text",
    ),
    Case(
        "chronoedit",
        "ChronoEditTransformer3DModel",
        _CHRONOEDIT_INIT,
        _chronoedit(2, image=True),
        "Wan I2V; 2 frames: temporal RoPE skips to the last position",
    ),
    Case(
        "chronoedit_reasoning",
        "ChronoEditTransformer3DModel",
        _CHRONOEDIT_INIT,
        _chronoedit(3, image=True),
        "Wan I2V with temporal reasoning frames (ordinary temporal RoPE)",
    ),
    Case(
        "cogvideox",
        "CogVideoXTransformer3DModel",
        dict(_CV_INIT, patch_size_t=None),
        _cogvideox,
        "1.0: [txt | video] with a sincos 3-D table rebuilt for 3 frames of 5 x 7 (config: 2, 4 x 4)",
    ),
    Case(
        "cogvideox15",
        "CogVideoXTransformer3DModel",
        dict(
            _CV_INIT, attention_head_dim=16, patch_size_t=2, use_rotary_positional_embeddings=True
        ),
        _cogvideox15,
        "1.5: temporal patching, 3-D RoPE passed in over the video tokens",
    ),
    Case(
        "cogview3plus",
        "CogView3PlusTransformer2DModel",
        {
            "patch_size": 2,
            "in_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 4,
            "num_attention_heads": 2,
            "out_channels": 4,
            "text_embed_dim": 8,
            "time_embed_dim": 8,
            "condition_dim": 2,
            "pos_embed_max_size": 16,
            "sample_size": 8,
        },
        _cogview3plus,
        "[txt | img]; positional table cropped to 5 x 7 at run time",
    ),
    Case(
        "cogview4",
        "CogView4Transformer2DModel",
        {
            "patch_size": 2,
            "in_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 4,
            "num_attention_heads": 4,
            "out_channels": 4,
            "text_embed_dim": 8,
            "time_embed_dim": 8,
            "condition_dim": 4,
        },
        _cogview4,
        "[txt | img]; 2-D RoPE from the latent shape, applied to image rows in place",
    ),
    Case(
        "consisid",
        "ConsisIDTransformer3DModel",
        dict(
            _CV_INIT,
            num_layers=1,
            cross_attn_interval=1,
            is_kps=False,
            is_train_face=True,
            cross_attn_dim_head=1,
            cross_attn_num_heads=1,
            LFE_id_dim=2,
            LFE_vit_dim=2,
            LFE_depth=5,
            LFE_dim_head=8,
            LFE_num_heads=2,
            LFE_num_id_token=1,
            LFE_num_querie=1,
            LFE_output_dim=10,
            LFE_ff_mult=1,
            LFE_num_scale=1,
        ),
        _consisid,
        "CogVideoX + face-identity cross-attention (video queries, identity keys)",
    ),
    Case(
        "cosmos3",
        "Cosmos3OmniTransformer",
        {
            "head_dim": 6,
            "hidden_act": "relu2",
            "hidden_size": 12,
            "intermediate_size": 24,
            "latent_channel": 2,
            "latent_patch_size": 1,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "num_key_value_heads": 1,
            "patch_latent_dim": 2,
            "qk_norm_for_text": False,
            "rms_norm_eps": 1e-5,
            "rope_axes_dim": (1, 1, 1),
            "rope_theta": 1e8,
            "vocab_size": 32,
        },
        _cosmos3,
        "omni-modal packed sequence (text ids + vision tokens scattered by index); GQA",
    ),
    Case(
        "cosmos",
        "CosmosTransformer3DModel",
        dict(_COSMOS_INIT, in_channels=4, concat_padding_mask=False),
        _cosmos(video2world=False),
        "text2world: video self-attention, cross-attention with a padded text mask "
        "(no padding-mask channel: resizing it needs torchvision)",
    ),
    Case(
        "cosmos_video2world",
        "CosmosTransformer3DModel",
        dict(_COSMOS_INIT, in_channels=5, concat_padding_mask=False),
        _cosmos(video2world=True),
        "video2world: a condition-mask channel marks the given first frame",
    ),
    Case(
        "dit",
        "DiTTransformer2DModel",
        {
            "in_channels": 4,
            "out_channels": 8,
            "activation_fn": "gelu-approximate",
            "num_attention_heads": 2,
            "attention_head_dim": 4,
            "attention_bias": True,
            "num_layers": 1,
            "norm_type": "ada_norm_zero",
            "num_embeds_ada_norm": 8,
            "patch_size": 2,
            "sample_size": 8,
        },
        _dit,
        "class-conditional image self-attention; sincos table built for 5 x 7 at run time",
    ),
    Case(
        "dreamlite",
        "DreamLiteTransformer2DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "in_channels": 32,
            "num_layers": 1,
            "norm_num_groups": 8,
            "cross_attention_dim": 16,
        },
        _dreamlite,
        "UNet spatial transformer: self-attention over a feature map, cross-attention to text",
    ),
    Case(
        "easyanimate",
        "EasyAnimateTransformer3DModel",
        {
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "in_channels": 4,
            "mmdit_layers": 2,
            "num_layers": 2,
            "out_channels": 4,
            "patch_size": 2,
            "sample_height": 60,
            "sample_width": 90,
            "text_embed_dim": 16,
            "time_embed_dim": 8,
            "time_position_encoding_type": "3d_rope",
            "timestep_activation_fn": "silu",
        },
        _easyanimate,
        "[txt | video] MMDiT; 3-D RoPE from the latent shape",
    ),
    Case(
        "ernie_image",
        "ErnieImageTransformer2DModel",
        {
            "hidden_size": 16,
            "num_attention_heads": 1,
            "num_layers": 1,
            "ffn_hidden_size": 16,
            "in_channels": 16,
            "out_channels": 16,
            "patch_size": 1,
            "text_in_dim": 16,
            "rope_theta": 256,
            "rope_axes_dim": (8, 4, 4),
            "eps": 1e-6,
            "qk_layernorm": True,
        },
        _ernie_image,
        "one head; per-sample text lengths (`text_lens`) turned into a key mask",
    ),
    Case(
        "flux2",
        "Flux2Transformer2DModel",
        _FLUX2_INIT,
        _flux2(ref_tokens=0),
        "[txt | img] joint attention; 4-axis RoPE from batched ids",
    ),
    Case(
        "flux2_ref",
        "Flux2Transformer2DModel",
        _FLUX2_INIT,
        _flux2(ref_tokens=4),
        "reference-image tokens ahead of the target with their own fixed timestep",
    ),
    Case(
        "flux3",
        "Flux3Transformer2DModel",
        _FLUX3_INIT,
        _flux3(image_cond=False),
        "per-mode blocks (text, image apart), then joint single blocks; per-token modulation",
    ),
    Case(
        "flux3_i2i",
        "Flux3Transformer2DModel",
        _FLUX3_INIT,
        _flux3(image_cond=True),
        "as flux3 with reference-image tokens: [txt | img | ref] in the joint blocks",
    ),
    Case(
        "flux",
        "FluxTransformer2DModel",
        dict(_FLUX_INIT, pooled_projection_dim=32, guidance_embeds=True),
        _flux,
        "[txt | img] joint attention; RoPE from input ids; batch 2",
    ),
    Case(
        "glm_image",
        "GlmImageTransformer2DModel",
        {
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 1,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "text_embed_dim": 32,
            "time_embed_dim": 16,
            "condition_dim": 8,
            "prior_vq_quantizer_codebook_size": 64,
        },
        _glm_image,
        "[txt | img]; per-token prior ids added to image tokens (masked in place)",
    ),
    Case(
        "helios",
        "HeliosTransformer3DModel",
        {
            "patch_size": (1, 2, 2),
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "in_channels": 4,
            "out_channels": 4,
            "text_dim": 16,
            "freq_dim": 256,
            "ffn_dim": 32,
            "num_layers": 2,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "rope_dim": (4, 4, 4),
            "has_multi_term_memory_patch": True,
            "guidance_cross_attn": True,
            "zero_history_timestep": True,
            "is_amplify_history": False,
        },
        _helios,
        "history latents at 3 compressions prepended to the video tokens",
    ),
    Case(
        "hidream",
        "HiDreamImageTransformer2DModel",
        {
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "caption_channels": (8, 4),
            "text_emb_dim": 8,
            "num_routed_experts": 2,
            "num_activated_experts": 2,
            "axes_dims_rope": (4, 2, 2),
            "max_resolution": (32, 32),
            "llama_layers": (0, 1),
            "force_inference_output": True,
        },
        _hidream,
        "non-square image padded to the max resolution with a token mask; MoE FFN; joint blocks",
    ),
    Case(
        "hunyuan_image",
        "HunyuanImageTransformer2DModel",
        {
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "num_layers": 1,
            "num_single_layers": 1,
            "num_refiner_layers": 1,
            "patch_size": (1, 1),
            "text_embed_dim": 32,
            "rope_axes_dim": (8, 8),
        },
        _hunyuan_image,
        "[img | txt] with a text key mask; token refiner pools text",
    ),
    Case(
        "hunyuan_video15",
        "HunyuanVideo15Transformer3DModel",
        {
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "num_layers": 2,
            "num_refiner_layers": 1,
            "mlp_ratio": 2.0,
            "patch_size": 1,
            "patch_size_t": 1,
            "text_embed_dim": 16,
            "text_embed_2_dim": 8,
            "image_embed_dim": 12,
            "rope_axes_dim": (2, 2, 4),
            "target_size": 16,
            "task_type": "t2v",
        },
        _hunyuan_video15,
        "two text encoders with padding masks reordered into one sequence; [img | txt]",
    ),
    Case(
        "hunyuan_video_framepack",
        "HunyuanVideoFramepackTransformer3DModel",
        {
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 10,
            "num_layers": 1,
            "num_single_layers": 1,
            "num_refiner_layers": 1,
            "patch_size": 2,
            "patch_size_t": 1,
            "guidance_embeds": True,
            "text_embed_dim": 16,
            "pooled_projection_dim": 8,
            "rope_axes_dim": (2, 4, 4),
            "image_condition_type": None,
            "has_image_proj": True,
            "image_proj_dim": 16,
            "has_clean_x_embedder": True,
        },
        _hunyuan_video_framepack,
        "clean/history latents at 1x/2x/4x patching prepended, RoPE from frame indices",
    ),
    Case(
        "hunyuan_video",
        "HunyuanVideoTransformer3DModel",
        {
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 10,
            "num_layers": 1,
            "num_single_layers": 1,
            "num_refiner_layers": 1,
            "patch_size": 1,
            "patch_size_t": 1,
            "guidance_embeds": True,
            "text_embed_dim": 16,
            "pooled_projection_dim": 8,
            "rope_axes_dim": (2, 4, 4),
            "image_condition_type": None,
        },
        _hunyuan_video,
        "[video | txt] with a padded text key mask; batch 2",
    ),
    Case(
        "ideogram4",
        "Ideogram4Transformer2DModel",
        {
            "in_channels": 16,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "intermediate_size": 32,
            "adaln_dim": 16,
            "llm_features_dim": 24,
            "rope_theta": 10_000,
            "mrope_section": (2, 1, 1),
            "norm_eps": 1e-5,
        },
        _ideogram4,
        "one packed [txt | img] stream with segment ids and 3-D M-RoPE position ids",
    ),
    Case(
        "joyimage_edit_plus",
        "JoyImageEditPlusTransformer3DModel",
        {
            "patch_size": (1, 2, 2),
            "in_channels": 16,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "text_dim": 16,
            "num_layers": 2,
            "rope_dim_list": (4, 6, 6),
            "theta": 256,
        },
        _joyimage_edit_plus,
        "several images of different sizes packed per sample (`shape_list`) + padded text",
    ),
    Case(
        "joyimage_edit",
        "JoyImageEditTransformer3DModel",
        {
            "patch_size": (1, 2, 2),
            "in_channels": 16,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "text_dim": 16,
            "num_layers": 2,
            "rope_dim_list": (4, 6, 6),
            "theta": 256,
        },
        _joyimage_edit,
        "Hunyuan-like [img | txt] joint attention",
    ),
    Case(
        "kandinsky5",
        "Kandinsky5Transformer3DModel",
        {
            "in_visual_dim": 16,
            "in_text_dim": 32,
            "in_text_dim2": 16,
            "time_dim": 16,
            "out_visual_dim": 16,
            "patch_size": (1, 2, 2),
            "model_dim": 16,
            "ff_dim": 32,
            "num_text_blocks": 1,
            "num_visual_blocks": 2,
            "axes_dims": (2, 2, 4),
            "visual_cond": False,
            "attention_type": "regular",
        },
        _kandinsky5,
        "channels-last video; fractal flatten; zero-initialised modulation (filled by build)",
    ),
    Case(
        "kandinsky6",
        "Kandinsky6Transformer3DModel",
        _KANDINSKY6_INIT,
        _kandinsky6(audio=False),
        "video with text cross-attention and a padded text mask",
    ),
    Case(
        "kandinsky6_audio",
        "Kandinsky6Transformer3DModel",
        _KANDINSKY6_INIT,
        _kandinsky6(audio=True),
        "fused video + audio streams with cross-modal attention; two outputs",
    ),
    Case(
        "kandinsky6_sr",
        "Kandinsky6SRTransformer3DModel",
        {
            "in_visual_dim": 4,
            "out_visual_dim": 4,
            "time_dim": 16,
            "model_dim": 32,
            "ff_dim": 64,
            "num_visual_blocks": 2,
            "axes_dims": (4, 6, 6),
            "nabla_window": (3, 3, 3),
        },
        _kandinsky6_sr,
        "NABLA sparse attention (flex) over 8 x 8 token blocks",
    ),
    Case(
        "krea2",
        "Krea2Transformer2DModel",
        {
            "in_channels": 16,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 32,
            "timestep_embed_dim": 8,
            "text_hidden_dim": 16,
            "num_text_layers": 3,
            "text_num_attention_heads": 2,
            "text_num_key_value_heads": 1,
            "text_intermediate_size": 16,
            "num_layerwise_text_blocks": 1,
            "num_refiner_text_blocks": 1,
            "axes_dims_rope": (4, 2, 2),
            "rope_theta": 1000.0,
            "norm_eps": 1e-5,
        },
        _krea2,
        "GQA; [txt | img] with position ids and a padded text mask",
    ),
    Case(
        "ltx2",
        "LTX2VideoTransformer3DModel",
        {
            "in_channels": 4,
            "out_channels": 4,
            "patch_size": 1,
            "patch_size_t": 1,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 16,
            "audio_in_channels": 4,
            "audio_out_channels": 4,
            "audio_num_attention_heads": 2,
            "audio_attention_head_dim": 4,
            "audio_cross_attention_dim": 8,
            "num_layers": 2,
            "qk_norm": "rms_norm_across_heads",
            "caption_channels": 16,
            "rope_double_precision": False,
        },
        _ltx2,
        "audio + video streams with cross-modal attention; two outputs; padded text",
    ),
    Case(
        "ltx",
        "LTXVideoTransformer3DModel",
        {
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 16,
            "num_layers": 1,
            "qk_norm": "rms_norm_across_heads",
            "caption_channels": 16,
        },
        _ltx,
        "patchified video; RoPE from frame/height/width arguments; padded text mask",
    ),
    Case(
        "latte",
        "LatteTransformer3DModel",
        {
            "sample_size": 8,
            "num_layers": 1,
            "patch_size": 2,
            "attention_head_dim": 4,
            "num_attention_heads": 2,
            "caption_channels": 8,
            "in_channels": 4,
            "cross_attention_dim": 8,
            "out_channels": 8,
            "attention_bias": True,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "video_length": 3,  # the temporal table is fixed to the frame count
        },
        _latte,
        "factorised video: spatial attention per frame, temporal attention per position",
    ),
    Case(
        "longcat_audio_dit",
        "LongCatAudioDiTTransformer",
        {
            "dit_dim": 64,
            "dit_depth": 2,
            "dit_heads": 4,
            "dit_text_dim": 32,
            "latent_dim": 8,
            "text_conv": False,
        },
        _longcat_audio_dit,
        "1-D audio with a padded self-attention mask and a padded text mask",
    ),
    Case(
        "longcat_image",
        "LongCatImageTransformer2DModel",
        dict(_FLUX_INIT, pooled_projection_dim=32),
        _longcat_image,
        "Flux-like joint attention",
    ),
    Case(
        "lumina2",
        "Lumina2Transformer2DModel",
        {
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 4,
            "hidden_size": 24,
            "num_layers": 2,
            "num_refiner_layers": 1,
            "num_attention_heads": 3,
            "num_kv_heads": 1,
            "multiple_of": 2,
            "ffn_dim_multiplier": None,
            "norm_eps": 1e-5,
            "scaling_factor": 1.0,
            "axes_dim_rope": (4, 2, 2),
            "axes_lens": (128, 128, 128),
            "cap_feat_dim": 32,
        },
        _lumina2,
        "3 heads, 1 KV head; per-sample [txt | img] packing with padding to the longest",
    ),
    Case(
        "minimax_h3",
        "MiniMaxH3Transformer3DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "hidden_size": 24,
            "num_layers": 2,
            "num_refiner_layers": 2,
            "ffn_dim": 32,
            "in_channels": 4,
            "audio_in_channels": 6,
            "patch_size": (1, 2, 2),
            "text_dim": 8,
            "freq_dim": 8,
            "time_embed_hidden_dim": 24,
            "time_embed_dim": 16,
            "rope_freq_dim": 2,
        },
        _minimax_h3,
        "one packed text/audio/video sequence; tokens placed by index tensors",
    ),
    Case(
        "minimax_music3",
        "MiniMaxMusic3Transformer1DModel",
        {
            "in_channels": 8,
            "condition_dim": 16,
            "num_layers": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "ff_inner_dim": 32,
            "rotary_dim": 4,
            "fourier_embedding_dim": 8,
        },
        _minimax_music3,
        "1-D music latents, channels-first, 37 frames",
    ),
    Case(
        "mochi",
        "MochiTransformer3DModel",
        {
            "patch_size": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "num_layers": 2,
            "pooled_projection_dim": 16,
            "in_channels": 4,
            "out_channels": None,
            "qk_norm": "rms_norm",
            "text_embed_dim": 16,
            "time_embed_dim": 4,
            "activation_fn": "swiglu",
            "max_sequence_length": 16,
        },
        _mochi,
        "per-sample [video | valid text] attention (text padding dropped per sample)",
    ),
    Case(
        "motif_video",
        "MotifVideoTransformer3DModel",
        {
            "in_channels": 33,
            "out_channels": 16,
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "num_layers": 1,
            "num_single_layers": 1,
            "num_decoder_layers": 0,
            "mlp_ratio": 4.0,
            "patch_size": 1,
            "patch_size_t": 1,
            "qk_norm": "rms_norm",
            "norm_type": "layer_norm",
            "text_embed_dim": 32,
            "image_embed_dim": 4,
            "rope_theta": 256.0,
            "rope_axes_dim": (4, 4, 4),
            "enable_text_cross_attention_dual": False,
            "enable_text_cross_attention_single": False,
        },
        _motif_video,
        "Hunyuan-like [video | txt] with a padded text mask",
    ),
    Case(
        "nucleusmoe_image",
        "NucleusMoEImageTransformer2DModel",
        {
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 4,
            "joint_attention_dim": 16,
            "axes_dims_rope": (8, 4, 4),
            "moe_enabled": False,
            "capacity_factors": (8.0, 8.0),
        },
        _nucleusmoe_image,
        "Qwen-like; text mask with a hole and padding",
    ),
    Case(
        "omnigen",
        "OmniGenTransformer2DModel",
        {
            "hidden_size": 16,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "intermediate_size": 32,
            "num_layers": 2,
            "pad_token_id": 0,
            "vocab_size": 1000,
            "in_channels": 4,
            "time_step_dim": 4,
            "rope_scaling": {"long_factor": [1, 2], "short_factor": [1, 2]},
        },
        _omnigen,
        "LLM-style [txt | t | img] with a causal-text / bidirectional-image 3-D mask",
    ),
    Case(
        "ovis_image",
        "OvisImageTransformer2DModel",
        dict(_FLUX_INIT, out_channels=4),
        _ovis_image,
        "Flux-like joint attention",
    ),
    Case(
        "prx",
        "PRXTransformer2DModel",
        {
            "in_channels": 16,
            "patch_size": 2,
            "context_in_dim": 32,
            "hidden_size": 64,
            "mlp_ratio": 2.0,
            "num_heads": 4,
            "depth": 2,
            "axes_dim": (8, 8),
            "theta": 10_000,
        },
        _prx,
        "image queries over [txt | img] keys with a padded text mask",
    ),
    Case(
        "pixart",
        "PixArtTransformer2DModel",
        {
            "sample_size": 8,
            "num_layers": 1,
            "patch_size": 2,
            "attention_head_dim": 2,
            "num_attention_heads": 2,
            "in_channels": 4,
            "cross_attention_dim": 8,
            "out_channels": 8,
            "attention_bias": True,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 8,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "use_additional_conditions": False,
            "caption_channels": None,
        },
        _pixart,
        "image self-attention + cross-attention with a padded text mask",
    ),
    Case(
        "prior",
        "PriorTransformer",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 4,
            "num_layers": 2,
            "embedding_dim": 8,
            "num_embeddings": 7,
            "additional_embeddings": 4,
        },
        _prior,
        "unCLIP prior: causal attention over 11 embedding tokens with a padded mask",
    ),
    Case(
        "qwenimage21",
        "QwenImage21Transformer2DModel",
        _QWENIMAGE21_INIT,
        _qwenimage21(edit=False),
        "image tokens scattered into vision-language slots; block-causal mask; padded text",
    ),
    Case(
        "qwenimage21_edit",
        "QwenImage21Transformer2DModel",
        _QWENIMAGE21_INIT,
        _qwenimage21(edit=True),
        "as qwenimage21 with a condition image's slots interleaved with the text",
    ),
    Case(
        "qwenimage",
        "QwenImageTransformer2DModel",
        _QWENIMAGE_INIT,
        _qwenimage(edit=False),
        "[txt | img]; RoPE built inside from img_shapes; text mask with a hole",
    ),
    Case(
        "qwenimage_edit",
        "QwenImageTransformer2DModel",
        _QWENIMAGE_INIT,
        _qwenimage(edit=True),
        "[txt | target | reference] (Qwen-Image-Edit): two image segments",
    ),
    Case(
        "rfd4_proteina",
        "RFD4ProteinaTransformer",
        {
            "nlayers": 2,
            "token_dim": 32,
            "nheads": 2,
            "dim_cond": 16,
            "pair_repr_dim": 8,
            "latent_dim": 8,
            "t_emb_dim": 16,
            "seq_sep_dim": 8,
            "xt_pair_dist_dim": 8,
            "feats_seq": ("xt_bb_ca", "xt_local_latents"),
            "feats_cond_seq": ("time_emb_bb_ca", "time_emb_local_latents"),
            "feats_pair_repr": ("xt_bb_ca_pair_dists",),
            "feats_pair_cond": ("time_emb_bb_ca", "time_emb_local_latents"),
            "update_pair_repr_every_n": 1,
            "tri_mult_c": 8,
        },
        _rfd4_proteina,
        "protein tokens with a pair representation as attention bias; padding mask",
    ),
    Case(
        "sd3",
        "SD3Transformer2DModel",
        _SD3_INIT,
        _sd3,
        "[img | txt] joint attention (cat on the sequence after a transpose); cropped table",
    ),
    Case(
        "sd35",
        "SD3Transformer2DModel",
        {**_SD3_INIT, "dual_attention_layers": (0,), "qk_norm": "rms_norm"},
        _sd3,
        "SD3.5: a second image-only attention in the first block; QK RMSNorm",
    ),
    Case(
        "sana",
        "SanaTransformer2DModel",
        {
            "patch_size": 1,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 1,
            "attention_head_dim": 4,
            "num_attention_heads": 2,
            "num_cross_attention_heads": 2,
            "cross_attention_head_dim": 4,
            "cross_attention_dim": 8,
            "caption_channels": 8,
            "sample_size": 32,
        },
        _sana,
        "linear self-attention (no SDPA) + SDPA cross-attention with a padded text mask",
    ),
    Case(
        "sana_video",
        "SanaVideoTransformer3DModel",
        {
            "in_channels": 16,
            "out_channels": 16,
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "num_layers": 2,
            "num_cross_attention_heads": 2,
            "cross_attention_head_dim": 12,
            "cross_attention_dim": 24,
            "caption_channels": 16,
            "mlp_ratio": 2.5,
            "dropout": 0.0,
            "attention_bias": False,
            "sample_size": 8,
            "patch_size": (1, 2, 2),
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 32,
        },
        _sana_video,
        "linear attention with RoPE + SDPA cross-attention; padded text",
    ),
    Case(
        "sana_wm_refiner",
        "SanaWMLTX2RefinerTransformer3DModel",
        {
            "in_channels": 8,
            "out_channels": 8,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "cross_attention_dim": 32,
            "num_layers": 2,
            "caption_channels": 16,
            "audio_in_channels": 8,
            "audio_out_channels": 8,
            "audio_num_attention_heads": 2,
            "audio_attention_head_dim": 8,
            "audio_cross_attention_dim": 16,
            "rope_double_precision": False,
        },
        _sana_wm_refiner,
        "LTX-2-style video refiner; RoPE passed in; padded text",
    ),
    Case(
        "sana_wm",
        "SanaWMTransformer3DModel",
        {
            "in_channels": 4,
            "num_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 2,
            "softmax_every_n": 2,
            "linear_head_dim": 32,
            "caption_channels": 16,
            "use_chunk_plucker_post_attn": False,
            "chunk_plucker_post_attn_blocks": 0,
            "image_size": 64,
            "mixed_precision": "fp32",
        },
        _sana_wm,
        "world model: linear + softmax attention blocks, per-frame timesteps",
    ),
    Case(
        "skyreels_v2",
        "SkyReelsV2Transformer3DModel",
        dict(_WAN_INIT),
        _skyreels_v2(forcing=False),
        "Wan-like text-to-video",
    ),
    Case(
        "skyreels_v2_df",
        "SkyReelsV2Transformer3DModel",
        dict(_WAN_INIT),
        _skyreels_v2(forcing=True),
        "diffusion forcing: a timestep per latent frame, broadcast to its tokens",
    ),
    Case(
        "transformer_2d",
        "Transformer2DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "in_channels": 32,
            "num_layers": 1,
            "norm_num_groups": 8,
            "cross_attention_dim": 16,
        },
        _transformer_2d_continuous,
        "SD UNet spatial transformer (continuous input): GroupNorm, self- and cross-attention",
    ),
    Case(
        "transformer_2d_patched",
        "Transformer2DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 4,
            "in_channels": 4,
            "out_channels": 8,
            "num_layers": 1,
            "patch_size": 2,
            "sample_size": 8,
            "norm_type": "ada_norm_zero",
            "num_embeds_ada_norm": 8,
        },
        _transformer_2d_patched,
        "patched input (DiT through the generic class)",
    ),
    Case(
        "transformer_2d_vectorized",
        "Transformer2DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "num_layers": 1,
            "num_vector_embeds": 17,
            "sample_size": 5,
            "cross_attention_dim": 16,
            "norm_type": "ada_norm",
            "num_embeds_ada_norm": 1000,
        },
        _transformer_2d_vectorized,
        "VQ-Diffusion: discrete tokens with a learned table; log-prob output over classes",
    ),
    Case(
        "transformer_temporal",
        "TransformerTemporalModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "in_channels": 32,
            "num_layers": 1,
            "norm_num_groups": 8,
        },
        _transformer_temporal,
        "attention over frames (the sequence is time; spatial positions are the batch)",
    ),
    Case(
        "wan_animate2",
        "WanAnimate2Transformer3DModel",
        {
            "patch_size": (1, 2, 2),
            "text_len": 16,
            "in_dim": 8,
            "dim": 32,
            "ffn_dim": 64,
            "freq_dim": 32,
            "text_dim": 16,
            "out_dim": 4,
            "num_heads": 2,
            "num_layers": 2,
            "cross_attn_norm": True,
            "use_img_emb": True,
        },
        _wan_animate2,
        "list inputs; a KV-cache object filled in 'extract' mode",
    ),
    Case(
        "wan_animate",
        "WanAnimateTransformer3DModel",
        dict(
            _WAN_INIT,
            in_channels=12,
            latent_channels=4,
            image_dim=16,
            motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
            motion_encoder_size=16,
            motion_style_dim=8,
            motion_dim=4,
            motion_encoder_dim=16,
            face_encoder_hidden_dim=16,
            face_encoder_num_heads=2,
            inject_face_latents_blocks=2,
        ),
        _wan_animate,
        "Wan I2V + pose latents + face-motion tokens cross-attended per frame",
    ),
    Case(
        "wan",
        "WanTransformer3DModel",
        dict(_WAN_INIT),
        _wan("t2v"),
        "text-to-video; RoPE from the latent shape",
    ),
    Case(
        "wan_i2v",
        "WanTransformer3DModel",
        dict(_WAN_INIT, in_channels=12, image_dim=16, added_kv_proj_dim=None),
        _wan("i2v"),
        "image-to-video: CLIP image tokens joined to the text for cross-attention",
    ),
    Case(
        "wan22_ti2v",
        "WanTransformer3DModel",
        dict(_WAN_INIT, in_channels=12, out_channels=12),
        _wan("ti2v"),
        "Wan 2.2 TI2V: a timestep per token (first frame clean)",
    ),
    Case(
        "wan_vace",
        "WanVACETransformer3DModel",
        dict(
            _WAN_INIT,
            in_channels=16,
            out_channels=16,
            text_dim=16,
            num_layers=4,
            vace_layers=(0, 2),
            vace_in_channels=48,
        ),
        _wan_vace,
        "control stream blocks whose outputs are added into the main stream",
    ),
    Case(
        "z_image",
        "ZImageTransformer2DModel",
        {
            "all_patch_size": (2,),
            "all_f_patch_size": (1,),
            "in_channels": 16,
            "dim": 32,
            "n_layers": 1,
            "n_refiner_layers": 1,
            "n_heads": 2,
            "n_kv_heads": 2,
            "qk_norm": True,
            "cap_feat_dim": 16,
            "rope_theta": 256.0,
            "t_scale": 1000.0,
            "axes_dims": (8, 4, 4),
            "axes_lens": (256, 32, 32),
        },
        _z_image,
        "per-sample packing: 2 images of different sizes and captions, padded to 32",
    ),
)
"""Every case, in order of diffusers class name."""

BY_NAME: dict[str, Case] = {c.name: c for c in CASES}

FAST: tuple[str, ...] = (
    "flux",  # [txt | img] joint attention, RoPE from input ids, batch 2
    "sd3",  # [img | txt] cat after a transpose; learned positional table cropped at run time
    "qwenimage_edit",  # [txt | target | reference]: two image segments; RoPE built inside; mask hole
    "hunyuan_video",  # [video | txt] with a padded text key mask; text-only refiner attention
    "wan_i2v",  # conv 3-D patching, RoPE from the latent shape, cross-attention to image + text
    "cogvideox",  # sincos 3-D table rebuilt for a size unlike the config's, added after [txt | video]
    "ltx",  # RoPE from int arguments (frames, height, width); cross-attention with a padded mask
    "z_image",  # per-sample packing: list inputs of different sizes padded inside; graph breaks
    "joyimage_edit_plus",  # per-sample image layouts padded to one length, masked as keys
    "ace_step",  # 1-D, GQA, a sliding-window mask built from positions, 23 tokens
)
"""Ten cases covering the distinct patterns, a few seconds each per strategy: for the test suite."""


# ---------------------------------------------------------------------------------------------
# Building and reading outputs


def build(
    case: Case | str, seed: int = 0, fill_zeros: bool = True
) -> tuple[torch.nn.Module, Inputs]:
    """`(model.eval(), forward kwargs)` of a case: deterministic, offline, float32 on the CPU.

    Weights come from `torch.manual_seed(seed)` then the class's own initialisation. With
    `fill_zeros`, every parameter the class initialises to all zeros (adaLN-Zero gates, zero output
    projections) is redrawn small and random: trained weights are never all zero, and a zero gate
    would make the output independent of attention, so the comparison would prove nothing."""
    import diffusers

    case = BY_NAME[case] if isinstance(case, str) else case
    if case.skip_reason:
        raise RuntimeError(f"{case.name}: {case.skip_reason}")
    assert case.inputs is not None, case.name
    torch.manual_seed(seed)
    model = getattr(diffusers, case.cls)(**case.init).eval()
    if fill_zeros:
        _fill_zero_params(model, seed)
    return model, case.inputs(seed)


def _fill_zero_params(model: torch.nn.Module, seed: int) -> int:
    """Redraw all-zero floating-point parameters as N(0, 0.05^2); returns how many."""
    g = torch.Generator().manual_seed(2000 + seed)
    filled = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 0 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
                filled += 1
    log.debug("filled %d all-zero parameters", filled)
    return filled


def outputs(result: Any) -> list[torch.Tensor]:
    """The tensors to compare from a forward's result: the elements of the returned tuple (or the
    fields of a returned output object), lists of per-sample tensors stacked when their shapes
    agree; `None` and non-tensor entries (caches) are dropped."""
    if hasattr(result, "to_tuple"):
        result = result.to_tuple()
    if isinstance(result, torch.Tensor):
        return [result]
    found: list[torch.Tensor] = []
    for item in result if isinstance(result, (tuple, list)) else (result,):
        found += _tensors_of(item)
    return found


def _tensors_of(item: Any) -> list[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        return [item]
    if isinstance(item, (list, tuple)) and item and all(isinstance(t, torch.Tensor) for t in item):
        if len({tuple(t.shape) for t in item}) == 1:
            return [torch.stack(list(item))]
        return list(item)
    return []
