"""Exact gradients through a parallelized model (train mode, grad enabled) on real gloo ranks:
every parameter's gradient on every rank vs the single process, same weights, same loss."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ranks

TOL = 1e-5  # relative to max(1, max |grad|) of each parameter


def check(results):
    for r, res in enumerate(results):
        assert not res["missing"], f"rank {r}: no gradient for {res['missing'][:3]}"
        top = sorted(res["errors"].items(), key=lambda kv: -kv[1])
        assert res["max_rel"] <= TOL, f"rank {r}: {top[:8]} ... {top[-3:]}"
        assert res["params"] > 10
    return results[0]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("model", ["flux", "qwen", "wan"])
def test_ulysses_gradients(pools, model, world):
    res = check(pools(world).run("tests.tasks:train_grads", model=model))
    assert res["counters"]["lower_attention"]["ulysses"] >= 2
    assert res["counters"]["shard_tokens"]["grad_sum"] > 0


def test_input_gradient_batch_two_odd_lengths(pools):
    check(pools(3).run("tests.tasks:train_grads", model="flux", input_grad=True, batch2=True,
                       model_kwargs={"img": 62, "txt": 7}))


def test_ring_refused_in_training(pools):
    with pytest.raises(RuntimeError, match="CpfxError.*ring attention"):
        pools(2).run("tests.tasks:train_grads", model="flux", mesh_names=("ring",))
