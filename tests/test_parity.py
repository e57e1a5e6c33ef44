"""Numerics on real gloo ranks: cpfx output vs the single-process output of the same weights."""

from __future__ import annotations

import pytest

from cpfx.testing.parity import parity

FP32_TOL = 1e-5
MODELS = ["flux", "qwen", "wan"]


def check(results, tol=FP32_TOL):
    for r, res in enumerate(results):
        assert res["max_abs"] <= tol, f"rank {r}: max abs diff {res['max_abs']:.3g} > {tol}"
    return results[0]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("model", MODELS)
def test_ulysses(pools, model, world):
    res = check(pools(world).run(parity, model=model))
    c = res["counters"]
    assert c["lower_attention"]["ulysses"] >= 2
    assert c["shard_tokens"]["attention_sharded"] >= 2


@pytest.mark.parametrize("qkv", ["one", "three"])
@pytest.mark.parametrize("model", MODELS)
def test_ulysses_q_k_v_in_one_or_three_all_to_alls(pools, model, qkv):
    """3 ranks: uneven token counts and heads padded 2 -> 3 (Qwen: a padded text mask)."""
    res = check(pools(3).run(parity, model=model, config={"qkv_all_to_all": qkv}))
    n = res["counters"]["lower_attention"]["ulysses"]
    assert n >= 2
    assert res["counters"].get("attention", {}).get("qkv_one_transfer", 0) == (
        n if qkv == "one" else 0
    )


@pytest.mark.parametrize("rotate", ["allgather", "p2p"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("model", MODELS)
def test_ring(pools, model, world, rotate):
    res = check(
        pools(world).run(parity, model=model, mesh_names=("ring",), config={"ring_rotate": rotate})
    )
    assert res["counters"]["lower_attention"][f"ring_{rotate}"] >= 2


@pytest.mark.parametrize("rotate", ["allgather", "p2p"])
@pytest.mark.parametrize("model", MODELS)
def test_usp_2x2(pools, model, rotate):
    res = check(
        pools(4).run(
            parity,
            model=model,
            mesh_shape=(2, 2),
            mesh_names=("ring", "ulysses"),
            config={"ring_rotate": rotate},
        )
    )
    assert res["counters"]["lower_attention"][f"usp_{rotate}"] >= 2


def test_wan_cross_attention_stays_local(pools):
    res = check(pools(2).run(parity, model="wan"))
    st = res["counters"]["shard_tokens"]
    assert st["attention_local"] == 2 and st["attention_sharded"] == 2


@pytest.mark.parametrize("world", [2, 4])
def test_flux_bf16(pools, world):
    # bf16 carries ~3 significant digits; sharding changes summation order of attention only.
    res = pools(world).run(parity, model="flux", dtype="bfloat16")
    for r in res:
        assert r["rel_l2"] <= 2e-2, r


@pytest.mark.parametrize(
    "world, mesh_names", [(2, ("ulysses",)), (3, ("ulysses",)), (2, ("ring",))]
)
def test_block_with_rope_tables_as_inputs(pools, world, mesh_names):
    res = check(pools(world).run(parity, model="flux_block", mesh_names=mesh_names))
    assert res["counters"]["shard_tokens"]["reslice"] >= 2
    assert sum(res["counters"]["lower_attention"].values()) == 1
