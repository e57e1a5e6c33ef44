"""Task functions the gloo pool runs on every rank (module-level, so workers can import them)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _fresh() -> None:
    import cpfx

    torch._dynamo.reset()
    cpfx.reset_counters()


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...]):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", tuple(shape), mesh_dim_names=tuple(names))


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample if hasattr(out, "sample") else out


def parity(
    model: str,
    mesh_shape: tuple[int, ...] | None = None,
    mesh_names: tuple[str, ...] = ("ulysses",),
    config: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    dtype: str = "float32",
    calls: int = 1,
) -> dict[str, Any]:
    """Single-process output vs cpfx output of the same weights on this rank."""
    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build(model, **(model_kwargs or {}))
    dt = getattr(torch, dtype)
    m = m.to(dt)
    kw = {k: (v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    with torch.no_grad():
        ref = _first(m(**kw)).float()
    mesh = make_mesh(mesh_shape or (dist.get_world_size(),), mesh_names)
    cpfx.parallelize(m, mesh, cpfx.ParallelConfig(**(config or {})))
    with torch.no_grad():
        for _ in range(calls):
            out = _first(m(**kw)).float()
    diff = (out - ref).abs().max().item()
    rel = ((out - ref).norm() / ref.norm()).item()
    counters = {k: dict(v) for k, v in cpfx.counters.items()}
    return {"max_abs": diff, "rel_l2": rel, "counters": counters, "shape": tuple(out.shape)}
