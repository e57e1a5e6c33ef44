"""The frozen context every pass receives: this rank's place on the mesh, and the config."""

from __future__ import annotations

import dataclasses
from typing import Any

from cpfx.config import ParallelConfig
from cpfx.mesh import MeshInfo


@dataclasses.dataclass(frozen=True)
class PassContext:
    config: ParallelConfig
    mesh: MeshInfo
    graph_id: int = 0
    fake_inputs: tuple[Any, ...] = ()
    """Fake example inputs of the captured graph, to refresh `meta["val"]` after a rewrite."""
    fake_mode: Any = None
    training: bool = False
    """The graph will be differentiated (`cpfx.training`): the applier marks the edges whose
    gradient needs a different collective than the forward's ops would give."""

    # Read-only views of the mesh, for passes that name these facts directly.
    @property
    def world(self) -> int:
        return self.mesh.world

    @property
    def cp_rank(self) -> int:
        return self.mesh.cp_rank

    @property
    def cp_group(self) -> str:
        return self.mesh.cp_group

    @property
    def ulysses(self) -> int:
        return self.mesh.ulysses

    @property
    def ring(self) -> int:
        return self.mesh.ring

    @property
    def ulysses_index(self) -> int:
        return self.mesh.ulysses_index

    @property
    def ulysses_group(self) -> str:
        return self.mesh.ulysses_group

    @property
    def ring_group(self) -> str:
        return self.mesh.ring_group

    @property
    def check_group(self) -> Any:
        return self.mesh.check_group
