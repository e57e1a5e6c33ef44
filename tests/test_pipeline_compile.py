"""A real diffusers pipeline with a parallelized transformer; inductor and the named backend."""

from __future__ import annotations

import pytest


def test_flux_pipeline_same_image_on_every_rank(pools):
    res = pools(2).run("tests.tasks:flux_pipeline", steps=3)
    for r in res:
        assert r["calls"] >= 2  # the parallel graph really ran
        assert r["max_abs"] <= 1e-5, r
        assert r["across_ranks"] == 0.0, r


@pytest.mark.parametrize(
    "mode, mesh_name", [("inductor", "ulysses"), ("inductor", "ring"), ("backend_name", "ulysses")]
)
def test_compiled_matches_eager(pools, mode, mesh_name):
    res = pools(2).run("tests.tasks:compiled", mode=mode, mesh_name=mesh_name)
    for r in res:
        assert r["lowered"] >= 2
        assert r["vs_eager"] <= 1e-5 and r["max_abs"] <= 1e-5, r
