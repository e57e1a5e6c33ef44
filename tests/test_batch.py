"""A `batch` mesh dim: the rows of a call's batch split across ranks, planned over the same graph
as the token sequence (seeds at attention's batch dim instead of its sequence dim, the same rules,
the same applier), attention local on each rank's rows, the output gathered."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import cpfx
from cpfx.testing import zoo
from cpfx.testing.parity import compare, fresh, make_mesh
from cpfx.testing.tiny import build
from tests.graphs import fake_world

TOL = 1e-5


# --- one process -------------------------------------------------------------------------------


def _aten_graph(fn: Any, *args: torch.Tensor) -> torch.fx.Graph:
    """The functional ATen graph of `fn` as cpfx plans on it (Dynamo, then `cpfx.capture`)."""
    from torch._functorch.aot_autograd import make_boxed_func

    from cpfx.capture import functionalize

    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        return functionalize(gm, example_inputs, keep)

    torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args)
    return graphs[-1].graph


def _self_and_cross(x: torch.Tensor, text: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[B, S, 8] -> two heads of 4; self-attention, then cross-attention to `text`."""
    q = F.linear(x, w).view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)
    h = F.scaled_dot_product_attention(q, q, q)
    kv = text.view(text.shape[0], text.shape[1], 2, 4).transpose(1, 2)
    return F.scaled_dot_product_attention(h, kv, kv)


@pytest.mark.parametrize("split, dims", [("batch", {0}), ("tokens", {1})])
def test_seeds_are_where_attention_batch_or_sequence_starts(split, dims):
    """`find_seeds` on a five-line graph: with the batch split, both the latents and the text
    are seeded at their batch dim (keys and queries always share their rows); with the sequence
    split, only the latents at their token dim (the text keys are another sequence)."""
    from cpfx.sharding.plan import find_seeds

    g = _aten_graph(_self_and_cross, torch.randn(2, 6, 8), torch.randn(2, 5, 8), torch.randn(8, 8))
    seeds, sdpas, short = find_seeds(g, 2, split)
    by_shape = {tuple(n.meta["val"].shape): n for n in g.nodes if n.op == "placeholder"}
    x, text = by_shape[(2, 6, 8)], by_shape[(2, 5, 8)]
    assert len(sdpas) == 2 and not short
    assert set(seeds.values()) == dims
    assert x in seeds and (text in seeds) == (split == "batch"), seeds


def _scaled_rows(x: torch.Tensor) -> torch.Tensor:
    q = x * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # a constant with one value per row
    return F.scaled_dot_product_attention(q, q, q)


def test_a_constant_is_never_a_seed():
    """A constant holding one value per batch row is sliced where it is read, never seeded (its
    real value cannot be propagated as a fake: Chroma's batch plan failed on one)."""
    from cpfx.sharding.plan import find_seeds

    g = _aten_graph(_scaled_rows, torch.randn(2, 2, 6, 4))
    seeds, _, _ = find_seeds(g, 2, "batch")
    assert seeds and all(n.op == "placeholder" for n in seeds), seeds
    assert any(n.op == "get_attr" for n in g.nodes)  # the constant is in the graph


def test_batch_one_row_is_short():
    from cpfx.sharding.plan import find_seeds

    g = _aten_graph(_self_and_cross, torch.randn(1, 6, 8), torch.randn(1, 5, 8), torch.randn(8, 8))
    seeds, sdpas, short = find_seeds(g, 2, "batch")
    assert seeds == {} and set(short) == set(sdpas)


def test_batch_is_not_yet_combined_with_sequence_dims():
    with fake_world(4):
        mesh = make_mesh((2, 2), ("batch", "ulysses"))
        with pytest.raises(cpfx.ConfigError, match="'batch' mesh dim is not yet combined"):
            cpfx.parallelize(build("flux")[0], mesh)


def test_batch_mesh_info():
    from cpfx.mesh import mesh_info

    with fake_world(4, rank=3):
        info = mesh_info(make_mesh((2, 2), ("dp", "batch")), cpfx.ParallelConfig())
    assert (info.split, info.world, info.cp_rank, info.dp_index) == ("batch", 2, 1, 1)
    assert (info.ulysses, info.ring) == (1, 1)  # no attention collective


# --- gloo ranks ----------------------------------------------------------------------------------

CASES = ["flux", "flux2", "qwenimage", "wan", "hunyuan_video", "ltx", "sd3", "cogvideox"]


@pytest.mark.parametrize("case", CASES)
def test_batch_two_exact_and_half_the_flops(pools, case):
    """Each rank runs its row of a batch of 2: exact, attention local, matmul and attention
    FLOPs per rank half of one process's, one gather and no other collective."""
    for r, res in enumerate(pools(2).run(zoo_batch, case=case)):
        assert res["rel"] <= TOL, f"rank {r}: {res['rel']:.3g}"
        assert res["counters"]["attention_local"] > 0 and "attention_sharded" not in res["counters"]
        assert res["flops_ratio"] <= 0.55, res["flops_ratio"]
        assert res["collectives"] and all("all_gather" in c for c in res["collectives"]), res


def test_batch_three_on_two_ranks_uneven_exact(pools):
    for res in pools(2).run(tiny_batch, model="flux", batch=3):
        assert res["max_abs"] <= TOL and res["shape"][0] == 3, res


def test_batch_smaller_than_the_mesh_refused_on_every_rank(pools):
    for res in pools(2).run(tiny_batch, model="flux", batch=1):
        assert res.startswith("ConfigError") and "batch of 1" in res, res


@pytest.mark.parametrize(
    "config", [{"regional": True}, {"dynamic": True}, {"regional": True, "dynamic": True}],
    ids=["regional", "dynamic", "regional-dynamic"],
)
def test_batch_with_regional_and_dynamic(pools, config):
    for res in pools(2).run(tiny_batch, model="flux", batch=2, config=config, calls=3):
        assert res["max_abs"] <= TOL, res


def test_batch_gradients(pools):
    from tests.test_training import check, train_grads

    check(pools(2).run(train_grads, model="flux", mesh_names=("batch",), batch2=True))


# --- tasks run by every rank of a gloo pool ------------------------------------------------------


def zoo_batch(case: str) -> dict[str, Any]:
    from cpfx.measure import graph_flops, model_flops

    fresh()
    model, kwargs = zoo.build(case)
    single = model_flops(model, kwargs)
    fresh()
    res = compare(model, kwargs, mesh_names=("batch",), outputs=zoo.outputs)
    records = [g for g in model._cpfx.graphs if g.gm is not None]
    return {
        "rel": res["rel_max"],
        "counters": res["counters"].get("shard_tokens", {}),
        "flops_ratio": sum(graph_flops(g.gm) for g in records) / single,
        "collectives": [c for g in records for c in g.collectives],
    }


def tiny_batch(
    model: str, batch: int, config: dict[str, Any] | None = None, calls: int = 1
) -> dict[str, Any] | str:
    """A tiny family with every per-sample input given `batch` different rows."""
    fresh()
    m, kw = build(model)
    for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"):
        x = kw[k]
        kw[k] = torch.cat([x * (1 + 0.1 * i) + 0.01 * i for i in range(batch)])
    try:
        res = compare(m, kw, mesh_names=("batch",), config=config, calls=calls)
    except cpfx.CpfxError as e:
        return f"{type(e).__name__}: {e}"
    assert dist.get_world_size() == 2
    return {"max_abs": res["max_abs"], "shape": res["shape"]}
