"""The pass pipeline: declared in one function, applied by one runner."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from cpfx import debug
from cpfx.config import ParallelConfig
from cpfx.context import PassContext
from cpfx.errors import CpfxError, PassError
from cpfx.passes.cleanup import cleanup_pass
from cpfx.passes.lower_attention import lower_attention_pass
from cpfx.passes.shard_tokens import shard_tokens_pass

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[fx.GraphModule, PassContext], fx.GraphModule]
    required: bool = False
    """Skipping it would leave a graph that cannot run (`skip_passes` refuses it)."""
    refresh_meta: bool = False
    """It changes the shapes of existing nodes and later passes read `meta["val"]`: re-propagate
    fake values of every node after it. Other passes only add nodes (each existing node keeps its
    value): after the last of them, only the new nodes are given values."""
    sets_schedule: bool = False
    """It orders the collectives for overlap: inductor must keep that order."""


def build_pipeline(config: ParallelConfig) -> list[Pass]:
    """The ordered list of passes for `config`."""
    # First decide what is sharded: every later pass works on local shapes.
    passes = [Pass("shard_tokens", shard_tokens_pass, required=True, refresh_meta=True)]
    if config.fp8_comm:
        from cpfx.passes.fp8_comm import fp8_comm_pass

        # Chooses the payload codec of each attention's all-to-alls: read by the lowering.
        passes.append(Pass("fp8_comm", fp8_comm_pass))
    # Then choose Ulysses / ring / hybrid per attention; creates the collectives.
    passes.append(Pass("lower_attention", lower_attention_pass, required=True))
    passes.append(Pass("cleanup", cleanup_pass))
    if config.async_qkv:
        from cpfx.passes.overlap import overlap_pass

        # Last rewrite: moves starts early and waits late over the final set of collectives.
        passes.append(Pass("overlap", overlap_pass, sets_schedule=True))
    if config.check_collectives:
        from cpfx.passes.check_collectives import check_collectives_pass

        # Reads the final order of collectives; must run after every pass that changes it.
        passes.append(Pass("check_collectives", check_collectives_pass))
    return passes


def active_passes(passes: list[Pass], config: ParallelConfig) -> list[Pass]:
    """The passes that run under `config.skip_passes` (refusing to skip a required one)."""
    skip = set(config.skip_passes)
    bad = sorted(p.name for p in passes if p.required and p.name in skip)
    if bad:
        raise CpfxError(
            f"cannot skip required passes {bad}; skippable: "
            f"{[p.name for p in passes if not p.required]}"
        )
    return [p for p in passes if p.name not in skip]


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: list[Pass]) -> fx.GraphModule:
    """Apply `passes` in order: time, lint, refresh metadata, dump, and name the pass on error."""
    dump = ctx.config.dump_dir
    rank = ctx.mesh.cp_rank
    active = active_passes(passes, ctx.config)
    # meta["val"] is re-propagated in full (about as costly as one fake forward) only after passes
    # that change shapes; after the last rewrite the new nodes get theirs (byte counts, dumps).
    last_rewrite = [p.name for p in active if p.name != "check_collectives"][-1]
    log.info("cpfx pipeline: %s", ", ".join(f"{i}:{p.name}" for i, p in enumerate(passes)))
    if dump:
        debug.write_dump(dump, rank, ctx.graph_id, 0, "captured", gm, "captured")
    for i, p in enumerate(passes, start=1):
        if p not in active:
            log.info("skipping pass %s", p.name)
            continue
        n_before = len(gm.graph.nodes)
        c_before = len(debug.collective_nodes(gm))
        t0 = time.perf_counter()
        try:
            out = p.fn(gm, ctx)
            if not isinstance(out, fx.GraphModule):
                raise TypeError(f"returned {type(out).__name__}, not a GraphModule")
            gm = out
            gm.graph.lint()
            if p.refresh_meta:
                refresh_meta(gm, ctx)
            elif p.name == last_rewrite:
                refresh_meta(gm, ctx, new_only=True)
        except CpfxError:
            raise
        except Exception as e:  # noqa: BLE001 - wrapped with the pass name
            raise PassError(f"cpfx pass '{p.name}' failed: {type(e).__name__}: {e}") from e
        dt = time.perf_counter() - t0
        header = (
            f"pass {i}: {p.name}  {dt * 1e3:.1f} ms  nodes {n_before} -> {len(gm.graph.nodes)}  "
            f"collectives {c_before} -> {len(debug.collective_nodes(gm))}"
        )
        log.info(header)
        if dump:
            debug.write_dump(dump, rank, ctx.graph_id, i, p.name, gm, header)
    _drop_unused_constants(gm)
    return gm


def _drop_unused_constants(gm: fx.GraphModule) -> None:
    """Delete tensor attributes no `get_attr` reads any more (constants of removed nodes): a
    compiler that lifts a module's buffers to inputs would otherwise receive them too."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers(recurse=False)):
        if name not in used:
            delattr(gm, name)
    for name in [k for k, v in vars(gm).items() if isinstance(v, torch.Tensor)]:
        if name.startswith("_tensor_constant") and name not in used:
            delattr(gm, name)


class _NewNodesProp(FakeTensorProp):
    """Fake propagation that keeps the value a node already has (only new nodes are computed)."""

    def run_node(self, n: fx.Node) -> object:
        if n.op != "placeholder" and "val" in n.meta:
            return n.meta["val"]
        return super().run_node(n)


def refresh_meta(gm: fx.GraphModule, ctx: PassContext, new_only: bool = False) -> None:
    """Recompute `meta["val"]` with fake tensors: of every node, or of the nodes that have none."""
    if ctx.fake_mode is None:
        return
    prop = _NewNodesProp if new_only else FakeTensorProp
    with torch.no_grad():
        prop(gm, ctx.fake_mode).propagate_dont_convert_inputs(*ctx.fake_inputs)
