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

KNOWN_DIMS = ("dp", "batch", "ring", "ulysses")
"""In this order, outermost first: `dp` (data parallel: different samples per slice, each slice its
own context-parallel group), `batch` (the rows of one call's batch split across ranks, the output
gathered), `ring`, `ulysses`."""


@dataclasses.dataclass(frozen=True)
class MeshInfo:
    world: int
    """Ranks of this rank's context-parallel group (the mesh without its `dp` dim)."""
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
    dp: int = 1
    dp_index: int = 0
    cp_ranks: tuple[int, ...] = ()
    """Global ranks of the context-parallel group, in its order."""
    split: str = "tokens"
    """What the group splits: "tokens" (the attention sequence: `ring`, `ulysses`) or "batch"
    (the batch dim of attention and of everything that carries it: a `batch` mesh dim)."""


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
            f"cpfx: unknown mesh dim name(s) {unknown}; use 'ulysses' and/or 'ring' (the "
            "sequence) or 'batch' (the batch rows), with 'dp' outermost for data parallelism "
            f"(got mesh_dim_names={tuple(names)})"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"cpfx: mesh dim names repeat: {tuple(names)}")
    if mesh.size() != world:
        raise ConfigError(
            f"cpfx: the mesh has {mesh.size()} devices but the process group has {world} ranks; "
            "build the mesh over all ranks (a 'dp' dim for data parallelism)"
        )
    sizes = dict(zip(names, mesh.shape))
    if list(names) != [n for n in KNOWN_DIMS if n in names]:
        raise ConfigError(
            f"cpfx: order the mesh dims as {tuple(n for n in KNOWN_DIMS if n in names)} "
            f"(got {tuple(names)}): 'dp' outermost, Ulysses the inner dim"
        )
    flat = mesh.mesh.flatten().tolist()
    if flat != list(range(world)):
        raise ConfigError(f"cpfx: the mesh must list ranks 0..{world - 1} in order; got {flat}")
    if "batch" in sizes and ("ring" in sizes or "ulysses" in sizes):
        raise ConfigError(
            f"cpfx: a 'batch' mesh dim is not yet combined with 'ring' or 'ulysses' (got "
            f"mesh_dim_names={tuple(names)}); use a 1-D ('batch',) mesh (with 'dp' outside it), "
            "or split the sequence only"
        )
    here = mesh.get_coordinate()
    assert here is not None  # the mesh lists every rank: checked above
    coord = dict(zip(names, here))
    U, R, D = sizes.get("ulysses", 1), sizes.get("ring", 1), sizes.get("dp", 1)
    u, r, d = coord.get("ulysses", 0), coord.get("ring", 0), coord.get("dp", 0)
    if "batch" in sizes:  # the batch dim takes the place of the sequence dims (checked above)
        U, u = sizes["batch"], coord["batch"]
    cp_world = R * U
    base = d * cp_world
    if base + r * U + u != rank:
        raise ConfigError(f"cpfx: unexpected mesh coordinates {coord} for rank {rank}")
    cp_ranks = tuple(range(base, base + cp_world))
    ring_ranks = tuple(base + rr * U + u for rr in range(R))
    # The graphs' collectives run on cpfx's own groups (timeout timeout_s), one per set of ranks:
    # the mesh's groups and the user's keep their timeouts (cpfx.rankcheck.graph_group).
    from cpfx.rankcheck import graph_group

    def group(n: str) -> str:
        if sizes.get(n, 1) == 1:
            return ""
        return graph_group(dist.get_process_group_ranks(mesh.get_group(n)), config.timeout_s)

    cp_group = graph_group(cp_ranks, config.timeout_s)
    check_group = None
    if config.check_collectives or config.check_inputs != "never":
        from cpfx.rankcheck import check_group as cpfx_check_group

        # cpfx's own gloo group, created once per set of ranks and reused by every model.
        check_group = cpfx_check_group(cp_ranks, config.timeout_s)
    return MeshInfo(
        world=cp_world,
        cp_rank=rank - base,
        cp_group=cp_group,
        ulysses=1 if "batch" in sizes else U,
        ring=R,
        ulysses_index=0 if "batch" in sizes else u,
        ring_index=r,
        ulysses_group=group("ulysses"),
        ring_group=group("ring"),
        ring_ranks=ring_ranks,
        device_type=mesh.device_type,
        check_group=check_group,
        dp=D,
        dp_index=d,
        cp_ranks=cp_ranks,
        split="batch" if "batch" in sizes else "tokens",
    )
