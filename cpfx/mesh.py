"""Validate the device mesh and read off this rank's place in it."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from cpfx.config import ParallelConfig
from cpfx.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

KNOWN_DIMS = ("ring", "ulysses")


@dataclasses.dataclass(frozen=True)
class MeshInfo:
    world: int
    cp_rank: int
    cp_group: str
    ulysses: int
    ring: int
    ulysses_index: int
    ring_index: int
    ulysses_group: str
    ring_group: str
    ring_ranks: tuple[int, ...]
    device_type: str
    check_group: Any = None


def mesh_info(mesh: DeviceMesh | None, config: ParallelConfig) -> MeshInfo:
    """Check `mesh` against the process group and describe this rank's coordinates."""
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError(
            "cpfx needs an initialized process group: call torch.distributed.init_process_group"
            "('gloo' on CPU, 'nccl' on GPUs) on every rank first (e.g. under torchrun)"
        )
    world = dist.get_world_size()
    rank = dist.get_rank()
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        dev = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(dev, (world,), mesh_dim_names=("ulysses",))
    names = mesh.mesh_dim_names
    if not names:
        raise ConfigError(
            "cpfx: the device mesh has no dim names; create it with "
            "mesh_dim_names=('ulysses',), ('ring',) or ('ring', 'ulysses')"
        )
    unknown = [n for n in names if n not in KNOWN_DIMS]
    if unknown:
        raise ConfigError(
            f"cpfx: unknown mesh dim name(s) {unknown}; use 'ulysses' and/or 'ring' "
            f"(got mesh_dim_names={tuple(names)})"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"cpfx: mesh dim names repeat: {tuple(names)}")
    if mesh.size() != world:
        raise ConfigError(
            f"cpfx: the mesh has {mesh.size()} devices but the process group has {world} ranks; "
            "context parallelism spans the whole group: build the mesh over all ranks"
        )
    sizes = dict(zip(names, mesh.shape))
    if names == ("ulysses", "ring"):
        raise ConfigError(
            "cpfx: order the mesh dims as ('ring', 'ulysses'): Ulysses is the inner dim"
        )
    flat = mesh.mesh.flatten().tolist()
    if flat != list(range(world)):
        raise ConfigError(f"cpfx: the mesh must list ranks 0..{world - 1} in order; got {flat}")
    here = mesh.get_coordinate()
    assert here is not None  # the mesh lists every rank: checked above
    coord = dict(zip(names, here))
    U, R = sizes.get("ulysses", 1), sizes.get("ring", 1)
    u, r = coord.get("ulysses", 0), coord.get("ring", 0)
    if r * U + u != rank:
        raise ConfigError(f"cpfx: unexpected mesh coordinates {coord} for rank {rank}")
    ring_ranks = tuple(rr * U + u for rr in range(R))
    group = lambda n: mesh.get_group(n).group_name if n in sizes and sizes[n] > 1 else ""  # noqa: E731
    check_group = None
    if config.check_collectives or config.check_inputs != "never":
        from cpfx.rankcheck import check_group as cpfx_check_group

        # cpfx's own gloo group, created once per set of ranks and reused by every model.
        check_group = cpfx_check_group(range(world), config.timeout_s)
    assert dist.group.WORLD is not None  # initialized: checked above
    return MeshInfo(
        world=world,
        cp_rank=rank,
        cp_group=dist.group.WORLD.group_name,
        ulysses=U,
        ring=R,
        ulysses_index=u,
        ring_index=r,
        ulysses_group=group("ulysses"),
        ring_group=group("ring"),
        ring_ranks=ring_ranks,
        device_type=mesh.device_type,
        check_group=check_group,
    )
