"""Capture cpfx-rewritten graphs in one process, under torch's fake process group."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from cpfx.testing.tiny import build


@contextlib.contextmanager
def fake_world(world: int, rank: int = 0):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rewrite(
    model: str,
    world: int = 4,
    rank: int = 0,
    mesh_shape: tuple[int, ...] | None = None,
    mesh_names: tuple[str, ...] = ("ulysses",),
    model_kwargs: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    **config: Any,
) -> list[fx.GraphModule]:
    """The final per-rank graphs cpfx produces for a tiny model (not executed numerically).

    Results (and the pass counters they left) are kept for the session: tests read the graphs,
    they must not change them. A `dump_dir` compiles afresh (its files are the point)."""
    import cpfx

    key = repr((model, world, rank, mesh_shape, mesh_names, model_kwargs, dtype, config))
    if "dump_dir" not in config and key in _REWRITES:
        graphs, counts = _REWRITES[key]
        cpfx.reset_counters()
        cpfx.counters.update(copy.deepcopy(counts))
        return graphs
    graphs = _rewrite(model, world, rank, mesh_shape, mesh_names, model_kwargs, dtype, **config)
    _REWRITES[key] = graphs, copy.deepcopy(cpfx.counters)
    return graphs


_REWRITES: dict[str, tuple[list[fx.GraphModule], Any]] = {}


def _rewrite(
    model: str,
    world: int,
    rank: int,
    mesh_shape: tuple[int, ...] | None,
    mesh_names: tuple[str, ...],
    model_kwargs: dict[str, Any] | None,
    dtype: torch.dtype,
    **config: Any,
) -> list[fx.GraphModule]:
    from torch.distributed.device_mesh import init_device_mesh

    import cpfx

    torch._dynamo.reset()
    cpfx.reset_counters()
    m, kw = build(model, dtype=dtype, **(model_kwargs or {}))
    graphs: list[fx.GraphModule] = []
    with fake_world(world, rank):
        mesh = init_device_mesh("cpu", mesh_shape or (world,), mesh_dim_names=mesh_names)
        config.setdefault("check_collectives", False)
        be = cpfx.backend(mesh, cpfx.ParallelConfig(**config))
        # Compile (and run on the fake group, whose values are garbage and not looked at).
        from cpfx.api import unwrap_errors

        with torch.no_grad():
            unwrap_errors(torch.compile(m, backend=be, dynamic=False))(**kw)
        graphs.extend(be.graphs)
    return graphs


def roles(gm: fx.GraphModule, kind: str = "all_to_all") -> list[str]:
    return [
        n.meta.get("cpfx_role") for n in gm.graph.nodes if n.meta.get("cpfx_collective") == kind
    ]


def payload_bytes(gm: fx.GraphModule, kind: str = "all_to_all") -> dict[str, int]:
    """Bytes handed to each collective of `kind`, summed per role."""
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.meta.get("cpfx_collective") == kind:
            x = n.args[0].meta["val"]
            role = n.meta.get("cpfx_role", "")
            out[role] = out.get(role, 0) + x.numel() * x.element_size()
    return out


# Scalar C++ kernels: the tests read the wrapper's order of kernels and collectives, which does not
# depend on vectorization (and vectorized codegen is most of the compile time).
_FAST = {"cpp.simdlen": 1}


def inductor_code(
    model: str, world: int = 2, mesh_name: str = "ulysses", **config: Any
) -> tuple[str, list[str]]:
    """Inductor's generated `call` for the cpfx-rewritten graph of a tiny model (fake process group),
    and the graph's placeholder names, in the order of inductor's `arg<i>_1` inputs."""
    from torch._inductor.utils import run_and_get_code
    from torch.distributed.device_mesh import init_device_mesh

    import cpfx

    torch._dynamo.reset()
    m, kw = build(model)
    with fake_world(world):
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=(mesh_name,))
        config.setdefault("check_collectives", False)
        be = cpfx.backend(mesh, cpfx.ParallelConfig(compile=True, **config))
        # No FX-graph cache: a cache hit would skip the post-grad passes this code comes from.
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, **_FAST):
            _, codes = run_and_get_code(lambda: torch.compile(m, backend=be, dynamic=False)(**kw))
    (gm,) = be.graphs
    (code,) = codes
    names = [n.meta.get("cpfx_input", n.name) for n in gm.graph.nodes if n.op == "placeholder"]
    return code[code.index("def call(") :], names
