"""No silent fallback at run time (issue 15): recompile limits, attention outside cpfx's graphs,
grad mode, rank-dependent inputs, masked errors; plus the config and runtime units they use."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

import cpfx
from tests.graphs import fake_world


def _mesh(world: int = 2, names: tuple[str, ...] = ("ulysses",)):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,), mesh_dim_names=names)


# --- ParallelConfig validation (issue 16.7) ------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("fp8_comm", "false"),
        ("fp8_comm", 1),
        ("async_qkv", None),
        ("compile", "yes"),
        ("check_collectives", 0),
        ("strict", "true"),
        ("ring_rotate", "ring"),
        ("ring_rotate", 2),
        ("head_padding", "zeros"),
        ("check_inputs", "sometimes"),
        ("check_inputs", 1),
        ("timeout_s", float("nan")),
        ("timeout_s", float("inf")),
        ("timeout_s", "20"),
        ("timeout_s", 0),
        ("timeout_s", -1.0),
        ("timeout_s", True),
        ("max_recompiles", 2.5),
        ("max_recompiles", 0),
        ("max_recompiles", "8"),
        ("max_recompiles", True),
        ("skip_passes", "overlap"),
        ("skip_passes", ("overlapp",)),
        ("skip_passes", ("shard_tokens",)),
        ("skip_passes", (1,)),
        ("dump_dir", 3),
        ("dump_dir", ""),
    ],
)
def test_bad_config_value_refused(field, value):
    with pytest.raises(cpfx.ConfigError, match=field):
        cpfx.ParallelConfig(**{field: value})


def test_good_config_values_normalized():
    cfg = cpfx.ParallelConfig(skip_passes=["overlap"], timeout_s=20, dump_dir=os.curdir)
    assert cfg.skip_passes == ("overlap",) and cfg.timeout_s == 20.0
    assert isinstance(cfg.timeout_s, float) and math.isfinite(cfg.timeout_s)
    assert cpfx.ParallelConfig().check_inputs == "first"
    with pytest.warns(DeprecationWarning, match="check_inputs='always'"):
        assert cpfx.ParallelConfig(check_inputs=True).check_inputs == "always"
    with pytest.warns(DeprecationWarning):
        assert cpfx.ParallelConfig(check_inputs=False).check_inputs == "never"


# --- one process, fake group --------------------------------------------------------------------


def test_grad_mode_refused_until_training_is_exact():
    from tests.models import build

    m, kw = build("flux")
    with fake_world(2):
        cpfx.parallelize(m, _mesh(), cpfx.ParallelConfig(check_collectives=False))
        with pytest.raises(cpfx.CpfxError, match=r"torch.no_grad\(\).*requires_grad_\(False\)"):
            m(**kw)  # parameters require grad, grad mode on: refused before any work
        assert not m._cpfx.graphs
        with torch.inference_mode():
            m(**kw)
        m.requires_grad_(False)
        m(**kw)  # frozen: nothing requires grad
        kw = {**kw, "hidden_states": kw["hidden_states"].clone().requires_grad_()}
        with pytest.raises(cpfx.CpfxError, match="1 input"):
            m(**kw)


class _BreakThenDropout(torch.nn.Module):
    """A graph before the attention (graph break), then an attention cpfx must refuse."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x):
        x = self.proj(x) * 2
        torch._dynamo.graph_break()
        q, k, v = x.unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


def test_pass_error_not_masked():
    """Was: the first graph (no attention) compiled, the second raised in a pass, and a `finally`
    replaced that error with "found no scaled_dot_product_attention"."""
    torch._dynamo.reset()
    with fake_world(2):
        cfg = cpfx.ParallelConfig(check_collectives=False)
        m = cpfx.parallelize(_BreakThenDropout(), _mesh(), cfg)
        with pytest.raises(cpfx.UnsupportedPatternError, match="dropout"), torch.no_grad():
            m(torch.randn(1, 16, 16))


class _RaisesInEager(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return _eager_type_error(out)


@torch.compiler.disable
def _eager_type_error(x):
    raise TypeError("user code failed")


def test_original_exception_surfaces_with_context():
    torch._dynamo.reset()
    with fake_world(2):
        m = cpfx.parallelize(
            _RaisesInEager(), _mesh(), cpfx.ParallelConfig(check_collectives=False)
        )
        with pytest.raises(TypeError, match="user code failed") as info, torch.no_grad():
            m(torch.randn(1, 16, 16))
    notes = getattr(info.value, "__notes__", [])
    assert any("rank 0" in n and "_RaisesInEager" in n for n in notes), notes


def test_recompile_limit_is_an_error_with_dynamo_reason():
    from tests.models import build

    torch._dynamo.reset()
    m, kw = build("flux")
    with fake_world(2), torch.no_grad():
        cfg = cpfx.ParallelConfig(max_recompiles=2, check_collectives=False)
        cpfx.parallelize(m, _mesh(), cfg)
        m(**kw)
        m(**build("flux", img=32)[1])
        failed = build("flux", img=48)[1]
        with pytest.raises(cpfx.RecompileLimitError, match=r"max_recompiles=2.*size mismatch"):
            m(**failed)
        n = len(m._cpfx.graphs)
        m(**kw)  # a cached variant still runs parallel; the failed call compiled nothing
        assert len(m._cpfx.graphs) == n == 2


def test_attention_counted_once_per_signature_and_strict():
    from tests.models import build

    torch._dynamo.reset()
    m, kw = build("flux", layers=1, single=2)
    block = m.single_transformer_blocks[0]
    block.forward = torch.compiler.disable(block.forward)
    with fake_world(2), torch.no_grad():
        cpfx.parallelize(m, _mesh(), cpfx.ParallelConfig(check_collectives=False))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m(**kw)
            first = [str(w.message) for w in caught if w.category is cpfx.CpfxWarning]
            caught.clear()
            m(**kw)
            later = [w for w in caught if w.category is cpfx.CpfxWarning]
        assert len(first) == 1 and "single_transformer_blocks.0.attn (x1)" in first[0], first
        assert "2 ran context-parallel" in first[0], first
        assert later == []
        report = cpfx.diagnose(m)
        assert report.signatures[0].outside == {"single_transformer_blocks.0.attn": 1}
        assert "1 outside" in str(report)


def test_disabled_attention_not_observed_by_dynamo():
    """The observer (a dispatch mode that ignores compile internals) does not make Dynamo
    recompile or fall back: a second call reuses every graph."""
    from tests.models import build

    torch._dynamo.reset()
    m, kw = build("flux")
    with fake_world(2), torch.no_grad():
        cpfx.parallelize(m, _mesh(), cpfx.ParallelConfig(check_collectives=False))
        m(**kw)
        graphs = len(m._cpfx.graphs)
        m(**kw)
        m(**kw)
    assert len(m._cpfx.graphs) == graphs and all(g.runs == 3 for g in m._cpfx.graphs)


# --- runtime units --------------------------------------------------------------------------------


def test_input_digest_sees_permutations_and_nan_payloads():
    from cpfx.rankcheck import tensor_digest

    x = torch.randn(1, 64, 4)
    swapped = x.clone()
    swapped[:, [3, 40]] = swapped[:, [40, 3]]
    assert not torch.equal(tensor_digest(x), tensor_digest(swapped))
    a, b = x.clone(), x.clone()
    a.view(torch.int32)[0, 5, 0] = 0x7FC00000
    b.view(torch.int32)[0, 5, 0] = 0x7FC00001
    assert not torch.equal(tensor_digest(a), tensor_digest(b))
    assert torch.equal(tensor_digest(x), tensor_digest(x.clone()))
    # same bytes through a strided view and an odd-sized dtype
    assert torch.equal(tensor_digest(x.transpose(1, 2)), tensor_digest(x.transpose(1, 2).clone()))
    assert tensor_digest(torch.arange(7, dtype=torch.uint8)).shape == (2,)


def test_take_pieces_accepts_no_pieces():
    from cpfx.comm import take_pieces

    x = torch.randn(2, 5, 3)
    assert take_pieces(x, 1, []).shape == (2, 0, 3)
    assert take_pieces(x, 1, [(1, 0)]).shape == (2, 0, 3)
    assert torch.equal(take_pieces(x, 1, [(0, 1), (3, 2)]), x[:, [0, 3, 4]])


def test_check_collectives_compares_sizes():
    from cpfx.passes.check_collectives import _SPLITS, find_mismatch
    from cpfx.rankcheck import text_hash

    def a2a(rows, ins, outs, world=2):
        rec = [-1] * (_SPLITS + 2 * world)
        rec[0], rec[1], rec[2] = text_hash("all_to_all_single"), 1, text_hash("q")
        rec[3], rec[4] = text_hash("torch.float32"), 3
        rec[5:8] = [rows, 2, 16]
        rec[_SPLITS : _SPLITS + world] = ins
        rec[_SPLITS + world : _SPLITS + 2 * world] = outs
        return rec

    # uneven but consistent: rank 0 keeps 17 and sends 16, rank 1 sends 17 and keeps 16
    ok = [[a2a(33, [17, 16], [17, 17])], [a2a(33, [17, 16], [16, 16])]]
    assert find_mismatch(ok, 2, 2, 1) is None
    bad = [[a2a(72, [36, 36], [36, 36])], [a2a(56, [28, 28], [28, 28])]]
    msg = find_mismatch(bad, 2, 2, 1)
    assert "rank 0 sends 36 rows" in msg and "expects 28 rows" in msg, msg
    kinds = [[a2a(33, [17, 16], [17, 17])], []]
    assert "<end>" in find_mismatch(kinds, 2, 2, 1)


def test_dump_refuses_symlinks_and_separates_models(tmp_path):
    from tests.models import build

    root = tmp_path / "dumps"
    target = tmp_path / "elsewhere"
    target.mkdir()
    cfg = cpfx.ParallelConfig(dump_dir=str(root), check_collectives=False)
    with fake_world(2), torch.no_grad():
        from cpfx import api

        torch._dynamo.reset()
        a, kw = build("flux")
        b, _ = build("flux", seed=1)
        first = next(api._ordinals) + 1
        cpfx.parallelize(a, _mesh(), cfg)
        cpfx.parallelize(b, _mesh(), cfg)
        a(**kw)
        b(**kw)
        dirs = sorted(p.name for p in root.iterdir())
        assert dirs == [f"FluxTransformer2DModel-{first}", f"FluxTransformer2DModel-{first + 1}"]
        for d in dirs:
            assert (root / d / "rank0" / "graph0" / "00_captured.py").exists()
        # a link planted where the next model's rank folder goes is refused, never followed
        torch._dynamo.reset()
        c, _ = build("flux", seed=2)
        nxt = first + 2
        planted = root / f"FluxTransformer2DModel-{nxt}"
        planted.mkdir()
        (planted / "rank0").symlink_to(target)
        cpfx.parallelize(c, _mesh(), cfg)
        with pytest.raises(cpfx.ConfigError, match="symbolic link"):
            c(**kw)
    assert list(target.iterdir()) == []


def test_world_size_one_exact(pools):
    res = pools(1).run("tests.tasks:parity", model="flux")
    assert res[0]["max_abs"] == 0.0, res
    assert res[0]["counters"] == {}  # no rewrite at all


# --- real gloo ranks (issue 15) ----------------------------------------------------------------


def test_lora_strengths_parallel_and_exact(pools):
    pytest.importorskip("peft")
    strengths = [0.1 * i for i in range(1, 13)]
    for res in pools(2).run("tests.tasks:lora_sweep", strengths=strengths):
        assert max(res["diffs"]) <= 1e-5, res
        assert min(res["collectives"]) > 0, res  # never a call Dynamo ran eagerly
        assert res["graphs"] == 2, res  # first strength, then the scale becomes a graph input


def test_two_same_class_models_six_sizes(pools):
    sizes = [16, 24, 32, 40, 48, 64]
    for res in pools(2).run("tests.tasks:same_class_sizes", sizes=sizes):
        assert max(res["diffs"]) <= 1e-5, res
        assert min(res["collectives"]) > 0, res


def test_attention_in_disabled_region_warns(pools):
    for res in pools(2).run("tests.tasks:attention_in_disabled_region", strict=False):
        assert res["max_abs"] <= 1e-5, res
        (msg,) = res["warnings"]
        assert "single_transformer_blocks.1.attn (x1)" in msg and "2 ran context-parallel" in msg
        assert res["later_warnings"] == []


def test_attention_in_disabled_region_strict_raises(pools):
    for res in pools(2).run("tests.tasks:attention_in_disabled_region", strict=True):
        assert res["error"].startswith("UnsupportedPatternError"), res
        assert "single_transformer_blocks.1.attn" in res["error"], res


def test_rank_seeded_inputs_raise_by_default(pools):
    for res in pools(2).run("tests.tasks:rank_seeded_inputs"):
        assert res.startswith("RankDivergenceError") and "hidden_states" in res, res


@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_cache_dit_same_image_as_single_process(pools, mode):
    """cache-dit's DBCache on a parallelized FluxPipeline (2 double + 4 single blocks): its block
    loop is traced by Dynamo (only its bookkeeping is compiler-disabled), so all 6 attentions of the
    first step run parallel; "blocks" parallelizes each block instead (also exact)."""
    pytest.importorskip("cache_dit")
    for res in pools(2).run("tests.tasks:cache_dit_pipeline", mode=mode):
        assert res["cache_effect"] > 1e-3, res  # the cache did change the image...
        assert res["max_abs"] <= 1e-5, res  # ...identically on 2 ranks and in one process
        assert res["warnings"] == [], res
        if mode == "model":
            assert res["first_call"] == (6, 0), res
        else:
            assert res["first_call"] == (1, 0) and res["block_calls"] == [8, 2, 2, 2, 2, 2], res


class _Scaled(torch.nn.Module):
    """A float attribute that only scales (`scale`) and one used to build a tensor (`fill`)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.scale = 0.5
        self.fill = 0.25

    def forward(self, x):
        return self.lin(x) * self.scale + torch.full_like(x, self.fill)


def test_float_attributes_become_inputs_or_specialize():
    """`scale` becomes a 0-d tensor input after its second value (no more recompiles: AOTAutograd
    turns the scalar arithmetic into tensor ops); `fill` builds a tensor, and is specialized (one
    variant per value, as with dynamic=False). Outputs equal eager either way."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch.fx.experimental.dynamic_spec import ShapesSpec

    from cpfx.capture import functionalize

    torch._dynamo.reset()
    m, x, graphs = _Scaled(), torch.randn(2, 4), []

    def backend(gm, example_inputs):
        def fw(g, inputs):
            graphs.append(g)
            return make_boxed_func(g.forward)

        return functionalize(gm, example_inputs, fw)

    compiled = torch._dynamo.optimize(backend, shapes_spec=ShapesSpec())(m)
    with torch.no_grad():
        for s in [0.5, 0.7, 0.9, 1.1, 1.3]:
            m.scale = s
            torch.testing.assert_close(compiled(x), m(x), rtol=0, atol=0)
        assert len(graphs) == 2
        scalar_reads = {"_local_scalar_dense", "item"}
        assert not any(str(n.target).split(".")[-2:-1] == ["_local_scalar_dense"]
                       or n.target in scalar_reads for n in graphs[1].graph.nodes)
        for f in [0.1, 0.2, 0.3]:
            m.fill = f
            torch.testing.assert_close(compiled(x), m(x), rtol=0, atol=0)
    assert len(graphs) == 5, len(graphs)  # + one per fill value
