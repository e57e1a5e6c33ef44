"""The frozen context every pass receives: who this rank is on the mesh, and the config."""

from __future__ import annotations

import dataclasses
from typing import Any

from cpfx.config import ParallelConfig


@dataclasses.dataclass(frozen=True)
class PassContext:
    config: ParallelConfig
    world: int
    """Context-parallel degree N = ring * ulysses (the whole mesh)."""
    cp_rank: int
    """This rank's index along the flattened ("ring", "ulysses") mesh: ring_index * U + ulysses_index."""
    cp_group: str
    """Group name of the whole CP group (gathers of sharded tensors)."""
    ulysses: int = 1
    ring: int = 1
    ulysses_index: int = 0
    ring_index: int = 0
    ulysses_group: str = ""
    ring_group: str = ""
    ring_ranks: tuple[int, ...] = ()
    """Global ranks of this rank's ring group, in ring order."""
    device_type: str = "cpu"
    graph_id: int = 0
    fake_inputs: tuple[Any, ...] = ()
    """Fake example inputs of the captured graph, to refresh `meta["val"]` after a rewrite."""
    fake_mode: Any = None
    check_group: Any = None
    """A gloo group over the CP ranks for small CPU-side checks (fingerprints, input hashes)."""

    @property
    def cp_ranks(self) -> list[int]:
        return list(range(self.world))
