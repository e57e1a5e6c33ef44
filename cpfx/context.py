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
    """This rank's place on the mesh (`ctx.mesh.world`, `ctx.mesh.ulysses_group`, ...)."""
    graph_id: int = 0
    fake_inputs: tuple[Any, ...] = ()
    """Fake example inputs of the captured graph, to refresh `meta["val"]` after a rewrite."""
    fake_mode: Any = None
    training: bool = False
    """The graph will be differentiated (`cpfx.training`): the applier marks the edges whose
    gradient needs a different collective than the forward's ops would give."""
