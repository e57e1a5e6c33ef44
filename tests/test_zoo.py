"""The fast subset of the diffusers sweep (`benchmarks/zoo.py`): models nobody tuned cpfx for,
with inputs unlike their configs' defaults (batch 2, padded masks, odd lengths, other frame
counts), each exact AND parallel (some attention runs on this rank's queries only)."""

from __future__ import annotations

import pytest

from cpfx.testing import zoo
from cpfx.testing.parity import compare, fresh

TOL = 1e-5


def parity(case: str, names: tuple[str, ...] = ("ulysses",)) -> dict:
    """On every rank: single-process outputs vs cpfx outputs of the same weights."""
    fresh()
    model, kwargs = zoo.build(case)
    res = compare(model, kwargs, mesh_names=names, outputs=zoo.outputs)
    st = res["counters"].get("shard_tokens", {})
    parallel = st.get("attention_sharded", 0) + st.get("attention_local", 0)
    return {"rel": res["rel_max"], "parallel": parallel}


@pytest.mark.parametrize("case", zoo.FAST)
def test_fast_case_exact_and_parallel(pools, case):
    for r, res in enumerate(pools(2).run(parity, case=case)):
        assert res["rel"] <= TOL, f"rank {r}: {res['rel']:.3g}"
        assert res["parallel"] > 0, "no attention ran parallel"


@pytest.mark.parametrize("case", ["cogvideox", "ace_step", "joyimage_edit_plus"])
def test_fast_case_ring_three_ranks(pools, case):
    for res in pools(3).run(parity, case=case, names=("ring",)):
        assert res["rel"] <= TOL and res["parallel"] > 0, res
