"""`cpfx.parallelize`: the one call a user makes."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from typing import TYPE_CHECKING, Any

import torch.nn as nn
from torch._dynamo.exc import BackendCompilerFailed

from cpfx import dynamic, resident
from cpfx.backend import backend
from cpfx.config import ParallelConfig
from cpfx.errors import ConfigError, CpfxError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)

_ordinals = itertools.count()
"""Parallelized models of this process, in order (matches across ranks that parallelize the
same models in the same order; names dump folders and pairs up the per-call checks)."""


def parallelize(
    model: nn.Module, mesh: DeviceMesh | None = None, config: ParallelConfig | None = None
) -> nn.Module:
    """Run `model` context-parallel over `mesh` (default: 1-D Ulysses over the whole group).

    The model is compiled in place (like `nn.Module.compile`, with the cpfx backend) and returned,
    so it stays the same object of the same class: pipelines keep working. Every rank must call it
    with the same full inputs, in the same order; every rank gets the same full output. Calls are
    serialized (one at a time per set of ranks in a process, whichever thread makes them); see
    `cpfx.runtime` for the checks each call makes. On one rank the model is left as it is.
    """
    from cpfx.debug import env_dump_dir, model_dump_dir
    from cpfx.runtime import Runtime, compile_call

    if not isinstance(model, nn.Module):
        raise ConfigError(f"cpfx.parallelize expects an nn.Module, got {type(model).__name__}")
    config = config or ParallelConfig()
    if not isinstance(config, ParallelConfig):
        raise ConfigError(
            f"cpfx.parallelize: config must be a cpfx.ParallelConfig, got {type(config).__name__}"
        )
    _check_mesh_type(mesh)
    ordinal = next(_ordinals)
    root = config.dump_dir or env_dump_dir()
    if root:
        # The user's dump_dir may itself be a link they chose; nothing below it may be.
        model_dir = model_dump_dir(os.path.realpath(root), type(model).__name__, ordinal)
        config = dataclasses.replace(config, dump_dir=model_dir)
    be = backend(mesh, config)
    runtime = Runtime(model, be, config, ordinal)
    model._cpfx = runtime  # type: ignore[assignment]  # nn.Module types attributes as tensors
    if runtime.info.world == 1:
        log.info("cpfx: one rank: %s runs as it is (nothing to parallelize)", type(model).__name__)
        return model
    if config.regional:
        compile_blocks(model, runtime)
        compiled = model._call_impl  # the code between the blocks runs eagerly
    else:
        compiled = compile_call(model._call_impl, runtime)

    @functools.wraps(model._call_impl)
    def call(*args: Any, **kwargs: Any) -> Any:
        return runtime.call(compiled, args, kwargs)

    runtime.compiled = compiled
    model._compiled_call_impl = call
    return model


def _check_mesh_type(mesh: object) -> None:
    """`mesh` is a `DeviceMesh` or None (the default mesh); anything else (a dim name such as
    "ulysses", a tuple of them, a size) is refused before any work, saying how to build one."""
    from torch.distributed.device_mesh import DeviceMesh

    if mesh is None or isinstance(mesh, DeviceMesh):
        return
    raise ConfigError(
        f"cpfx.parallelize: mesh must be a torch.distributed DeviceMesh (or None: 1-D Ulysses "
        f"over every rank), got {type(mesh).__name__} {mesh!r:.60}. A DeviceMesh names the "
        "ranks and the parallelism of each dim; build one on every rank with "
        "torch.distributed.device_mesh.init_device_mesh(device_type, (world_size,), "
        "mesh_dim_names=(\"ulysses\",)) ('ring', or ('ring', 'ulysses') with a 2-D shape)."
    )


def compile_blocks(model: nn.Module, runtime: Any) -> None:
    """`ParallelConfig(regional=True)`: one Dynamo-compiled call per repeated block class, shared
    by every instance (parameters are graph inputs, so the instances reuse one graph)."""
    from cpfx.runtime import compile_call

    names = tuple(getattr(model, "_repeated_blocks", None) or ()) or _inferred_blocks(model)
    per_class: dict[type, Any] = {}
    for m in model.modules():
        if type(m).__name__ not in names:
            continue
        if type(m) not in per_class:
            per_class[type(m)] = resident.BlockClass(
                compile_call(_call_block, runtime), runtime.info, runtime.config.dynamic
            )
        m._compiled_call_impl = functools.partial(_block_call, per_class[type(m)], m)
    if not per_class:
        raise ConfigError(
            f"cpfx: ParallelConfig(regional=True) compiles the blocks a model lists in "
            f"`_repeated_blocks` (or, without that list, the repeated items of its ModuleLists "
            f"that hold attention); {type(model).__name__} lists "
            f"{list(names) if names else 'none and has no such ModuleList'}"
            + (" and has no module of those classes" if names else "")
            + ". Set the class attribute `_repeated_blocks` to the block class names, or use "
            "regional=False (the whole model as one graph)."
        )
    log.info(
        "cpfx: regional compile of %s: %s",
        type(model).__name__,
        ", ".join(sorted(c.__name__ for c in per_class)),
    )


def _inferred_blocks(model: nn.Module) -> tuple[str, ...]:
    """For a model that lists no `_repeated_blocks`: the classes of the items of its
    `nn.ModuleList`s whose items are all of one class and hold an attention module (a tiny
    config may have a single block per list)."""
    found: list[str] = []
    for m in model.modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        kinds = {type(b) for b in m}
        if len(kinds) != 1:
            continue
        first = m[0]
        if any("Attention" in type(sub).__name__ for sub in first.modules()):
            name = type(first).__name__
            if name not in found:
                found.append(name)
    if found:
        log.info("cpfx: %s lists no _repeated_blocks; regional blocks inferred: %s",
                 type(model).__name__, ", ".join(found))
    return tuple(found)


def _block_call(cls: resident.BlockClass, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """One block call: token shards in its arguments go in as shards (`cpfx.resident`), and so
    does this rank's part of a whole tensor where the class was handed shards before; its outputs
    stay shards only within a model call, and when its graph is known to be the whole block."""
    st = resident.state
    compiled = cls.compiled
    if st.in_model == 0:  # the block called on its own: whole tensors in and out
        return resident.materialize(
            compiled(block, (), (), *resident.materialize(args), **resident.materialize(kwargs))
        )
    args, kwargs = cls.shard_like_before(block, args, kwargs)
    specs, shards, (args, kwargs), held = resident.block_args(args, kwargs, cls.uniform)
    cls.note(specs, held)
    if st.mark_sizes and specs:
        # A call without shards (the first block, on the first call) is captured static: later
        # calls hand that block shards. Where a class never gets any, Dynamo's own automatic
        # dynamic shapes make its graph symbolic when its sizes first change.
        dynamic.mark_sizes((shards, args, kwargs))
    outer, st.block = st.block, []
    try:
        out = compiled(block, specs, shards, *args, **kwargs)
        ran = st.block
    finally:
        st.block = outer
    if specs:
        out, values = out
        resident.write_back(held, values)
    cls.ran(block, len(ran))
    if len(ran) == 1:
        ran[0].resident_ok = True
    elif len(ran) > 1:  # a graph break inside the block: its graphs gather their outputs
        for r in ran:
            r.resident_ok = False
    return out


def _call_block(  # named by resident.BLOCK_FRAME
    block: nn.Module, specs: tuple[Any, ...], shards: tuple[Any, ...], *args: Any, **kwargs: Any
) -> Any:
    if not specs:
        return block._call_impl(*args, **kwargs)
    args, kwargs, values = resident.fill(specs, shards, args, kwargs)
    return block._call_impl(*args, **kwargs), values


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
    runtime: Any = model._cpfx
    return sum(g.sent_bytes for g in runtime.graphs)
