"""No silent fallback at run time (issue 15): recompile limits, attention outside cpfx's graphs,
grad mode, rank-dependent inputs, masked errors; plus the config and runtime units they use."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist

import cpfx
from cpfx.testing.parity import divergence, fresh, make_mesh, parity
from cpfx.testing.tiny import build, flux_images, flux_pipeline
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
    assert cpfx.ParallelConfig().check_inputs == "always"
    with pytest.warns(DeprecationWarning, match="check_inputs='always'"):
        assert cpfx.ParallelConfig(check_inputs=True).check_inputs == "always"
    with pytest.warns(DeprecationWarning):
        assert cpfx.ParallelConfig(check_inputs=False).check_inputs == "never"


# --- one process, fake group --------------------------------------------------------------------


def test_grad_mode_refused_where_gradients_are_not_exact():
    """Gradients are exact in eager execution without FP8 (tests/test_training.py); FP8 payloads in
    grad mode are refused before any work, naming why and what to do."""
    m, kw = build("flux")
    with fake_world(2):
        cfg = cpfx.ParallelConfig(check_collectives=False, fp8_comm=True)
        cpfx.parallelize(m, _mesh(), cfg)
        with pytest.raises(cpfx.CpfxError, match=r"fp8_comm=True.*torch.no_grad\(\)"):
            m(**kw)  # parameters require grad, grad mode on
        assert not m._cpfx.graphs
        with torch.inference_mode():
            m(**kw)
        m.requires_grad_(False)
        m(**kw)  # frozen: nothing requires grad
        kw = {**kw, "hidden_states": kw["hidden_states"].clone().requires_grad_()}
        with pytest.raises(cpfx.CpfxError, match="fp8_comm=True"):
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


def test_recompile_reason_names_the_model_forward_not_diffusers_decorator():
    """Flux's forward is wrapped by diffusers' `apply_lora_scale` (peft_utils.py), the frame Dynamo
    compiles: reasons named `wrapper (peft_utils.py:300)` for a model without LoRA."""
    import inspect

    from diffusers.models.transformers import transformer_flux

    torch._dynamo.reset()
    m, kw = build("flux")
    code = inspect.unwrap(type(m).forward).__code__
    assert code.co_filename == transformer_flux.__file__
    site = f"in FluxTransformer2DModel.forward (transformer_flux.py:{code.co_firstlineno})"
    with fake_world(2), torch.no_grad():
        cfg = cpfx.ParallelConfig(max_recompiles=2, check_collectives=False)
        cpfx.parallelize(m, _mesh(), cfg)
        m(**kw)
        m(**build("flux", img=32)[1])
        reason = cpfx.diagnose(m).graphs[1].recompile_reason
        with pytest.raises(cpfx.RecompileLimitError) as info:
            m(**build("flux", img=48)[1])
    for text in (reason, str(info.value)):
        assert site in text and "peft_utils" not in text, text
        assert "tensor 'kwargs['hidden_states']' size mismatch at index 1" in text, text


@pytest.mark.graph
def test_hook_added_after_the_first_call_is_compiled_in():
    """Dynamo skips guards on module hooks by default; cpfx's calls guard them, so a hook added
    later recompiles instead of being ignored."""
    torch._dynamo.reset()
    m, kw = build("flux_block")
    with fake_world(2), torch.no_grad():
        cpfx.parallelize(m, _mesh(), cpfx.ParallelConfig(check_collectives=False))
        m(**kw)
        m.block.ff.register_forward_hook(lambda mod, args, out: out * 2)
        m(**kw)
    assert len(m._cpfx.graphs) == 2, m._cpfx.recompile_reasons
    assert "_forward_hooks" in m._cpfx.recompile_reasons[-1]


def test_diagnose_names_the_recompile_and_its_reason():
    torch._dynamo.reset()
    m, kw = build("flux")
    with fake_world(2), torch.no_grad():
        cpfx.parallelize(m, _mesh(), cpfx.ParallelConfig(check_collectives=False))
        m(**kw)
        m(**build("flux", img=32)[1])
        d = cpfx.diagnose(m)
    first, second = d.graphs
    assert first.recompile_reason is None, first
    assert "size mismatch" in second.recompile_reason, second
    assert d.recompiles == 1 and "recompiled because: " in str(d)
    assert [s.call for s in d.signatures] == [1, 2]
    # FLOPs per run from each rank graph: the 32-token graph does less work than the 64-token one
    assert 0 < second.flops < first.flops, (first.flops, second.flops)
    weights = sum(p.numel() * p.element_size() for p in m.parameters())
    assert d.parameter_bytes >= weights and "MiB on this rank" in str(d)


def test_attention_counted_once_per_signature_and_strict():
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


def test_misplaced_inputs():
    """Tensor inputs on the meta device, or on another device type than the model's, are named
    (the rule is generic: "cuda" stands for the model's device here, with CPU tensors as the
    misplaced ones); a 0-d CPU tensor goes with any device, as in torch."""
    from cpfx.runtime import misplaced_inputs

    cpu, meta = torch.ones(2, 3), torch.ones(2, 3, device="meta")
    scalar = torch.tensor(1.0)
    assert misplaced_inputs([cpu, 3, None, scalar], "cpu") == []
    assert misplaced_inputs([cpu, meta, "x"], "cpu") == [1]
    assert misplaced_inputs([meta, meta], "meta") == [0, 1]  # no data, whatever the model's
    assert misplaced_inputs([cpu, scalar, torch.ones(1)], "cuda") == [0, 2]
    assert misplaced_inputs([scalar, cpu, meta], None) == [2]  # no model device: the first's


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


@pytest.mark.parametrize("numel", [5, 4096, (1 << 16) + 3, 3 * (1 << 16)])
def test_input_digest_is_the_mix_of_every_word_whatever_the_chunking(numel):
    """The chunked in-place digest (large inputs), the one-pass digest of small inputs and the
    definition (`_mix` of every word and its position, summed) agree, across chunk edges."""
    from cpfx.rankcheck import _mix, _small_digests, _words, tensor_digest

    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    w = _words(x)
    a, b = _mix(w, torch.arange(w.numel(), dtype=torch.int64))
    want = torch.stack([a.sum(), b.sum()])
    assert torch.equal(tensor_digest(x), want)
    assert torch.equal(_small_digests([(0, x)], 1)[0], want)


def test_take_pieces_accepts_no_pieces():
    from cpfx.sharding.placement import take_pieces

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
        dirs = sorted((p.name for p in root.iterdir()), key=lambda d: int(d.rsplit("-", 1)[1]))
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
    res = pools(1).run(parity, model="flux")
    assert res[0]["max_abs"] == 0.0, res
    assert res[0]["counters"] == {}  # no rewrite at all


# --- real gloo ranks (issue 15) ----------------------------------------------------------------


def test_lora_strengths_parallel_and_exact(pools):
    pytest.importorskip("peft")
    strengths = [0.1 * i for i in range(1, 13)]
    for res in pools(2).run(lora_sweep, strengths=strengths):
        assert max(res["diffs"]) <= 1e-5, res
        assert min(res["collectives"]) > 0, res  # never a call Dynamo ran eagerly
        assert res["graphs"] == 2, res  # first strength, then the scale becomes a graph input


def test_two_same_class_models_six_sizes(pools):
    sizes = [16, 24, 32, 40, 48, 64]
    for res in pools(2).run(same_class_sizes, sizes=sizes):
        assert max(res["diffs"]) <= 1e-5, res
        assert min(res["collectives"]) > 0, res


def test_attention_in_disabled_region_warns(pools):
    for res in pools(2).run(attention_in_disabled_region, strict=False):
        assert res["max_abs"] <= 1e-5, res
        (msg,) = res["warnings"]
        assert "single_transformer_blocks.1.attn (x1)" in msg and "2 ran context-parallel" in msg
        assert res["later_warnings"] == []


def test_attention_in_disabled_region_strict_raises(pools):
    for res in pools(2).run(attention_in_disabled_region, strict=True):
        assert res["error"].startswith("UnsupportedPatternError"), res
        assert "single_transformer_blocks.1.attn" in res["error"], res


def test_rank_seeded_inputs_raise_by_default(pools):
    for res in pools(2).run(rank_seeded_inputs):
        assert res.startswith("RankDivergenceError") and "hidden_states" in res, res


@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_cache_dit_same_image_as_single_process(pools, mode):
    """cache-dit's DBCache on a parallelized FluxPipeline (2 double + 4 single blocks): its block
    loop is traced by Dynamo (only its bookkeeping is compiler-disabled), so all 6 attentions of the
    first step run parallel; "blocks" parallelizes each block instead (also exact)."""
    pytest.importorskip("cache_dit")
    for res in pools(2).run(cache_dit_pipeline, mode=mode):
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


# --- tasks run by every rank of a gloo pool --------------------------------------------------


def _call_counting_collectives(m: torch.nn.Module, kw: dict[str, Any]) -> tuple[Any, int]:
    """`m(**kw)` and the number of collectives it issued (0 if Dynamo ran it eagerly)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        @classmethod
        def ignore_compile_internals(cls) -> bool:
            return True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            ns = func.namespace
            if (ns == "_c10d_functional" and "wait" not in func.__name__) or ns == "cpfx":
                self.n += 1
            return func(*args, **(kwargs or {}))

    with Count() as c:
        out = m(**kw)
    return out, c.n


def lora_sweep(strengths: list[float]) -> dict[str, Any]:
    """One LoRA adapter, a different strength each call: exact, and collectives on every call."""
    from peft import LoraConfig

    import cpfx

    fresh()
    m, kw = build("flux")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    m.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), "a"
    )
    refs = []
    with torch.no_grad():
        for s in strengths:
            m.set_adapters(["a"], [s])
            refs.append(m(**kw)[0])
    cpfx.parallelize(m, make_mesh())
    diffs, collectives = [], []
    with torch.no_grad():
        for s, ref in zip(strengths, refs):
            m.set_adapters(["a"], [s])
            out, n = _call_counting_collectives(m, kw)
            diffs.append((out[0] - ref).abs().max().item())
            collectives.append(n)
    return {"diffs": diffs, "collectives": collectives, "graphs": len(m._cpfx["graphs"])}


def same_class_sizes(sizes: list[int]) -> dict[str, Any]:
    """Two models of one class (Wan 2.2's two experts), each called at every size in turn."""
    import cpfx

    fresh()
    models = [build("flux", seed=s)[0] for s in (0, 1)]
    cases = []
    with torch.no_grad():
        for n in sizes:
            for m in models:
                kw = build("flux", img=n)[1]
                cases.append((m, kw, m(**kw)[0]))
    mesh = make_mesh()
    for m in models:
        cpfx.parallelize(m, mesh)
    diffs, collectives = [], []
    with torch.no_grad():
        for m, kw, ref in cases:
            out, n = _call_counting_collectives(m, kw)
            diffs.append((out[0] - ref).abs().max().item())
            collectives.append(n)
    return {"diffs": diffs, "collectives": collectives}


def attention_in_disabled_region(strict: bool) -> dict[str, Any]:
    """A block whose forward is `torch.compiler.disable`d: its attention runs outside cpfx."""
    import warnings

    import cpfx

    fresh()
    m, kw = build("flux", layers=1, single=2)
    with torch.no_grad():
        ref = m(**kw)[0]
    block = m.single_transformer_blocks[1]
    block.forward = torch.compiler.disable(block.forward)
    mesh = make_mesh()
    cpfx.parallelize(m, mesh, cpfx.ParallelConfig(strict=True) if strict else None)
    out: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            out["max_abs"] = (m(**kw)[0] - ref).abs().max().item()
        except cpfx.CpfxError as e:
            out["error"] = f"{type(e).__name__}: {e}"
        first = [str(w.message) for w in caught if issubclass(w.category, cpfx.CpfxWarning)]
        caught.clear()
        if "error" not in out:
            m(**kw)
        later = [str(w.message) for w in caught if issubclass(w.category, cpfx.CpfxWarning)]
    out.update(warnings=first, later_warnings=later)
    return out


def rank_seeded_inputs() -> str:
    """Inputs drawn from a generator seeded with the rank, default config."""
    import cpfx

    fresh()
    m, kw = build("flux", seed=dist.get_rank())
    cpfx.parallelize(m, make_mesh())
    return divergence(m, kw)


def cache_dit_pipeline(mode: str = "model", steps: int = 8) -> dict[str, Any]:
    """A tiny FluxPipeline with cache-dit's DBCache: the same image as the single process with the
    same cache. mode "model": parallelize the transformer, then enable_cache; "blocks":
    enable_cache, then parallelize each transformer block (the blocks the cache runs)."""
    import warnings

    import cache_dit

    import cpfx

    fresh()

    def pipeline() -> Any:
        return flux_pipeline(build("flux", img=64, txt=8, layers=2, single=4)[0])

    def cache(pipe: Any) -> None:
        cfg = cache_dit.DBCacheConfig(
            Fn_compute_blocks=1,
            Bn_compute_blocks=0,
            residual_diff_threshold=0.8,
            max_warmup_steps=2,
        )
        cache_dit.enable_cache(pipe, cache_config=cfg)

    ref_pipe = pipeline()
    cache(ref_pipe)
    ref = flux_images(ref_pipe, steps)
    uncached = flux_images(pipeline(), steps)
    pipe = pipeline()
    mesh = make_mesh()
    t = pipe.transformer
    blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
    if mode == "model":
        cpfx.parallelize(t, mesh)
        cache(pipe)
    else:
        cache(pipe)
        for b in blocks:
            cpfx.parallelize(b, mesh)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = flux_images(pipe, steps)
    reports = t._cpfx.reports if mode == "model" else blocks[0]._cpfx.reports
    return {
        "max_abs": (img - ref).abs().max().item(),
        "cache_effect": (ref - uncached).abs().max().item(),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, cpfx.CpfxWarning)],
        "first_call": (reports[0].parallel, reports[0].outside_total),
        "block_calls": [b._cpfx.calls for b in blocks] if mode == "blocks" else None,
    }
