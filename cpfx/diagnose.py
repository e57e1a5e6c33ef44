"""`cpfx.diagnose(model)`: what a parallelized model did, per compiled graph and observed call."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class GraphInfo:
    id: int
    attention_captured: int
    """scaled_dot_product_attention calls Dynamo captured in this graph."""
    attention_parallel: int
    """Of those, run context-parallel."""
    collectives: int
    sent_bytes: int
    """Bytes this rank sends per run of the graph."""
    flops: int
    """Matmul, attention and convolution FLOPs of one run on this rank (`cpfx.measure`)."""
    runs: int
    recompile_reason: str | None
    """Dynamo's guard failure that made this graph a recompile (None: a frame's first graph)."""
    evicted: bool = False
    """Dropped from the variant cache (`max_recompiles` kept per symbolic graph): released."""


@dataclasses.dataclass
class Diagnosis:
    model: str
    world: int
    rank: int
    calls: int
    failed_calls: int
    max_recompiles: int
    graphs: list[GraphInfo]
    signatures: list[Any]
    """Observed calls (the first of each input signature, and the one after each recompile):
    attentions that ran parallel, and outside cpfx's graphs, by module."""
    dead: str | None
    """Why the process group is unusable, if a collective failed."""
    parameter_bytes: int = 0
    """Bytes of the storages behind the model's parameters and buffers on this rank (each
    storage once; every rank holds every weight whole)."""

    @property
    def kept(self) -> int:
        """Graphs this rank holds now (evicted variants are released)."""
        return sum(1 for g in self.graphs if not g.evicted)

    @property
    def recompiles(self) -> int:
        return sum(1 for g in self.graphs if g.recompile_reason)

    @property
    def sent_bytes_per_call(self) -> int:
        """Bytes this rank sends in one forward (every graph once)."""
        return sum(g.sent_bytes for g in self.graphs)

    def __str__(self) -> str:
        lines = [
            f"cpfx.diagnose: {self.model} on rank {self.rank} of {self.world}: {self.calls} call(s)"
            f" ({self.failed_calls} failed), {len(self.graphs)} graph(s) ({self.kept} kept), "
            f"{self.recompiles} recompile(s) (max_recompiles={self.max_recompiles})"
        ]
        lines.append(f"  parameters and buffers: {self.parameter_bytes / 2**20:.1f} MiB on this "
                     "rank (replicated)")
        if self.dead:
            lines.append(f"  process group FAILED: {self.dead}")
        if self.world == 1:
            lines.append("  one rank: the model runs as it is, nothing is parallelized")
        for g in self.graphs:
            lines.append(
                f"  graph {g.id}: {g.attention_parallel}/{g.attention_captured} attention(s) "
                f"parallel, {g.collectives} collective(s), {g.sent_bytes / 1e6:.3f} MB sent and "
                f"{g.flops / 1e9:.3f} GFLOP per run, ran {g.runs}x"
                + (f"; recompiled because: {g.recompile_reason}" if g.recompile_reason else "")
            )
        for s in self.signatures:
            outside = ", ".join(f"{k} x{v}" for k, v in s.outside.items()) or "none"
            lines.append(
                f"  call {s.call}, inputs [{s.signature}]: {s.parallel} attention(s) ran parallel, "
                f"{s.outside_total} outside cpfx's graphs (not parallel): {outside}"
            )
        return "\n".join(lines)


def diagnose(model: Any) -> Diagnosis:
    """Report on a model returned by `cpfx.parallelize` (this rank's view)."""
    runtime = getattr(model, "_cpfx", None)
    if runtime is None:
        from cpfx.errors import ConfigError

        raise ConfigError(f"cpfx.diagnose: {type(model).__name__} was not cpfx.parallelize'd")
    from cpfx import rankcheck
    from cpfx.measure import graph_flops

    graphs = [
        GraphInfo(
            g.id,
            g.captured_attention,
            g.parallel_attention,
            len(g.collectives),
            g.sent_bytes,
            graph_flops(g.gm) if g.gm is not None else 0,
            g.runs,
            g.reason,
            g.evicted,
        )
        for g in runtime.graphs
    ]
    dead = rankcheck.dead_reason(runtime.ranks) if runtime.info.world > 1 else None
    return Diagnosis(
        model=runtime.model_name,
        world=runtime.info.world,
        rank=runtime.info.cp_rank,
        calls=runtime.calls,
        failed_calls=runtime.failed_calls,
        max_recompiles=runtime.config.max_recompiles,
        graphs=graphs,
        signatures=list(runtime.reports),
        dead=dead,
        parameter_bytes=_storage_bytes(model),
    )


def _storage_bytes(model: Any) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())
