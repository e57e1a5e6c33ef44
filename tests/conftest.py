from __future__ import annotations

import pytest

from cpfx.testing.launch import Pool

_pools: dict[int, Pool] = {}


def pool(world: int) -> Pool:
    """The session's persistent pool of `world` gloo ranks (started on first use)."""
    p = _pools.get(world)
    if p is None or not p.alive:
        p = _pools[world] = Pool(world)
    return p


@pytest.fixture(scope="session")
def pools():
    yield pool
    for p in _pools.values():
        p.close()


def pytest_collection_modifyitems(config, items):
    """Tiers: `gpu` (skipped without CUDA), `ranks` (real gloo processes: every test using the
    `pools` fixture, or marked), `graph` (everything else: one process, seconds)."""
    import torch

    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            if not torch.cuda.is_available():
                item.add_marker(skip)
        elif "pools" in getattr(item, "fixturenames", ()) or "ranks" in item.keywords:
            item.add_marker(pytest.mark.ranks)
        else:
            item.add_marker(pytest.mark.graph)
