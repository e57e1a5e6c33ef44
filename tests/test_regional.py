"""`ParallelConfig(regional=True)`: one graph per repeated block class, exact on real ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import cpfx
from cpfx.testing.parity import first_output, fresh, make_mesh
from cpfx.testing.tiny import build

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
    for r, res in enumerate(pools(world).run(regional, model=model, model_kwargs=kwargs)):
        assert res["max_abs"] <= 1e-5, f"rank {r}: {res}"
        # every instance of a class reuses one graph
        assert res["graphs"] == classes, res["reasons"]
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


# --- the task every rank of the pool runs -----------------------------------------------------


def regional(
    model: str, model_kwargs: dict[str, Any] | None = None, calls: int = 2
) -> dict[str, Any]:
    """`ParallelConfig(regional=True)`: parity with the single process, the graphs compiled (one
    per block class expected) and what the observed call's attentions ran as."""
    import cpfx

    fresh()
    m, kw = build(model, **(model_kwargs or {}))
    with torch.no_grad():
        ref = first_output(m(**kw))[0].float()
    mesh = make_mesh()
    cpfx.parallelize(m, mesh, cpfx.ParallelConfig(regional=True))
    diffs = []
    with torch.no_grad():
        for _ in range(calls):
            diffs.append((first_output(m(**kw))[0].float() - ref).abs().max().item())
    rt = m._cpfx
    (report,) = rt.reports
    return {
        "max_abs": max(diffs),
        "graphs": len(rt.graphs),
        "blocks": sum(1 for b in m.modules() if type(b).__name__ in m._repeated_blocks),
        "parallel": report.parallel,
        "outside": report.outside_total,
        "runs": sum(g.runs for g in rt.graphs),
        "reasons": rt.recompile_reasons,
    }
