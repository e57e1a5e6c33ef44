"""check_collectives: every rank must issue the same collectives in the same order.

Preconditions: the final graph (runs after every pass that adds or reorders collectives).
Postconditions: the graph is unchanged. Each rank's sequence of (collective kind, group, role) is
exchanged once per compile over a gloo group with a timeout; a mismatch raises
`RankDivergenceError` with the first differing position on every rank, instead of a hang later.
Shard sizes may legitimately differ between ranks (uneven sequences), so sizes are not compared.
"""

from __future__ import annotations

import datetime
import hashlib
import logging

import torch.distributed as dist
import torch.fx as fx

from cpfx.context import PassContext
from cpfx.debug import collective_nodes, counters
from cpfx.errors import RankDivergenceError

log = logging.getLogger(__name__)
PASS = "check_collectives"


def collective_sequence(gm: fx.GraphModule, ctx: PassContext) -> list[str]:
    """(kind[mesh dim](role)) per collective; group names differ between sub-groups, dims don't."""
    dims = {ctx.ulysses_group: "ulysses", ctx.ring_group: "ring", ctx.cp_group: "cp"}
    out = []
    for n in collective_nodes(gm):
        name = str(n.target).replace("_c10d_functional.", "").replace(".default", "")
        group = next((a for a in n.args if isinstance(a, str)), "ring")
        out.append(f"{name}[{dims.get(group, group)}]({n.meta.get('cpfx_role', '')})")
    return out


def _group_size(n: fx.Node, ctx: PassContext) -> int:
    if "ring_send_recv" in str(n.target):
        return 2
    group = next((a for a in n.args if isinstance(a, str)), "")
    return {ctx.ulysses_group: ctx.ulysses, ctx.ring_group: ctx.ring}.get(group, ctx.world)


def sent_bytes(gm: fx.GraphModule, ctx: PassContext) -> list[tuple[str, str, int]]:
    """(kind, role, bytes this rank sends) per collective, from the local shapes in the graph.

    all_to_all: everything but the part kept locally; all_gather: the local block to each peer;
    ring send/recv: the whole block."""
    out = []
    for n in collective_nodes(gm):
        x = n.args[0].meta.get("val")
        nbytes = x.numel() * x.element_size()
        kind = str(n.target).replace("_c10d_functional.", "").replace(".default", "")
        g = _group_size(n, ctx)
        if "all_to_all" in kind:
            in_splits = n.args[2]
            rows = x.shape[0]
            idx = ctx.ulysses_index if g == ctx.ulysses else ctx.cp_rank
            kept = in_splits[idx] if in_splits else rows // g
            nbytes = nbytes * (rows - kept) // max(rows, 1)
        elif "all_gather" in kind:
            nbytes = nbytes * (g - 1)
        out.append((kind, n.meta.get("cpfx_role", ""), int(nbytes)))
    return out


def fingerprint(seq: list[str]) -> str:
    return hashlib.sha256("\n".join(seq).encode()).hexdigest()[:16]


def compare(seqs: list[list[str]]) -> str | None:
    """A readable description of the first difference between ranks' sequences, or None."""
    ref = seqs[0]
    for r, seq in enumerate(seqs[1:], start=1):
        if seq == ref:
            continue
        for i in range(max(len(ref), len(seq))):
            a = ref[i] if i < len(ref) else "<end>"
            b = seq[i] if i < len(seq) else "<end>"
            if a != b:
                return (
                    f"collective #{i}: rank 0 issues {a}, rank {r} issues {b} "
                    f"(rank 0 has {len(ref)} collectives, rank {r} has {len(seq)})"
                )
    return None


def check_collectives_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    seq = collective_sequence(gm, ctx)
    gm.meta["cpfx_collectives"] = seq
    gm.meta["cpfx_sent_bytes"] = sent_bytes(gm, ctx)
    counters[PASS]["collectives"] += len(seq)
    if ctx.check_group is None or ctx.world == 1:
        return gm
    seqs: list[list[str] | None] = [None] * ctx.world
    try:
        dist.all_gather_object(seqs, seq, group=ctx.check_group)
    except RuntimeError as e:  # a peer died or stalled past the group's timeout
        raise RankDivergenceError(
            f"check_collectives: exchanging collective fingerprints failed within "
            f"{ctx.config.timeout_s:.0f}s (a rank died, stalled, or compiled a different graph): {e}"
        ) from e
    diff = compare(seqs)
    if diff:
        raise RankDivergenceError(
            f"check_collectives: ranks would issue different collectives in graph {ctx.graph_id}; "
            f"{diff}. Every rank must call the model with the same inputs and config."
        )
    counters[PASS]["checked"] += 1
    return gm


def make_check_group(ranks: list[int], timeout_s: float) -> dist.ProcessGroup:
    return dist.new_group(ranks, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
