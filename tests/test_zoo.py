"""The fast subset of the diffusers sweep (`benchmarks/zoo.py`): models nobody tuned cpfx for,
with inputs unlike their configs' defaults (batch 2, padded masks, odd lengths, other frame
counts), each exact AND parallel (some attention runs on this rank's queries only)."""

from __future__ import annotations

import pytest
import torch

from cpfx.testing import zoo

TOL = 1e-5


def parity(case: str, names: tuple[str, ...] = ("ulysses",)) -> dict:
    """On every rank: single-process outputs vs cpfx outputs of the same weights."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import cpfx

    torch._dynamo.reset()
    cpfx.reset_counters()
    model, kwargs = zoo.build(case)
    with torch.no_grad():
        ref = zoo.outputs(model(**kwargs))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=names)
    cpfx.parallelize(model, mesh)
    with torch.no_grad():
        out = zoo.outputs(model(**kwargs))
    rel = [
        ((o - r).abs().max() / max(1.0, r.abs().max().item())).item() for o, r in zip(out, ref)
    ]
    st = cpfx.counters["shard_tokens"]
    return {"rel": max(rel), "parallel": st["attention_sharded"] + st["attention_local"]}


@pytest.mark.parametrize("case", zoo.FAST)
def test_fast_case_exact_and_parallel(pools, case):
    for r, res in enumerate(pools(2).run("tests.test_zoo:parity", case=case)):
        assert res["rel"] <= TOL, f"rank {r}: {res['rel']:.3g}"
        assert res["parallel"] > 0, "no attention ran parallel"


@pytest.mark.parametrize("case", ["cogvideox", "ace_step", "joyimage_edit_plus"])
def test_fast_case_ring_three_ranks(pools, case):
    for res in pools(3).run("tests.test_zoo:parity", case=case, names=("ring",)):
        assert res["rel"] <= TOL and res["parallel"] > 0, res
