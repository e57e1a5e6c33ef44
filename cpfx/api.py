"""`cpfx.parallelize`: the one call a user makes."""

from __future__ import annotations

import datetime
import functools
import hashlib
import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._dynamo.exc import BackendCompilerFailed

from cpfx.backend import backend
from cpfx.config import ParallelConfig
from cpfx.errors import ConfigError, CpfxError, RankDivergenceError

log = logging.getLogger(__name__)


def parallelize(
    model: nn.Module, mesh: Any = None, config: ParallelConfig | None = None
) -> nn.Module:
    """Run `model` context-parallel over `mesh` (default: 1-D Ulysses over the whole group).

    The model is compiled in place (`nn.Module.compile` with the cpfx backend) and returned, so it
    stays the same object of the same class: pipelines keep working. Every rank must call it with
    the same full inputs; every rank gets the same full output.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"cpfx.parallelize expects an nn.Module, got {type(model).__name__}")
    config = config or ParallelConfig()
    if not isinstance(config, ParallelConfig):
        raise ConfigError(
            f"cpfx.parallelize: config must be a cpfx.ParallelConfig, got {type(config).__name__}"
        )
    be = backend(mesh, config)
    info = be.mesh_info
    _set_timeouts(mesh, config.timeout_s)
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, config.max_recompiles)
    model.compile(backend=be, dynamic=False)
    state = {"mesh_info": info, "config": config, "graphs": be.graphs, "signatures": set()}
    model._compiled_call_impl = _guarded_call(model, model._compiled_call_impl, state)
    model._cpfx = state  # type: ignore[attr-defined]
    return model


def _set_timeouts(mesh: Any, timeout_s: float) -> None:
    """A dead or stalled rank makes the others fail within `timeout_s`, not hang."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    td = datetime.timedelta(seconds=timeout_s)
    groups = [dist.group.WORLD]
    if mesh is not None:
        groups += [mesh.get_group(i) for i in range(mesh.ndim)]
    for g in groups:
        try:
            _set_pg_timeout(td, g)
        except Exception as e:  # noqa: BLE001 - a backend without settable timeouts keeps its own
            log.debug("could not set timeout on %s: %s", g, e)


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    leaves = list(args) + [kwargs[k] for k in sorted(kwargs)]
    return tuple(
        (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        for x in leaves
    )


def _input_digest(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for x in list(args) + [kwargs[k] for k in sorted(kwargs)]:
        if isinstance(x, torch.Tensor):
            h.update(str((tuple(x.shape), x.dtype)).encode())
            h.update(
                x.detach().to("cpu", torch.float64).sum().item().hex().encode()
                if x.numel() and (x.is_floating_point() or not x.is_complex())
                else b""
            )
        else:
            h.update(repr(x).encode())
    return h.hexdigest()[:16]


def _guarded_call(model: nn.Module, fn: Any, state: dict[str, Any]) -> Any:
    """Wrap the compiled call: recompile cap, optional input check, cpfx errors unwrapped."""
    config: ParallelConfig = state["config"]
    info = state["mesh_info"]
    inner = unwrap_errors(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        sig = _signature(args, kwargs)
        if sig not in state["signatures"]:
            if len(state["signatures"]) >= config.max_recompiles:
                raise CpfxError(
                    f"cpfx: {type(model).__name__} was called with {len(state['signatures']) + 1} "
                    f"different input shapes/dtypes; each needs a new per-rank graph. Raise "
                    f"ParallelConfig(max_recompiles={config.max_recompiles}) if that is intended."
                )
            state["signatures"].add(sig)
        if config.check_inputs and info.check_group is not None:
            check_same_inputs(_input_digest(args, kwargs), info, config)
        n_before = len(state["graphs"])
        try:
            return inner(*args, **kwargs)
        finally:
            from cpfx.p2p import finish_sends

            finish_sends()  # no send of the last ring step is left un-waited after the call
            if len(state["graphs"]) > n_before:
                _require_attention(model, state)

    return call


def _require_attention(model: nn.Module, state: dict[str, Any]) -> None:
    from cpfx.debug import collective_nodes

    if not any(collective_nodes(gm) or gm.meta.get("cpfx_attention") for gm in state["graphs"]):
        raise ConfigError(
            f"cpfx: found no scaled_dot_product_attention over a sequence in "
            f"{type(model).__name__}; there is nothing to parallelize. cpfx needs attention "
            "computed with torch.nn.functional.scaled_dot_product_attention (diffusers' default)."
        )


def check_same_inputs(digest: str, info: Any, config: ParallelConfig) -> None:
    digests: list[str | None] = [None] * info.world
    dist.all_gather_object(digests, digest, group=info.check_group)
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise RankDivergenceError(
            f"cpfx: ranks {bad} received different inputs than rank 0 (check_inputs=True). "
            "Every rank must call the model with the same full inputs (same seed, same prompt)."
        )


def unwrap_errors(fn: Any) -> Any:
    """Re-raise cpfx's own errors as themselves, not wrapped in Dynamo's BackendCompilerFailed."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, CpfxError):
                raise inner.with_traceback(None) from None
            raise

    return call


def sent_bytes_per_call(model: nn.Module) -> int:
    """Bytes this rank sends in one forward of a parallelized model (all its graphs)."""
    graphs = model._cpfx["graphs"]  # type: ignore[union-attr]
    return sum(b for gm in graphs for _, _, b in gm.meta.get("cpfx_sent_bytes", ()))
