"""The pass pipeline: declared in one function, applied by one runner."""

from __future__ import annotations

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

Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]
REQUIRED = ("shard_tokens", "lower_attention")


def build_pipeline(config: ParallelConfig) -> list[tuple[str, Pass]]:
    """The ordered list of passes for `config`."""
    passes: list[tuple[str, Pass]] = [
        # First decide what is sharded: every later pass works on local shapes.
        ("shard_tokens", shard_tokens_pass),
        # Then choose Ulysses / ring / hybrid per attention; creates the collectives.
        ("lower_attention", lower_attention_pass),
    ]
    if config.fp8_comm:
        from cpfx.passes.fp8_comm import fp8_comm_pass

        # Rewrites the Q/V/O all-to-alls lowering created; must precede scheduling.
        passes.append(("fp8_comm", fp8_comm_pass))
    passes.append(("cleanup", cleanup_pass))
    if config.async_qkv:
        from cpfx.passes.overlap import overlap_pass

        # Last rewrite: moves starts early and waits late over the final set of collectives.
        passes.append(("overlap", overlap_pass))
    if config.check_collectives:
        from cpfx.passes.check_collectives import check_collectives_pass

        # Reads the final order of collectives; must run after every pass that changes it.
        passes.append(("check_collectives", check_collectives_pass))
    return passes


def run_passes(
    gm: fx.GraphModule, ctx: PassContext, passes: list[tuple[str, Pass]], rank: int = 0
) -> fx.GraphModule:
    """Apply `passes` in order: time, lint, refresh metadata, dump, and name the pass on error."""
    skip = set(ctx.config.skip_passes)
    bad = skip & set(REQUIRED)
    if bad:
        raise CpfxError(
            f"cannot skip required passes {sorted(bad)}; skippable: "
            f"{[n for n, _ in passes if n not in REQUIRED]}"
        )
    dump = ctx.config.dump_dir
    active = [n for n, _ in passes if n not in skip]
    # meta["val"] is re-propagated (about as costly as one fake forward) only where it is read:
    # after shard_tokens (lowering reads local shapes) and after the last rewrite (byte counts,
    # inductor, dumps); passes in between do not read it.
    refresh_after = {"shard_tokens", [n for n in active if n != "check_collectives"][-1]}
    log.info("cpfx pipeline: %s", ", ".join(f"{i}:{n}" for i, (n, _) in enumerate(passes)))
    if dump:
        debug.write_dump(dump, rank, ctx.graph_id, 0, "captured", gm, "captured by Dynamo")
    for i, (name, fn) in enumerate(passes, start=1):
        if name in skip:
            log.info("skipping pass %s", name)
            continue
        n_before = len(gm.graph.nodes)
        c_before = len(debug.collective_nodes(gm))
        t0 = time.perf_counter()
        try:
            out = fn(gm, ctx)
            if not isinstance(out, fx.GraphModule):
                raise TypeError(f"returned {type(out).__name__}, not a GraphModule")
            gm = out
            gm.graph.lint()
            if name in refresh_after:
                refresh_meta(gm, ctx)
        except CpfxError:
            raise
        except Exception as e:  # noqa: BLE001 - wrapped with the pass name
            raise PassError(f"cpfx pass '{name}' failed: {type(e).__name__}: {e}") from e
        dt = time.perf_counter() - t0
        n_after = len(gm.graph.nodes)
        c_after = len(debug.collective_nodes(gm))
        header = (
            f"pass {i}: {name}  {dt * 1e3:.1f} ms  nodes {n_before} -> {n_after}  "
            f"collectives {c_before} -> {c_after}"
        )
        log.info(header)
        if dump:
            debug.write_dump(dump, rank, ctx.graph_id, i, name, gm, header)
    return gm


def refresh_meta(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Recompute `meta["val"]` of every node with fake tensors (new nodes have none)."""
    if ctx.fake_mode is None:
        return
    with torch.no_grad():
        FakeTensorProp(gm, ctx.fake_mode).propagate_dont_convert_inputs(*ctx.fake_inputs)
