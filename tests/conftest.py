from __future__ import annotations

import pytest

from cpfx.testing.launch import Pool

_pools: dict[int, Pool] = {}

_VERSIONS = ("torch", "diffusers", "transformers", "peft", "cache-dit", "kernels", "triton", "numpy")


def _versions() -> str:
    import importlib.metadata

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    return "cpfx deps: " + ", ".join(f"{n} {version(n)}" for n in _VERSIONS)


def pytest_report_header(config):
    """The versions the run used, so that a failure report carries them."""
    return _versions()


def pytest_terminal_summary(terminalreporter):
    """The same line above the closing counts (the header is hidden under `-q`)."""
    terminalreporter.write_line(_versions())


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
