"""Exact or loud: side effects kept, reductions over the tokens not split, the verifier.

Each model here was silently wrong or unparallelized before functionalization and the rule
registry: CogVideoX with fewer frames than its sample size (a positional table written through
`.data[...].copy_` that dead-code elimination dropped), a mask built by an in-place
`masked_fill_`, a per-tensor amax over the tokens (dynamic quantization), image queries attending
to [text | image] keys.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cpfx
from cpfx.testing.parity import compare, fresh
from tests.graphs import fake_world

TOL = 1e-5


# --- models ------------------------------------------------------------------------------------


class _Attn(torch.nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).flatten(2))


class DataCopyTable(torch.nn.Module):
    """A positional table built at run time and written through `.data[...].copy_` (CogVideoX's
    patch embedding when the frame count differs from its sample size)."""

    def __init__(self, text: int = 3) -> None:
        super().__init__()
        self.text = text
        self.attn = _Attn()

    def forward(self, x: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        pos = torch.arange(n, dtype=x.dtype)[:, None] * torch.linspace(0.1, 1.0, x.shape[2])
        joint = x.new_zeros(1, self.text + n, x.shape[2], requires_grad=False)
        joint.data[:, self.text :].copy_(pos)
        h = torch.cat([txt, x], dim=1) + joint
        return self.attn(h)


class InplaceMask(torch.nn.Module):
    """An additive mask made by an in-place `masked_fill_` whose result is not used directly."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attn()

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
        bias.masked_fill_(~keep[None, :], float("-inf"))
        return self.attn(x, bias)


class PerTensorQuant(torch.nn.Module):
    """Dynamic int8-style fake quantization with one scale over all tokens before attention."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax() / 127.0
        xq = torch.round(x / scale).clamp(-127, 127) * scale
        return self.attn(xq)


class SliceKeys(torch.nn.Module):
    """Image queries attend to [text | image] keys (queries over a sub-range of the keys)."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        joint = torch.cat([txt, img], 1)
        q = self.q(img).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k, v = self.kv(joint).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class _Causal(_Attn):
    """Causal self-attention (autoregressive video / audio DiTs): the mask follows global positions."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).flatten(2))


def _cogvideox(sample_frames: int = 8, frames: int = 2, batch: int = 1):
    """diffusers' own CogVideoX model-test configuration: sample_frames=8 with 2 latent frames."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=2, text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8,
        sample_frames=sample_frames, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=8,
    ).eval()
    g = torch.Generator().manual_seed(1)
    kw = dict(
        hidden_states=torch.randn(batch, frames, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 8, 8, generator=g),
        timestep=torch.tensor([500] * batch),
        return_dict=False,
    )
    return m, kw


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "data_copy":
        return DataCopyTable().eval(), {"x": torch.randn(1, 13, 16, generator=g),
                                        "txt": torch.randn(1, 3, 16, generator=g)}
    if name == "inplace_mask":
        keep = torch.rand(11, generator=g) > 0.3
        keep[0] = True
        return InplaceMask().eval(), {"x": torch.randn(1, 11, 16, generator=g), "keep": keep}
    if name == "per_tensor_quant":
        return PerTensorQuant().eval(), {"x": torch.randn(2, 13, 16, generator=g)}
    if name == "slice_keys":
        return SliceKeys().eval(), {"img": torch.randn(2, 13, 16, generator=g),
                                    "txt": torch.randn(2, 5, 16, generator=g)}
    if name == "causal":
        return _Causal().eval(), {"x": torch.randn(2, 13, 16, generator=g)}
    if name == "cogvideox_frames":
        return _cogvideox()
    if name == "cogvideox_frames_b2":
        return _cogvideox(batch=2)
    raise KeyError(name)


# --- tasks run by every gloo rank ------------------------------------------------------------


def parity(name: str, names: tuple[str, ...] = ("ulysses",), config: dict | None = None) -> dict:
    fresh()
    m, kw = build(name)
    return compare(m, kw, mesh_names=names, config=config)


CASES = ["data_copy", "inplace_mask", "per_tensor_quant", "slice_keys", "causal",
         "cogvideox_frames", "cogvideox_frames_b2"]


@pytest.mark.parametrize("names", [("ulysses",), ("ring",)], ids=["ulysses", "ring"])
@pytest.mark.parametrize("name", CASES)
def test_parity(pools, name, names):
    results = pools(2).run(parity, name=name, names=names,
                           config={"verify": True})
    for r, res in enumerate(results):
        assert res["max_abs"] <= TOL, f"rank {r}: {res['max_abs']:.3g}"
        assert sum(res["counters"]["lower_attention"].values()) >= 1, res["counters"]


def test_uneven_three_ranks(pools):
    for res in pools(3).run(parity, name="cogvideox_frames"):
        assert res["max_abs"] <= TOL


# --- one process: the graph keeps what the model wrote ---------------------------------------


def _graphs(name: str, world: int = 2, **config):
    from torch.distributed.device_mesh import init_device_mesh

    from cpfx.api import unwrap_errors

    torch._dynamo.reset()
    cpfx.reset_counters()
    m, kw = build(name)
    with fake_world(world):
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ulysses",))
        config.setdefault("check_collectives", False)
        be = cpfx.backend(mesh, cpfx.ParallelConfig(**config))
        with torch.no_grad():
            unwrap_errors(torch.compile(m, backend=be, dynamic=False))(**kw)
    return be.graphs


def _targets(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_data_copy_write_is_kept():
    (gm,) = _graphs("data_copy")
    assert "aten.slice_scatter.default" in _targets(gm)  # the write, functional and sliced


def test_inplace_mask_write_is_kept():
    (gm,) = _graphs("inplace_mask")
    assert "aten.masked_fill.Scalar" in _targets(gm) or "aten.where.self" in _targets(gm)


def test_per_tensor_amax_sees_all_tokens():
    """A per-tensor amax over the sharded tokens: each rank's amax of its shard, then an
    all-reduce of the maximum before the scale is used."""
    (gm,) = _graphs("per_tensor_quant")
    amax = [n for n in gm.graph.nodes if str(n.target) == "aten.amax.default"]
    assert amax and all(n.meta["val"].shape == () for n in amax)
    assert all(n.args[0].meta["val"].shape[1] < 13 for n in amax)  # a shard of the 13 tokens
    reduces = [n for n in gm.graph.nodes if "_c10d_functional.all_reduce" in str(n.target)]
    assert len(reduces) == len(amax) and all(n.args[1] == "max" for n in reduces)
    sources = [n.args[0].args[0] if "contiguous" in str(n.args[0].target) else n.args[0]
               for n in reduces]
    assert all(x in amax for x in sources)


def test_queries_over_a_subrange_of_keys_are_parallel():
    _graphs("slice_keys")
    assert cpfx.counters["shard_tokens"]["attention_sharded"] == 1
    assert cpfx.counters["lower_attention"]["ulysses"] == 1


def test_verifier_names_a_wrong_rule(monkeypatch):
    """Inject a wrong rule (cumsum along the tokens claimed token-wise): the verifier raises on
    the first call, naming the cumsum and its source line."""
    from cpfx.sharding import rules
    from cpfx.sharding.rules.pointwise import pointwise

    class Cumsum(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = _Attn()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(torch.cumsum(x, dim=1))

    monkeypatch.setitem(rules._RULES, torch.ops.aten.cumsum.default, pointwise)
    from torch.distributed.device_mesh import init_device_mesh

    torch._dynamo.reset()
    m = Cumsum().eval()
    x = torch.randn(1, 12, 16)
    with fake_world(2, rank=1):  # rank 0's prefix sums happen to be right
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ulysses",))
        model = cpfx.parallelize(m, mesh, cpfx.ParallelConfig(verify=True, check_collectives=False))
        with pytest.raises(cpfx.VerificationError, match=r"cumsum.*torch.cumsum\(x, dim=1\)"):
            with torch.no_grad():
                model(x)
