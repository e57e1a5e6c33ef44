"""check_collectives: every rank must issue matching collectives, in one order, of matching sizes.

Preconditions: the final graph (runs after every pass that adds or reorders collectives), with
`meta["val"]` refreshed.
Postconditions: the graph is unchanged; `gm.meta["cpfx_collectives"]` (readable sequence) and
`gm.meta["cpfx_sent_bytes"]` are set.

Each collective becomes a fixed-width int64 record (kind, mesh dim, role, dtype, local input shape,
split sizes, p2p peers). Once per compile the ranks exchange their record counts, then the records,
as tensors over cpfx's gloo check group (no pickle), and every rank runs the same comparison:

    kinds/dims/roles/dtypes equal at each position on every rank
    all_to_all      rank a's input split for b == rank b's output split for a; trailing dims equal
    all_gather      input shapes equal over the group
    ring send/recv  the sender's block shape == the receiver's own block shape (its buffer)

so uneven shards pass and a rank compiled for other shapes raises `RankDivergenceError` on every
rank, naming the ranks and shapes, before any of the graph's collectives runs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from cpfx import rankcheck
from cpfx.context import PassContext
from cpfx.debug import collective_kind, collective_nodes, counters, sent_bytes
from cpfx.errors import RankDivergenceError

log = logging.getLogger(__name__)
PASS = "check_collectives"
MAX_DIMS = 8
DIMS = ("cp", "ulysses", "ring")
# Record layout (int64): kind, dim, role, dtype, ndim, shape[MAX_DIMS], send_to, recv_from, then
# input splits[world], output splits[world]. Codes are 64-bit text hashes; -1 means "none".
_KIND, _DIM, _ROLE, _DTYPE, _NDIM, _SHAPE = 0, 1, 2, 3, 4, 5
_SEND, _RECV = _SHAPE + MAX_DIMS, _SHAPE + MAX_DIMS + 1
_SPLITS = _RECV + 1


def _dim_name(n: fx.Node, ctx: PassContext) -> str:
    if "ring_send_recv" in str(n.target):
        return "ring"
    dims = {ctx.mesh.ulysses_group: "ulysses", ctx.mesh.ring_group: "ring", ctx.mesh.cp_group: "cp"}
    group = next((a for a in n.args if isinstance(a, str)), "")
    return dims.get(group, group or "?")


def collective_sequence(gm: fx.GraphModule, ctx: PassContext) -> list[str]:
    """(kind[mesh dim](role)) per collective; group names differ between sub-groups, dims don't."""
    return [
        f"{collective_kind(n)}[{_dim_name(n, ctx)}]({n.meta.get('cpfx_role', '')})"
        for n in collective_nodes(gm)
    ]


def _code(s: str) -> int:
    return rankcheck.text_hash(s)


def record(n: fx.Node, ctx: PassContext) -> list[int]:
    """The fixed-width int64 record of one collective node."""
    w = ctx.mesh.world
    rec = [-1] * (_SPLITS + 2 * w)
    rec[_KIND] = _code(collective_kind(n))
    dim = _dim_name(n, ctx)
    rec[_DIM] = DIMS.index(dim) if dim in DIMS else _code(dim)
    rec[_ROLE] = _code(str(n.meta.get("cpfx_role", "")))
    x = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
    if isinstance(x, torch.Tensor):
        rec[_DTYPE] = _code(str(x.dtype))
        rec[_NDIM] = x.dim()
        for i, s in enumerate(tuple(x.shape)[:MAX_DIMS]):
            rec[_SHAPE + i] = int(s)
    args: tuple[Any, ...] = n.args
    if "ring_send_recv" in str(n.target):
        rec[_SEND], rec[_RECV] = int(args[1]), int(args[2])
    elif "all_to_all" in collective_kind(n):
        out_splits, in_splits = list(args[1] or ()), list(args[2] or ())
        for i, s in enumerate(in_splits[:w]):
            rec[_SPLITS + i] = int(s)
        for i, s in enumerate(out_splits[:w]):
            rec[_SPLITS + w + i] = int(s)
    return rec


def members(dim: int, rank: int, world: int, ulysses: int, ring: int) -> list[int] | None:
    """Global ranks of `rank`'s group along mesh dim code `dim` (None: not a mesh dim)."""
    if dim == 0:
        return list(range(world))
    if dim == 1:
        return [(rank // ulysses) * ulysses + u for u in range(ulysses)]
    if dim == 2:
        return [r * ulysses + rank % ulysses for r in range(ring)]
    return None


class _Names:
    """Decodes kind/role/dtype/dim codes back to text for messages (codes of this rank's own
    collectives and common names are known)."""

    def __init__(self, gm: fx.GraphModule | None = None) -> None:
        names = {"all_to_all_single", "all_gather_into_tensor", "all_reduce", "cpfx.ring_send_recv"}
        names |= {"q", "k", "v", "qkv", "o", "kv", "gather", "reduce", ""}
        names |= {str(d) for d in (torch.float32, torch.bfloat16, torch.float16, torch.uint8)}
        if gm is not None:
            names |= {collective_kind(n) for n in collective_nodes(gm)}
            names |= {str(n.meta.get("cpfx_role", "")) for n in collective_nodes(gm)}
        self.table = {_code(s): s for s in names}

    def __call__(self, code: int) -> str:
        return self.table.get(int(code), f"<{int(code) & 0xFFFFFFFF:08x}>")


def describe(rec: list[int], names: Any) -> str:
    dim = rec[_DIM]
    d = DIMS[dim] if 0 <= dim < len(DIMS) else names(dim)
    return f"{names(rec[_KIND])}[{d}]({names(rec[_ROLE])})"


def _shape(rec: list[int]) -> list[int] | None:
    nd = rec[_NDIM]
    return None if nd < 0 else [rec[_SHAPE + i] for i in range(min(nd, MAX_DIMS))]


def _splits(rec: list[int], world: int, g: int) -> tuple[list[int], list[int]]:
    ins = [s for s in rec[_SPLITS : _SPLITS + world] if s >= 0]
    outs = [s for s in rec[_SPLITS + world : _SPLITS + 2 * world] if s >= 0]
    shape = _shape(rec)
    rows = shape[0] if shape else 0
    return ins or [rows // g] * g, outs or [rows // g] * g


def find_mismatch(
    recs: list[list[list[int]]], world: int, ulysses: int, ring: int, names: Any = None
) -> str | None:
    """The first inconsistency between ranks' collective records (`recs[rank][i]`), or None.
    Pure function: every rank evaluates it on the same gathered records."""
    names = names or _Names()
    counts = [len(r) for r in recs]
    for i in range(max(counts)):
        here = [r[i] if i < len(r) else None for r in recs]
        ref = here[0]
        for b, rec in enumerate(here[1:], start=1):
            if rec is None or ref is None or rec[:_NDIM] != ref[:_NDIM]:
                a_txt = describe(ref, names) if ref is not None else "<end>"
                b_txt = describe(rec, names) if rec is not None else "<end>"
                return (
                    f"collective #{i}: rank 0 issues {a_txt}, rank {b} issues {b_txt} "
                    f"(rank 0 has {counts[0]} collectives, rank {b} has {counts[b]})"
                )
        msg = _sizes_mismatch(i, here, world, ulysses, ring, names)
        if msg:
            return msg
    return None


def _sizes_mismatch(
    i: int, here: list[Any], world: int, ulysses: int, ring: int, names: Any
) -> str | None:
    what = f"collective #{i} ({describe(here[0], names)})"
    kind = names(here[0][_KIND])
    for a, ra in enumerate(here):
        sa = _shape(ra)
        if sa is None:
            continue
        if "ring_send_recv" in kind:
            b = ra[_SEND]
            if not 0 <= b < world or b == a:
                continue
            sb = _shape(here[b])
            if sb is not None and sb != sa:
                return (
                    f"{what}: rank {a} sends a block of shape {sa} to rank {b}, whose own block "
                    f"(and receive buffer) has shape {sb}"
                )
            if here[b][_RECV] != a:
                return f"{what}: rank {a} sends to rank {b}, which receives from {here[b][_RECV]}"
            continue
        group = members(ra[_DIM], a, world, ulysses, ring)
        if group is None:
            continue
        for b in group:
            sb = _shape(here[b])
            if sb is None or b == a:
                continue
            if ("all_gather" in kind or "all_reduce" in kind) and sa != sb:
                return f"{what}: rank {a} contributes shape {sa}, rank {b} shape {sb}"
            if "all_to_all" in kind:
                ins_a, _ = _splits(ra, world, len(group))
                _, outs_b = _splits(here[b], world, len(group))
                ia, ib = group.index(a), group.index(b)
                if sa[1:] != sb[1:] or ins_a[ib] != outs_b[ia]:
                    return (
                        f"{what}: rank {a} sends {ins_a[ib]} rows of {sa[1:]} to rank {b}, which "
                        f"expects {outs_b[ia]} rows of {sb[1:]} (rank {a} input {sa}, rank {b} "
                        f"input {sb})"
                    )
    return None


def exchange_records(recs: list[list[int]], ctx: PassContext, width: int) -> list[list[list[int]]]:
    """Every rank's records, gathered as two int64 tensors (counts, then padded records)."""
    mesh = ctx.mesh
    tag = f"check_collectives/{ctx.graph_id}"
    what = f"check_collectives (graph {ctx.graph_id}): exchanging collective schedules"

    def gather(t: torch.Tensor, tag: str) -> torch.Tensor:
        return rankcheck.all_gather(
            t, mesh.check_group, mesh.world, ctx.config.timeout_s, what, tag
        )

    rankcheck.mark_exchanged()
    counts = gather(torch.tensor([len(recs)]), tag)
    failed = [r for r in range(mesh.world) if int(counts[r, 0]) < 0]
    if failed:
        raise RankDivergenceError(
            f"check_collectives: rank(s) {failed} failed to compile graph {ctx.graph_id} (the "
            "error is raised there); this rank stops too instead of waiting for them."
        )
    longest = int(counts.max())
    if longest == 0:
        return [[] for _ in range(mesh.world)]
    mine = torch.full((longest, width), -1, dtype=torch.int64)
    if recs:
        mine[: len(recs)] = torch.tensor(recs, dtype=torch.int64)
    rows = gather(mine.reshape(-1), tag + "/r").reshape(mesh.world, longest, width).tolist()
    return [rows[r][: int(counts[r, 0])] for r in range(mesh.world)]


def check_collectives_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    mesh = ctx.mesh
    seq = collective_sequence(gm, ctx)
    gm.meta["cpfx_collectives"] = seq
    gm.meta["cpfx_sent_bytes"] = sent_bytes(gm, mesh)
    counters[PASS]["collectives"] += len(seq)
    if mesh.check_group is None or mesh.world == 1:
        return gm
    recs = [record(n, ctx) for n in collective_nodes(gm)]
    width = _SPLITS + 2 * mesh.world
    everyone = exchange_records(recs, ctx, width)
    diff = find_mismatch(everyone, mesh.world, mesh.ulysses, mesh.ring, _Names(gm))
    if diff:
        raise RankDivergenceError(
            f"check_collectives: ranks would issue mismatched collectives in graph "
            f"{ctx.graph_id}; {diff}. Every rank must call the model with the same inputs "
            "(shapes included) and the same config."
        )
    counters[PASS]["checked"] += 1
    return gm
