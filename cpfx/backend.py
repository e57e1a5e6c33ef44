"""The Dynamo backend: captured FX graph in, rewritten per-rank graph out.

`torch.compile(model, backend="cpfx")` (registered through the `torch_dynamo_backends` entry
point) uses a 1-D Ulysses mesh over the whole default process group and the default config;
`cpfx.backend(mesh, config)` gives a configured one.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from cpfx.config import ParallelConfig
from cpfx.context import PassContext
from cpfx.debug import env_dump_dir
from cpfx.mesh import MeshInfo, mesh_info
from cpfx.pipeline import build_pipeline, run_passes

log = logging.getLogger(__name__)


def backend(mesh: Any = None, config: ParallelConfig | None = None) -> Callable[..., Any]:
    """A Dynamo backend callable that parallelizes every graph it receives."""
    config = config or ParallelConfig()
    if config.dump_dir is None and env_dump_dir():
        import dataclasses

        config = dataclasses.replace(config, dump_dir=env_dump_dir())
    info = mesh_info(mesh, config)
    graph_ids = itertools.count()

    graphs: list[fx.GraphModule] = []

    def cpfx_compile(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        fn = compile_graph(gm, example_inputs, info, config, next(graph_ids))
        graphs.append(gm)
        return fn

    cpfx_compile.mesh_info = info  # type: ignore[attr-defined]
    cpfx_compile.graphs = graphs  # type: ignore[attr-defined]  (rewritten graphs, for inspection)
    return cpfx_compile


def cpfx_backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """Entry-point backend: Ulysses over the default process group, default config."""
    global _default
    if _default is None:
        _default = backend()
    return _default(gm, example_inputs)


_default: Callable[..., Any] | None = None


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    info: MeshInfo,
    config: ParallelConfig,
    graph_id: int = 0,
) -> Callable[..., Any]:
    if info.world == 1:
        return gm.forward
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs)
    ctx = context_for(info, config, graph_id=graph_id, fake_inputs=fake, fake_mode=mode)
    passes = build_pipeline(config)
    gm = run_passes(gm, ctx, passes, rank=info.cp_rank)
    if config.compile:
        from cpfx.inductor import compile_with_inductor

        # Pin the order only if the overlap pass set one (it is in the pipeline and not skipped).
        ran = {name for name, _ in passes} - set(config.skip_passes)
        return compile_with_inductor(gm, example_inputs, keep_schedule="overlap" in ran)
    return gm.forward


def context_for(info: MeshInfo, config: ParallelConfig, **extra: Any) -> PassContext:
    """The pass context of this rank on `info`'s mesh."""
    return PassContext(
        config=config,
        world=info.world,
        cp_rank=info.cp_rank,
        cp_group=info.cp_group,
        ulysses=info.ulysses,
        ring=info.ring,
        ulysses_index=info.ulysses_index,
        ring_index=info.ring_index,
        ulysses_group=info.ulysses_group,
        ring_group=info.ring_group,
        ring_ranks=info.ring_ranks,
        device_type=info.device_type,
        check_group=info.check_group,
        **extra,
    )
