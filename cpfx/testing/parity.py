"""Parity on real ranks: a model's single-process output vs its cpfx output on this rank.

Run by every rank of a process group (a `cpfx.testing.launch.Pool` task, or under torchrun): each
rank computes the reference itself from the same weights and inputs, then parallelizes the model
and calls it again, so no tensor has to cross processes to be compared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

import cpfx
from cpfx.testing.tiny import build


def fresh() -> None:
    """Forget earlier compiles and counters (a pool worker runs many tasks)."""
    torch._dynamo.reset()
    cpfx.reset_counters()


def make_mesh(
    shape: Sequence[int] | None = None, names: Sequence[str] = ("ulysses",)
) -> DeviceMesh:
    """A CPU mesh over the whole group: 1-D over every rank unless `shape` says otherwise."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = tuple(shape) if shape else (dist.get_world_size(),)
    return init_device_mesh("cpu", shape, mesh_dim_names=tuple(names))


def first_output(out: Any) -> list[torch.Tensor]:
    """The first output of a tiny model (a tuple, a `.sample`, or Z-Image's list of samples)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    out = out.sample if hasattr(out, "sample") else out
    if isinstance(out, (tuple, list)):
        out = torch.stack(list(out))
    return [out]


def compare(
    model: torch.nn.Module,
    kwargs: dict[str, Any],
    *,
    mesh_shape: Sequence[int] | None = None,
    mesh_names: Sequence[str] = ("ulysses",),
    config: dict[str, Any] | None = None,
    calls: int = 1,
    outputs: Callable[[Any], list[torch.Tensor]] = first_output,
) -> dict[str, Any]:
    """`model(**kwargs)` alone, then parallelized (`calls` times), compared in float32:
    `max_abs`, `rel_max` (max abs / max(1, max |ref|)), `rel_l2`, cpfx's `counters`, `shape`."""
    with torch.no_grad():
        ref = [r.float() for r in outputs(model(**kwargs))]
    mesh = make_mesh(mesh_shape, mesh_names)
    cpfx.parallelize(model, mesh, cpfx.ParallelConfig(**(config or {})))
    with torch.no_grad():
        for _ in range(calls):
            out = [o.float() for o in outputs(model(**kwargs))]
    err = [(o - r).abs().max().item() if r.numel() else 0.0 for o, r in zip(out, ref)]
    top = [max(1.0, r.abs().max().item() if r.numel() else 0.0) for r in ref]
    diff = torch.cat([(o - r).flatten() for o, r in zip(out, ref)])
    norm = torch.cat([r.flatten() for r in ref]).norm()
    return {
        "max_abs": max(err),
        "rel_max": max(e / t for e, t in zip(err, top)),
        "rel_l2": (diff.norm() / norm).item(),
        "counters": {k: dict(v) for k, v in cpfx.counters.items()},
        "shape": tuple(out[0].shape),
    }


def divergence(model: torch.nn.Module, kwargs: dict[str, Any]) -> str:
    """Call a parallelized `model(**kwargs)` without gradients: "no error", or the
    `cpfx.RankDivergenceError` it raised, as "RankDivergenceError: <message>"."""
    try:
        with torch.no_grad():
            model(**kwargs)
    except cpfx.RankDivergenceError as e:
        return f"RankDivergenceError: {e}"
    return "no error"


def parity(
    model: str,
    mesh_shape: Sequence[int] | None = None,
    mesh_names: Sequence[str] = ("ulysses",),
    config: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    dtype: str = "float32",
    calls: int = 1,
) -> dict[str, Any]:
    """`compare` for the tiny family `model` (`cpfx.testing.tiny`) in `dtype`."""
    fresh()
    m, kw = build(model, dtype=getattr(torch, dtype), **(model_kwargs or {}))
    return compare(m, kw, mesh_shape=mesh_shape, mesh_names=mesh_names, config=config, calls=calls)
