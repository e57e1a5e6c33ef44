"""Graph-structure tests in one process (fake process group): what cpfx inserts, and where."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

import cpfx
from cpfx.graph_utils import sdpa_args
from tests.graphs import rewrite, roles


def order(gm):
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def test_flux_ulysses_one_all_to_all_per_q_k_v_o():
    (gm,) = rewrite("flux", world=4, qkv_all_to_all="three")
    c = collections.Counter(roles(gm))
    n_attn = cpfx.counters["lower_attention"]["ulysses"]
    assert n_attn == 2  # one double-stream block, one single-stream block
    assert c == {"q": n_attn, "k": n_attn, "v": n_attn, "o": n_attn}
    gm.graph.lint()
    assert not [n for n in gm.graph.nodes if "sharded_attention" in str(n.target)]


def test_flux_ulysses_q_k_v_in_one_all_to_all():
    """Small payloads (qkv_all_to_all="auto"): Q, K and V travel together, rows [S, B, h, 3 * D]."""
    (gm,) = rewrite("flux", world=4)
    assert collections.Counter(roles(gm)) == {"qkv": 2, "o": 2}
    for n in gm.graph.nodes:
        if n.meta.get("cpfx_role") == "qkv" and n.meta.get("cpfx_collective"):
            assert n.args[0].meta["val"].shape[-1] == 3 * 16  # head_dim 16


@pytest.mark.parametrize(
    "mode, async_qkv, tokens, one",
    [
        ("auto", True, 2176, True),  # 1088 tokens * 2 heads * 16 * 4 bytes per rank: 139 KB
        ("auto", True, 8192, False),  # 4096 per rank: 524 KB, over 512 KiB: Q goes alone
        ("auto", True, 8191, False),  # sizes per rank rounded up: every rank decides the same
        ("auto", False, 8192, True),  # nothing to overlap with
        ("one", True, 8192, True),
        ("three", True, 16, False),
    ],
)
def test_one_qkv_transfer_choice(mode, async_qkv, tokens, one):
    from types import SimpleNamespace

    from cpfx.passes.lower_attention import one_qkv_transfer

    site = SimpleNamespace(
        q_layout=SimpleNamespace(size=tokens), batch=1, heads=2, head_dim=16, dtype=torch.float32
    )
    ctx = SimpleNamespace(
        config=SimpleNamespace(qkv_all_to_all=mode, async_qkv=async_qkv),
        mesh=SimpleNamespace(world=2),
    )
    assert one_qkv_transfer(site, ctx) is one


def test_wan_cross_attention_has_no_collectives():
    (gm,) = rewrite("wan", world=4, model_kwargs={"txt": 5}, qkv_all_to_all="three")
    assert cpfx.counters["shard_tokens"]["attention_local"] == 2  # attn2 of both blocks
    assert collections.Counter(roles(gm)) == {"q": 2, "k": 2, "v": 2, "o": 2}
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    # Cross-attention stays one local SDPA per block: queries are this rank's 32/4 tokens,
    # keys the 5 replicated text tokens.
    cross = [sdpa_args(n.args, n.kwargs) for n in sdpa if "cpfx_pass" not in n.meta]
    assert len(cross) == 2
    for a in cross:
        assert a["key"].meta["val"].shape[2] == 5
        assert a["query"].meta["val"].shape[2] == 8


def test_qwen_mask_stays_replicated_and_is_indexed():
    (gm,) = rewrite("qwen", world=2)
    assert cpfx.counters["shard_tokens"]["attention_sharded"] == 2
    assert cpfx.counters["shard_tokens"]["gather"] == 1  # only the output


def test_uneven_local_shapes_differ_per_rank():
    shapes = []
    for rank in (0, 1):  # rank 2 holds what rank 1 does
        kw = {"img": 64, "txt": 7}
        (gm,) = rewrite("flux", world=3, rank=rank, model_kwargs=kw, qkv_all_to_all="three")
        ph = [n for n in gm.graph.nodes if n.meta.get("cpfx_role") == "q"][0]
        shapes.append(tuple(ph.args[0].meta["val"].shape))
    # 64 image tokens -> 22, 21, 21; 7 text tokens -> 3, 2, 2; heads padded 2 -> 3 before the all-to-all
    assert [s[0] for s in shapes] == [3 * 25, 3 * 23]


def test_backend_found_by_name():
    from torch._dynamo.backends.registry import lookup_backend

    assert "cpfx" in torch._dynamo.list_backends(exclude_tags=())
    assert lookup_backend("cpfx").__name__ == "cpfx_backend"


def test_dumps_written(tmp_path: Path):
    rewrite("flux", world=2, dump_dir=str(tmp_path), qkv_all_to_all="three")
    files = sorted(p.name for p in (tmp_path / "rank0" / "graph0").iterdir())
    assert files[0] == "00_captured.py"
    assert "01_shard_tokens.py" in files and "02_lower_attention.py" in files
    text = (tmp_path / "rank0" / "graph0" / "02_lower_attention.py").read_text()
    assert (
        text.startswith("# pass 2: lower_attention")
        and "collectives 1 -> 9" in text.splitlines()[0]
    )
    assert "all_to_all_single" in text


def _upstream_linear(node):
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if a.target is torch.ops.aten.linear.default:
                return a
            stack.append(a)
    raise AssertionError(f"no linear upstream of {node}")


def _q_transfers_overlap_k_v(gm: torch.fx.GraphModule) -> int:
    """Check each Q all-to-all starts before the K projection and is waited after the V
    projection; return how many were checked."""
    pos = order(gm)
    starts = {
        r: [
            n
            for n in gm.graph.nodes
            if n.meta.get("cpfx_collective") == "all_to_all" and n.meta.get("cpfx_role") == r
        ]
        for r in "qkvo"
    }
    waits = {r: [n for n in gm.graph.nodes if n.meta.get("cpfx_wait") == r] for r in "qkvo"}
    for q, k, v, qw in zip(starts["q"], starts["k"], starts["v"], waits["q"]):
        k_proj, v_proj = _upstream_linear(k), _upstream_linear(v)
        assert pos[q] < pos[k_proj], "Q's all-to-all must start before the K projection"
        assert pos[qw] > pos[v_proj], "Q's all-to-all must be waited after the V projection"
    return len(starts["q"])


@pytest.mark.parametrize("model", ["flux", "qwen", "wan", "z_image"])
def test_async_qkv_order(model):
    # Z-Image is captured as several graphs
    checked = sum(map(_q_transfers_overlap_k_v, rewrite(model, world=2, qkv_all_to_all="three")))
    assert checked >= 2
    assert cpfx.counters["overlap"]["hoisted"] >= 3


def test_async_qkv_order_in_regional_block_graphs():
    """The overlap schedule holds in regional block graphs, those taking token shards too."""
    from cpfx.testing.tiny import build
    from tests.graphs import fake_world

    torch._dynamo.reset()
    m, kw = build("flux", layers=2, single=2)
    cfg = cpfx.ParallelConfig(regional=True, qkv_all_to_all="three", check_collectives=False)
    with fake_world(2), torch.no_grad():
        from torch.distributed.device_mesh import init_device_mesh

        cpfx.parallelize(m, init_device_mesh("cpu", (2,), mesh_dim_names=("ulysses",)), cfg)
        for _ in range(3):
            m(**kw)
    # double-stream: whole inputs (the first block), shards; single-stream: shards, from either
    # block class (each graph is a whole block, so its shards stay resident from its first run)
    graphs = [g.gm for g in m._cpfx.graphs]
    assert len(graphs) == 3, m._cpfx.recompile_reasons
    assert sum(map(_q_transfers_overlap_k_v, graphs)) == len(graphs)


def test_ring_p2p_transfer_overlaps_block_attention():
    (gm,) = rewrite("flux", world=4, mesh_names=("ring",), ring_rotate="p2p")
    pos = order(gm)
    attn = [n for n in gm.graph.nodes if "flash_attention_for_cpu" in str(n.target)]
    sends = [n for n in gm.graph.nodes if "ring_send_recv" in str(n.target)]
    assert len(attn) == 2 * 4 and len(sends) == 2 * 3
    for i, s in enumerate(sends):
        step_attn = attn[(i // 3) * 4 + i % 3]  # attention of the block resident when s is issued
        (w,) = [u for u in s.users]
        assert pos[s] < pos[step_attn] < pos[w]


def test_async_off_keeps_order():
    (gm,) = rewrite("flux", world=2, async_qkv=False)
    assert "overlap" not in cpfx.counters


def _max_live_kv_blocks(gm):
    """Largest number of K/V ring blocks alive at once, from the graph's def/last-use intervals.

    A block is the packed K/V rows a rank starts with, or a receive buffer of a ring step; a wait
    on a buffer is an alias of it. Measured per attention: blocks of different attentions never
    overlap because each attention's output is needed before the next one starts.
    """
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    sends = [n for n in gm.graph.nodes if "ring_send_recv" in str(n.target)]
    gathers = [
        n
        for n in gm.graph.nodes
        if n.meta.get("cpfx_collective") == "all_gather" and n.meta.get("cpfx_role") == "kv"
    ]
    intervals = []
    for buf in sends + [
        s.args[0]
        for s in sends
        if "ring_send_recv" not in str(s.args[0].target) and "wait" not in str(s.args[0].target)
    ]:
        alias = [buf] + [u for u in buf.users if "wait_tensor" in str(u.target)]
        last = max(pos[u] for a in alias for u in a.users)
        intervals.append((pos[buf], last, 1))
    for g in gathers:  # one all-gather holds every block of the ring at once
        ring = g.args[1]
        alias = [g] + list(g.users)
        intervals.append((pos[g], max(pos[u] for a in alias for u in a.users), ring))
    return max(sum(w for s, e, w in intervals if s <= t <= e) for t in range(len(pos)))


def test_ring_p2p_keeps_two_kv_blocks_resident():
    (p2p,) = rewrite("flux", world=4, mesh_names=("ring",), ring_rotate="p2p")
    (ag,) = rewrite("flux", world=4, mesh_names=("ring",), ring_rotate="allgather")
    assert _max_live_kv_blocks(p2p) == 2
    assert _max_live_kv_blocks(ag) == 4


def test_flux_single_block_mlp_runs_during_output_all_to_all():
    """Flux's single-stream block computes its MLP branch independently of attention: the overlap
    pass defers it between the output all-to-all's start and its wait."""
    (gm,) = rewrite("flux", world=2)
    pos = order(gm)
    o_start = [
        n
        for n in gm.graph.nodes
        if n.meta.get("cpfx_collective") == "all_to_all" and n.meta.get("cpfx_role") == "o"
    ][-1]  # the single-stream block's
    (o_wait,) = [u for u in o_start.users]
    mlp = [
        n
        for n in gm.graph.nodes
        if n.target is torch.ops.aten.linear.default
        and "proj_mlp" in str(n.meta.get("nn_module_stack", ""))
    ]
    assert mlp and all(pos[o_start] < pos[n] < pos[o_wait] for n in mlp)
    assert cpfx.counters["overlap"]["deferred"] > 0


def test_rope_tables_passed_in_are_resliced_not_gathered():
    """A block driven directly gets cos/sin over the joined [txt | img] sequence: split evenly as
    inputs, they meet the joined stream, split per segment, at the RoPE multiply. The tables are
    re-sliced from the replicated inputs with the stream's layout instead of gathering the stream
    (which used to leave the attention unsharded)."""
    (gm,) = rewrite("flux_block", world=2)
    st = cpfx.counters["shard_tokens"]
    assert cpfx.counters["lower_attention"]["ulysses"] == 1
    assert st["reslice"] >= 2 and st["gather"] == 1  # the gather is the output's
