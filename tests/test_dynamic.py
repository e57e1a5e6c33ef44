"""`ParallelConfig(dynamic=True)`: sizes captured symbolically, a static rewritten graph per set
of sizes (`cpfx.dynamic`), exact at every resolution on real ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import cpfx
from cpfx import dynamic
from cpfx.testing.parity import first_output, fresh, make_mesh
from cpfx.testing.tiny import build

NEW_SIZES = "new sizes"

# family, builder kwargs of the model, the resolutions in call order (several dims change)
CASES: dict[str, tuple[dict[str, int], list[dict[str, int]]]] = {
    "flux": ({"layers": 2, "single": 2}, [{"img": 100}, {"img": 36}, {"img": 81, "txt": 7}]),
    "wan": ({"layers": 2}, [{}, {"frames": 3}, {"h": 6, "w": 10}]),
    "cogvideox": ({"layers": 2}, [{}, {"frames": 3}, {"h": 8, "w": 12, "frames": 1}]),
    "qwen": ({"layers": 2}, [{}, {"h": 12, "w": 6}, {"txt": 5}]),
}


def dynamic_sizes(model: str, regional: bool) -> dict[str, Any]:
    """One parallelized model at several resolutions, each called three times, vs the single
    process; how many graphs Dynamo captured after the first resolution and in all."""
    model_kwargs, sizes = CASES[model]
    fresh()
    m, _ = build(model, **model_kwargs)
    cases = []
    with torch.no_grad():
        for s in sizes:
            kw = build(model, **model_kwargs, **s)[1]
            cases.append((kw, first_output(m(**kw))[0]))
        # Flux also under the verifier: each variant's first call checked op by op
        cfg = cpfx.ParallelConfig(regional=regional, dynamic=True, verify=model == "flux")
        cpfx.parallelize(m, make_mesh(), cfg)
        diffs, captured = [], []
        for kw, ref in cases:
            for _ in range(3):
                diffs.append((first_output(m(**kw))[0] - ref).abs().max().item())
            captured.append(sum(1 for g in m._cpfx.graphs if NEW_SIZES not in (g.reason or "")))
    graphs = m._cpfx.graphs
    return {
        "max_abs": max(diffs),
        "captured": captured,
        "variants": sum(1 for g in graphs if NEW_SIZES in (g.reason or "")),
        "outside": sum(r.outside_total for r in m._cpfx.reports),
    }


@pytest.mark.ranks
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("regional", [True, False], ids=["regional", "whole"])
@pytest.mark.parametrize("model", sorted(CASES))
def test_every_resolution_exact_without_a_new_capture(pools, model, regional, world):
    for r, res in enumerate(pools(world).run(dynamic_sizes, model=model, regional=regional)):
        assert res["max_abs"] <= 1e-5, f"rank {r}: {res}"
        assert res["outside"] == 0, res
        if regional or model in ("flux", "wan"):
            # later resolutions are static variants of the graphs the first one captured (the
            # whole-model graphs of Qwen and CogVideoX compute from Python ints of the sizes,
            # `img_shapes` and the positional table's size: Dynamo guards on them, recaptures)
            assert res["variants"] >= len(CASES[model][1]) - 1, res
        if model == "flux":
            # no size of Flux's inputs meets a weight, and no shard is one token long (N=3: txt
            # 7 splits 3+2+2; a length-one dim would stay static, as Dynamo's rule has it)
            assert res["captured"][-1] == res["captured"][0], res


def sweep_sizes(regional: bool, cap: int, sizes: list[int]) -> dict[str, Any]:
    """A user sweeping resolutions with `dynamic=True` and `max_recompiles=cap`: every output vs
    the single process, and the graphs held after each call."""
    import gc

    fresh()
    m, _ = build("flux", layers=1, single=1)
    refs = {}
    with torch.no_grad():
        for img in sorted(set(sizes)):
            kw = build("flux", layers=1, single=1, img=img)[1]
            refs[img] = (kw, first_output(m(**kw))[0])
        cfg = cpfx.ParallelConfig(regional=regional, dynamic=True, max_recompiles=cap)
        cpfx.parallelize(m, make_mesh(), cfg)
        diffs, held = [], []
        for img in sizes:
            kw, ref = refs[img]
            diffs.append((first_output(m(**kw))[0] - ref).abs().max().item())
            gc.collect()
            held.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.fx.GraphModule)))
        report = cpfx.diagnose(m)
    return {"max_abs": max(diffs), "held": held, "kept": report.kept,
            "evicted": cpfx.counters["dynamic"]["evicted"], "text": str(report).splitlines()[0]}


@pytest.mark.ranks
@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_twenty_resolutions_memory_flat_after_the_cap(pools, regional):
    """Variants are kept least recently used first, `max_recompiles` per symbolic graph: 20
    resolutions (then the first again, evicted by then) stay exact, and the graphs the process
    holds stop growing once the cap is reached (they grew with every resolution)."""
    sizes = [36 + 4 * i for i in range(20)] + [36]
    for res in pools(2).run(sweep_sizes, regional=regional, cap=3, sizes=sizes):
        assert res["max_abs"] <= 1e-5, res
        assert res["evicted"] > 0 and "kept" in res["text"], res
        held = res["held"]
        assert max(held[6:]) <= max(held[:6]), held  # flat after the cap


def dynamic_training(regional: bool) -> dict[str, Any]:
    """Gradients of every parameter at three resolutions (train mode), vs the single process."""
    import copy

    fresh()
    m, _ = build("flux", layers=1, single=1)
    m.train()
    ref_m = copy.deepcopy(m)
    cpfx.parallelize(m, make_mesh(), cpfx.ParallelConfig(regional=regional, dynamic=True))
    worst = 0.0
    for img in (100, 36, 100):
        kw = build("flux", layers=1, single=1, img=img)[1]
        grads = []
        for mod in (ref_m, m):
            mod.zero_grad(set_to_none=True)
            out = first_output(mod(**kw))[0]
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(img))
            (out * w).sum().backward()
            grads.append({n: p.grad for n, p in mod.named_parameters()})
        for n, ref in grads[0].items():
            err = (grads[1][n] - ref).abs().max() / max(1.0, ref.abs().max().item())
            worst = max(worst, err.item())
    return {"max_rel": worst, "retraced": cpfx.counters["dynamic"]["retraced"]}


@pytest.mark.ranks
@pytest.mark.parametrize("regional", [True, False], ids=["regional", "whole"])
def test_gradients_at_every_resolution(pools, regional):
    """Grad mode re-traces the symbolic capture with AOTAutograd per set of sizes (the backward
    is derived from the rewritten forward): exact, and still no new Dynamo capture."""
    for res in pools(2).run(dynamic_training, regional=regional):
        assert res["max_rel"] <= 1e-5 and res["retraced"] >= 2, res


def backend_sizes() -> dict[str, Any]:
    """`torch.compile(model, backend="cpfx")` at three resolutions: Dynamo's own automatic
    dynamic shapes recapture once, symbolically, at the second; the third is a variant."""
    fresh()
    m, _ = build("flux", layers=1, single=1)
    compiled = torch.compile(m, backend="cpfx")
    diffs = []
    with torch.no_grad():
        for img in (100, 36, 144):
            kw = build("flux", layers=1, single=1, img=img)[1]
            diffs.append((compiled(**kw)[0] - m(**kw)[0]).abs().max().item())
    return {"max_abs": max(diffs), "variants": cpfx.counters["dynamic"]["variants"]}


@pytest.mark.ranks
def test_backend_with_dynamos_automatic_dynamic_shapes(pools):
    for res in pools(2).run(backend_sizes):
        assert res["max_abs"] <= 1e-5 and res["variants"] == 2, res


def not_specializable() -> dict[str, Any]:
    """A graph whose sizes cannot be evaluated from its inputs (forced here) is re-traced by
    AOTAutograd per set of sizes instead: no new Dynamo capture, still exact."""
    fresh()
    m, _ = build("flux", layers=1, single=1)
    refs = []
    with torch.no_grad():
        for img in (100, 36):
            kw = build("flux", layers=1, single=1, img=img)[1]
            refs.append((kw, m(**kw)[0]))

    def refuse(gm, values):
        raise dynamic.NotSpecializable("forced by the test")

    real, dynamic.specialize = dynamic.specialize, refuse
    try:
        cpfx.parallelize(m, make_mesh(), cpfx.ParallelConfig(dynamic=True))
        with torch.no_grad():
            diffs = [(m(**kw)[0] - ref).abs().max().item() for kw, ref in refs]
    finally:
        dynamic.specialize = real
    captured = sum(1 for g in m._cpfx.graphs if NEW_SIZES not in (g.reason or ""))
    return {"max_abs": max(diffs), "retraced": cpfx.counters["dynamic"]["retraced"],
            "captured": captured}


@pytest.mark.ranks
def test_sizes_not_specializable_retrace_per_size(pools):
    for res in pools(2).run(not_specializable):
        assert res["max_abs"] <= 1e-5 and res["retraced"] == 2 and res["captured"] == 1, res


# --- one process -------------------------------------------------------------------------------


def _symbolic(fn: Any, *args: Any) -> torch.fx.GraphModule:
    return make_fx(fn, tracing_mode="symbolic")(*args)


def _values(gm: torch.fx.GraphModule, args: list[Any]) -> dict[Any, int]:
    fakes = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    return dynamic.bind(fakes, args)


@pytest.mark.graph
def test_specialize_evaluates_every_size_expression():
    def f(x, y):
        z = torch.cat([x, y], 1)  # [B, S + T, D]
        h = z.reshape(z.shape[0], z.shape[1], 2, z.shape[2] // 2)
        return h.transpose(1, 2).reshape(z.shape[0] * 2, -1).sum(0) + z.shape[1]

    x, y = torch.randn(2, 6, 8), torch.randn(2, 3, 8)
    gm = _symbolic(f, x, y)
    assert dynamic.is_symbolic([n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"])
    for sizes in ((6, 3), (11, 1), (4, 7)):
        args = [torch.randn(2, sizes[0], 8), torch.randn(2, sizes[1], 8)]
        spec = dynamic.specialize(gm, _values(gm, args))
        assert not any(n.op == "call_function" and "sym" in str(n.target)
                       for n in spec.graph.nodes), spec.code
        torch.testing.assert_close(spec(*args), f(*args), rtol=0, atol=0)


@pytest.mark.graph
def test_sizes_bound_twice_must_agree():
    """Traced with equal lengths, the two inputs share one symbol (Dynamo guards that they stay
    equal); arguments where they differ are refused, not specialized from one of them."""

    def f(x, rope):
        return x + rope[: x.shape[1]]

    gm = _symbolic(f, torch.randn(1, 6, 4), torch.randn(6, 4))
    fakes = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    same = [torch.randn(1, 5, 4), torch.randn(5, 4)]
    values = dynamic.bind(fakes, same)
    dynamic.check_bound(fakes, same, values)
    torch.testing.assert_close(dynamic.specialize(gm, values)(*same), f(*same))
    differ = [torch.randn(1, 5, 4), torch.randn(9, 4)]
    with pytest.raises(dynamic.NotSpecializable, match="got"):
        dynamic.check_bound(fakes, differ, dynamic.bind(fakes, differ))


@pytest.mark.graph
def test_data_dependent_sizes_are_not_specializable():
    def f(x):
        return x.nonzero()

    gm = _symbolic(f, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(dynamic.NotSpecializable):
        fakes = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
        args = [torch.tensor([1.0, 0.0])]
        dynamic.specialize(gm, dynamic.bind(fakes, args))


@pytest.mark.graph
def test_mark_sizes_marks_every_long_dim_of_non_parameters():
    x, w = torch.randn(1, 5, 3), torch.nn.Parameter(torch.randn(4, 4))
    dynamic.mark_sizes({"x": x, "w": [w]})
    assert getattr(x, "_dynamo_weak_dynamic_indices", set()) == {1, 2}
    assert not hasattr(w, "_dynamo_weak_dynamic_indices")
