"""`cpfx.explain`: what cpfx would do to a model, without running it in parallel.

The report lists the inferred shard plan (where the token sequence is sliced and gathered, with the
model source line), each attention's strategy, and every collective of one forward with the bytes
this rank sends. With no process group initialized, a fake group of `world` ranks is used in this
process (nothing is computed across ranks; only graphs are built).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.fx as fx

from cpfx.config import ParallelConfig

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclasses.dataclass
class Report:
    world: int
    mesh: dict[str, int]
    strategy: dict[str, int]
    sliced: list[tuple[str, int, int, str]]
    """(tensor, dim, global length, model source) where the sequence starts being sharded."""
    gathered: list[tuple[str, str]]
    """(tensor, before which op / source) where the sharded sequence is gathered."""
    attentions: list[tuple[str, str]]
    """(strategy, model source) per attention."""
    collectives: list[tuple[str, str, int]]
    """(kind, role, bytes sent by rank 0) per collective of one forward."""
    counters: dict[str, dict[str, int]]
    placements: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    """(node, op, placement, rule) for every op of the planned graphs (`--verbose`)."""

    @property
    def bytes_per_forward(self) -> int:
        return sum(b for _, _, b in self.collectives)

    def table(self, verbose: bool = False) -> str:
        lines = [
            f"cpfx plan: world={self.world} mesh={self.mesh} strategies={self.strategy}",
            "",
            "sequence sharded at:",
        ]
        lines += [f"  {t:<28} dim {d}  len {n:<7} {src}" for t, d, n, src in self.sliced]
        lines += ["", "gathered before:"] + [f"  {t:<28} {src}" for t, src in self.gathered]
        lines += ["", "attention:"] + [f"  {s:<16} {src}" for s, src in self.attentions]
        agg: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
        for kind, role, b in self.collectives:
            agg[(kind, role)][0] += 1
            agg[(kind, role)][1] += b
        lines += ["", f"{'collective':<22}{'role':<8}{'count':>6}{'MB sent/rank':>14}"]
        lines += [f"{k:<22}{r:<8}{c:>6}{b / 1e6:>14.3f}" for (k, r), (c, b) in sorted(agg.items())]
        lines.append(
            f"{'total':<36}{len(self.collectives):>6}{self.bytes_per_forward / 1e6:>14.3f}"
        )
        if verbose:
            lines += ["", f"{'node':<32}{'op':<40}{'placement':<34}rule"]
            lines += [f"{n:<32}{op:<40}{p:<34}{r}" for n, op, p, r in self.placements]
        return "\n".join(lines)


def explain(
    model: torch.nn.Module,
    mesh: DeviceMesh | None = None,
    config: ParallelConfig | None = None,
    *args: Any,
    world: int = 2,
    mesh_shape: tuple[int, ...] | None = None,
    mesh_dim_names: tuple[str, ...] = ("ulysses",),
    print_table: bool = True,
    verbose: bool = False,
    **kwargs: Any,
) -> Report:
    """Build cpfx's graphs for `model(*args, **kwargs)` and describe them (see module doc)."""
    import cpfx
    from cpfx.api import unwrap_errors
    from cpfx.debug import sent_bytes

    config = dataclasses.replace(config or ParallelConfig(), check_collectives=True)
    torch._dynamo.reset()
    cpfx.reset_counters()
    with fake_world(world) as fake:
        if mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(
                "cpu", mesh_shape or (dist.get_world_size(),), mesh_dim_names=mesh_dim_names
            )
        if fake:
            config = dataclasses.replace(config, check_collectives=False)
        be = cpfx.backend(mesh, config)
        with torch.no_grad():
            unwrap_errors(torch.compile(model, backend=be, dynamic=False))(*args, **kwargs)
        info = be.mesh_info
        report = Report(
            world=info.world,
            mesh={"ring": info.ring, "ulysses": info.ulysses},
            strategy=dict(cpfx.counters.get("lower_attention", {})),
            sliced=[],
            gathered=[],
            attentions=[],
            collectives=[],
            counters={k: dict(v) for k, v in cpfx.counters.items()},
        )
        for gm in be.graphs:
            _describe(gm, report)
            report.collectives += sent_bytes(gm, info)
    torch._dynamo.reset()
    if print_table:
        print(report.table(verbose))
    return report


def _describe(gm: fx.GraphModule, report: Report) -> None:
    """Read one rewritten graph's plan into the report."""
    from cpfx.graph_utils import where

    for n in gm.graph.nodes:
        if "cpfx_seed" in n.meta:
            name, dim, size, src = n.meta["cpfx_seed"]
            report.sliced.append((name, dim, size, src))
        if "cpfx_gather" in n.meta:
            report.gathered.append(n.meta["cpfx_gather"])
        if "cpfx_strategy" in n.meta:
            report.attentions.append((n.meta["cpfx_strategy"], where(n)))
    plan = gm.meta.get("cpfx_shard_plan")
    if plan is None:
        return
    for n, np_ in plan.nodes.items():
        if n.op != "call_function":
            continue
        rule = np_.decision.rule if np_.decision is not None else ("seed" if np_.seed else "")
        report.placements.append((n.name, str(n.target), repr(np_.placement), rule))


@contextlib.contextmanager
def fake_world(world: int) -> Iterator[bool]:
    """Use the initialized process group, or a fake one of `world` ranks for this call.
    Yields whether the group in use is a fake one (no real collectives can run on it)."""
    if dist.is_initialized():
        yield dist.get_backend() == "fake"
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield True
    finally:
        dist.destroy_process_group()
