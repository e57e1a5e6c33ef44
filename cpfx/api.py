"""`cpfx.parallelize`: the one call a user makes."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn as nn

from cpfx.backend import backend
from cpfx.config import ParallelConfig
from cpfx.errors import ConfigError, CpfxError
from torch._dynamo.exc import BackendCompilerFailed

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
        raise ConfigError(f"cpfx.parallelize: config must be a cpfx.ParallelConfig, got {type(config).__name__}")
    be = backend(mesh, config)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, config.max_recompiles)
    model.compile(backend=be, dynamic=False)
    model._compiled_call_impl = unwrap_errors(model._compiled_call_impl)
    model._cpfx = {"mesh_info": be.mesh_info, "config": config, "graphs": be.graphs}  # type: ignore[attr-defined]
    return model


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
    """Bytes this rank sends in one forward of a parallelized model (latest graph of each kind)."""
    graphs = model._cpfx["graphs"]  # type: ignore[union-attr]
    return sum(b for gm in graphs for _, _, b in gm.meta.get("cpfx_sent_bytes", ()))
