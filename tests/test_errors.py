"""Reliability: clear errors before work, no hangs, no silent wrong answers."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import cpfx
from cpfx.testing.launch import Pool
from cpfx.testing.parity import divergence, fresh, make_mesh
from cpfx.testing.tiny import build
from tests.graphs import fake_world


def test_no_process_group():
    assert not dist.is_initialized()
    m, _ = build("flux")
    with pytest.raises(cpfx.ConfigError, match="init_process_group"):
        cpfx.parallelize(m)


def test_bad_config_values():
    with pytest.raises(cpfx.ConfigError, match="ring_rotate"):
        cpfx.ParallelConfig(ring_rotate="ring")
    with pytest.raises(cpfx.ConfigError, match="head_padding"):
        cpfx.ParallelConfig(head_padding="zeros")


def test_mesh_checks():
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    m, _ = build("flux")
    with fake_world(4):
        with pytest.raises(cpfx.ConfigError, match="unknown mesh dim name"):
            cpfx.parallelize(m, init_device_mesh("cpu", (4,), mesh_dim_names=("cp",)))
        with pytest.raises(cpfx.ConfigError, match="2 devices but the process group has 4"):
            cpfx.parallelize(m, DeviceMesh("cpu", [0, 1], mesh_dim_names=("ulysses",)))
        with pytest.raises(cpfx.ConfigError, match="order the mesh dims"):
            cpfx.parallelize(m, init_device_mesh("cpu", (2, 2), mesh_dim_names=("ulysses", "ring")))
        with pytest.raises(cpfx.ConfigError, match="no dim names"):
            cpfx.parallelize(m, init_device_mesh("cpu", (4,)))


def test_mesh_that_is_not_a_device_mesh():
    """Was: `parallelize(model, "ulysses")` raised AttributeError ('str' object has no attribute
    'mesh_dim_names'); None still means the default mesh."""
    m, _ = build("flux")
    with fake_world(2):
        for bad in ("ulysses", ("ulysses",), 2):
            with pytest.raises(cpfx.ConfigError, match=r"DeviceMesh.*init_device_mesh") as info:
                cpfx.parallelize(m, bad)
            assert type(bad).__name__ in str(info.value), info.value
        assert cpfx.parallelize(m, None)._cpfx.info.ulysses == 2


class NoAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x).relu()


def test_model_without_attention():
    with fake_world(2):
        m = cpfx.parallelize(NoAttention(), config=cpfx.ParallelConfig(check_collectives=False))
        with (
            pytest.raises(cpfx.ConfigError, match="no scaled_dot_product_attention"),
            torch.no_grad(),
        ):
            m(torch.randn(1, 16, 8))


class Attn(torch.nn.Module):
    def __init__(self, **sdpa_kwargs):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)
        self.kw = sdpa_kwargs

    def forward(self, x, mask=None):
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        kw = dict(self.kw)
        if mask is not None:
            kw["attn_mask"] = mask
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


def _compile(model, *args, world=2, names=("ulysses",), **config):
    from torch.distributed.device_mesh import init_device_mesh

    from cpfx.api import unwrap_errors

    torch._dynamo.reset()
    with fake_world(world):
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=names)
        be = cpfx.backend(mesh, cpfx.ParallelConfig(check_collectives=False, **config))
        with torch.no_grad():
            unwrap_errors(torch.compile(model, backend=be, dynamic=False))(*args)


def test_dropout_refused():
    with pytest.raises(cpfx.UnsupportedPatternError, match="dropout_p=0.1"):
        _compile(Attn(dropout_p=0.1), torch.randn(1, 16, 16))


class _FlexBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x):
        from torch.nn.attention.flex_attention import flex_attention

        q, k, v = self.proj(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return flex_attention(q, k, v)  # the line the error names


class _FlexModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_FlexBlock()])

    def forward(self, x):
        return self.blocks[0](x)


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def test_refusal_names_the_model_line_in_well_formed_text():
    """Was: `attention at .transformer_blocks.0.attn (out, lse, max_scores = flex_attention_hop()
    is ...`: torch's frame, the first line of a multi-line statement, an unclosed parenthesis."""
    import inspect

    line = inspect.getsource(_FlexBlock.forward).splitlines().index(
        "        return flex_attention(q, k, v)  # the line the error names"
    ) + inspect.getsourcelines(_FlexBlock.forward)[1]
    with pytest.raises(cpfx.UnsupportedPatternError) as info:
        _compile(_FlexModel(), torch.randn(1, 16, 16))
    msg = str(info.value)
    want = f"attention at blocks.0 (test_errors.py:{line}: `return flex_attention(q, k, v)"
    assert want in msg and "flex_attention_hop" not in msg, msg
    assert _balanced(msg), msg


def test_where_closes_a_cut_statement():
    import torch.fx as fx

    from cpfx.graph_utils import where

    g = fx.Graph()
    n = g.call_function(torch.add, (1, 2))
    n.meta["nn_module_stack"] = {"x": ("L['self'].transformer_blocks[0].attn", object)}
    n.meta["stack_trace"] = (
        '  File "/m/transformer_x.py", line 7, in forward\n'
        "    out = self.attn(hidden_states, encoder_hidden_states=encoder_hidden_states, "
        "image_rotary_emb=image_rotary_emb)\n"
        '  File "/site-packages/torch/nn/attention/flex_attention.py", line 9, in flex_attention\n'
        "    out, lse, max_scores = flex_attention_hop(\n"
        "                           ^^^^^^^^^^^^^^^^^^^\n"
    )
    text = where(n)
    assert text.startswith("transformer_blocks.0.attn (transformer_x.py:7: `out = self.attn("), text
    assert text.endswith("...)`)") and len(text) < 120 and _balanced(text), text


def test_causal_is_lowered_not_refused():
    """Causal attention over the sharded sequence: each block's mask is built from the global
    positions its queries and keys hold (numerics: tests/test_soundness.py)."""
    cpfx.reset_counters()
    _compile(Attn(is_causal=True), torch.randn(1, 16, 16), names=("ring",))
    assert cpfx.counters["lower_attention"]["ring_p2p"] == 1


def test_recompile_cap():
    with fake_world(2):
        m, kw = build("flux")
        cpfx.parallelize(m, config=cpfx.ParallelConfig(max_recompiles=1, check_collectives=False))
        with torch.no_grad():
            m(**kw)
            _, kw2 = build("flux", img=32)
            with pytest.raises(cpfx.CpfxError, match="max_recompiles=1"):
                m(**kw2)


def test_divergent_ranks_raise_instead_of_hanging(pools):
    res = pools(2).run(diverging_graphs, timeout=300)
    for r in res:
        assert (
            r.startswith("RankDivergenceError") and "ring_send_recv" in r and "all_gather" in r
        ), r


@pytest.mark.ranks
def test_rank_death_raises_within_timeout():
    pool = Pool(2)
    try:
        pool.submit(rank_dies, timeout_s=20.0)
        rank, ok, val = pool.results.get(timeout=240)
        assert rank == 0 and ok and val.startswith("raised after"), val
        assert float(val.split()[2].rstrip("s:")) < 60
    finally:
        pool.close(kill=True)


def test_three_resolutions_each_exact(pools):
    res = pools(2).run(resolutions, sizes=[64, 48, 100])
    for diffs in res:
        assert max(diffs) <= 1e-5, diffs


def test_check_inputs_catches_rank_dependent_inputs(pools):
    res = pools(2).run(different_inputs)
    for r in res:
        assert "received different inputs" in r, r


@pytest.mark.parametrize("config", [{}, {"regional": True}], ids=["default", "regional"])
def test_rank_seeded_second_image_raises_under_the_default_check(pools, config):
    """A first image with one seed everywhere, then latents (6,400 elements) from a generator
    seeded with the rank: was silent under the default check (only inputs of at most 4,096
    elements were hashed after a signature's first call), each rank a different wrong image."""
    for r in pools(2).run(rank_seeded_second_call, config=config):
        assert r["first"] == "ok", r
        assert "received different inputs" in r["second"] and "hidden_states" in r["second"], r


def test_no_send_left_pending_after_forward(pools):
    assert pools(2).run(ring_leaves_nothing_pending) == [0, 0]


def test_gather_by_all_to_all_matches_all_gather(pools):
    """gloo on CUDA tensors gathers through an all-to-all (torch 2.11's gloo all_gather crashed on
    CUDA); both routes give the rank-ordered concatenation."""
    for res in pools(3).run(gather_both_ways):
        assert res == {"cpu": 0.0, "cuda": 0.0, "routed": True}


# --- tasks run by every rank of a gloo pool --------------------------------------------------


def diverging_graphs(timeout_s: float = 60.0) -> str:
    """Rank 1 compiles a different collective schedule (allgather ring vs p2p ring)."""
    import cpfx

    fresh()
    m, kw = build("flux")
    rotate = "allgather" if dist.get_rank() == 1 else "p2p"
    cfg = cpfx.ParallelConfig(ring_rotate=rotate, timeout_s=timeout_s)
    cpfx.parallelize(m, make_mesh(names=("ring",)), cfg)
    return divergence(m, kw)


def rank_dies(timeout_s: float = 20.0) -> str:
    """The last rank exits in the middle of the forward; the others must raise, not hang."""
    import os
    import time

    import cpfx

    fresh()
    m, kw = build("flux")
    cfg = cpfx.ParallelConfig(timeout_s=timeout_s, check_collectives=False)
    cpfx.parallelize(m, make_mesh(), cfg)
    if dist.get_rank() == dist.get_world_size() - 1:
        os._exit(3)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            m(**kw)
    except Exception as e:  # noqa: BLE001 - any error is fine, hanging is not
        return f"raised after {time.perf_counter() - t0:.1f}s: {type(e).__name__}"
    return "no error"


def resolutions(sizes: list[int]) -> list[float]:
    """One parallelized model, several input resolutions in a row: each vs single process."""
    import cpfx

    fresh()
    m, _ = build("flux")
    refs = []
    for n in sizes:
        _, kw = build("flux", img=n)
        with torch.no_grad():
            refs.append((kw, m(**kw)[0]))
    cpfx.parallelize(m, make_mesh())
    diffs = []
    with torch.no_grad():
        for kw, ref in refs:
            diffs.append((m(**kw)[0] - ref).abs().max().item())
    return diffs


def different_inputs() -> str:
    import cpfx

    fresh()
    m, kw = build("flux", seed=dist.get_rank())  # rank-dependent inputs: a user error
    cpfx.parallelize(m, make_mesh(), cpfx.ParallelConfig(check_inputs=True))
    try:
        with torch.no_grad():
            m(**kw)
    except cpfx.RankDivergenceError as e:
        return str(e)
    return "no error"


def rank_seeded_second_call(config: dict) -> dict[str, str]:
    fresh()
    m, kw = build("flux", img=1600)  # hidden_states [1, 1600, 4]: 6,400 elements
    cpfx.parallelize(m, make_mesh(), cpfx.ParallelConfig(**config))
    out = {}
    for call in ("first", "second"):
        if call == "second":
            g = torch.Generator().manual_seed(100 + dist.get_rank())
            kw = {**kw, "hidden_states": torch.randn(kw["hidden_states"].shape, generator=g)}
        try:
            with torch.no_grad():
                m(**kw)
            out[call] = "ok"
        except cpfx.RankDivergenceError as e:
            out[call] = str(e)
    return out


def ring_leaves_nothing_pending() -> int:
    import cpfx
    from cpfx import p2p

    fresh()
    m, kw = build("flux")
    cpfx.parallelize(m, make_mesh(names=("ring",)), cpfx.ParallelConfig(ring_rotate="p2p"))
    with torch.no_grad():
        m(**kw)
    return len(p2p._pending_sends)


def gather_both_ways() -> dict[str, float]:
    """`comm.all_gather_rows` as an all-gather and as the all-to-all it becomes for gloo on CUDA
    (device_type="cuda" takes that route on gloo; the tensors stay on the CPU)."""
    from cpfx import comm

    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD.group_name
    blocks = [torch.arange(24.0).reshape(3, 2, 4) + 100 * r for r in range(world)]
    want = torch.cat(blocks)
    out = {}
    for device_type in ("cpu", "cuda"):
        got = comm.all_gather_rows(
            blocks[rank], world, group, shape=(3, 2, 4), device_type=device_type
        )
        out[device_type] = (got - want).abs().max().item()
    out["routed"] = comm.gathers_by_all_to_all("cuda", group)
    return out
