"""Every seed model family: real diffusers classes, tiny random configs, real gloo ranks.

Ulysses N=2, ring N=2 (p2p), USP 2x2 (allgather ring), and N=3, where every default size here
(64/128 image tokens, 8 text tokens) splits unevenly. fp32 max abs difference <= 1e-5.
"""

from __future__ import annotations

import pytest

from cpfx.testing.parity import parity
from cpfx.testing.tiny import EXTRA
from tests.test_parity import check

MODELS = EXTRA
CASES = {
    "ulysses2": dict(world=2),
    "ring2": dict(world=2, mesh_names=("ring",), config={"ring_rotate": "p2p"}),
    "usp2x2": dict(
        world=4,
        mesh_shape=(2, 2),
        mesh_names=("ring", "ulysses"),
        config={"ring_rotate": "allgather"},
    ),
    "uneven3": dict(world=3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model", MODELS)
def test_model(pools, model, case):
    kw = dict(CASES[case])
    world = kw.pop("world")
    res = check(pools(world).run(parity, model=model, **kw))
    assert res["counters"]["shard_tokens"]["attention_sharded"] >= 1
