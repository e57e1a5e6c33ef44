"""`ParallelConfig(regional=True)`: one graph per repeated block class, exact on real ranks."""

from __future__ import annotations

import pytest

import cpfx

CASES = {
    # model, builder kwargs, block classes
    "flux": ({"layers": 3, "single": 3}, 2),
    "qwen": ({"layers": 3}, 1),
    "wan": ({"layers": 3}, 1),
}


@pytest.mark.ranks
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("model", sorted(CASES))
def test_regional_parity_one_graph_per_block_class(pools, model, world):
    kwargs, classes = CASES[model]
    for r, res in enumerate(pools(world).run("tests.tasks:regional", model=model,
                                             model_kwargs=kwargs)):
        assert res["max_abs"] <= 1e-5, f"rank {r}: {res}"
        assert res["graphs"] == classes, res["reasons"]  # every instance of a class reuses one graph
        assert res["runs"] == 2 * res["blocks"], res  # two calls, every block in a cpfx graph
        assert res["parallel"] >= res["blocks"] and res["outside"] == 0, res


@pytest.mark.graph
def test_regional_needs_repeated_blocks():
    import torch

    from cpfx.explain import fake_world

    class Plain(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    with fake_world(2):
        with pytest.raises(cpfx.ConfigError, match="_repeated_blocks"):
            cpfx.parallelize(Plain(), None, cpfx.ParallelConfig(regional=True))
