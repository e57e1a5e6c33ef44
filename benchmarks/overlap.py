"""Overlapped vs. in-order schedule of one attention block (`ParallelConfig(async_qkv=...)`), and
Q, K, V in one all-to-all (`ParallelConfig(qkv_all_to_all="one")`).

    python benchmarks/overlap.py [--world 2] [--block single|double] [--tokens 4096] [--json out.json]
    python benchmarks/overlap.py --device cuda --backend nccl --world 2   # one GPU per rank
    python benchmarks/overlap.py --device cuda --backend gloo --world 2   # ranks share GPU 0
    python benchmarks/overlap.py ... --dtype bfloat16 --compile           # bf16, through inductor

A tiny diffusers Flux with one block (the single-stream block computes its MLP independently of attention,
so the output all-to-all can hide behind it; the double-stream block overlaps Q's all-to-all with
the K/V projections) is parallelized three times on every rank: async_qkv=False (each all-to-all waited right after
it starts), async_qkv=True (the overlap pass), both with one all-to-all each for Q, K and V; and
one all-to-all for Q, K and V together (overlap pass on: only the output's can overlap). All are
checked against the single-process block (same device and dtype), then called in turns A B C C B A ...; a call's time is
the slowest rank's (ranks start together after a barrier). Median of `--repeats` calls each.

On a 2-core CPU machine the gloo threads compete with compute for the same cores, so little or
no gain is expected there; the numbers that matter come from GPUs (communication on NCCL's or
gloo's side while the GPU computes).
"""

from __future__ import annotations

import argparse
import copy
import functools

import torch
from _common import medians_in_turns, parser, write_json

from cpfx.testing.launch import spawn_ranks


def build(args: argparse.Namespace, device: str):
    """Tiny Flux with one block of the chosen kind (plus its embedders and output projection), in
    `--dtype` on `device`."""
    from cpfx.testing import tiny

    return tiny.build(
        "flux",
        device=device,
        dtype=getattr(torch, args.dtype),
        img=args.tokens,
        txt=args.txt,
        heads=args.heads,
        head_dim=args.head_dim,
        layers=int(args.block == "double"),
        single=int(args.block == "single"),
    )


def _rank(rank: int, world: int, q, args: argparse.Namespace, ref) -> None:
    torch.set_num_threads(args.threads)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import cpfx

    device = args.device
    if device == "cuda":
        device = f"cuda:{rank % torch.cuda.device_count()}" if args.backend == "nccl" else "cuda:0"
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=args.world)
    mesh = init_device_mesh(device.split(":")[0], (args.world,), mesh_dim_names=("ulysses",))
    block, inputs = build(args, device)
    variants = {
        "in_order": {"async_qkv": False, "qkv_all_to_all": "three"},
        "overlapped": {"async_qkv": True, "qkv_all_to_all": "three"},
        "one_qkv": {"async_qkv": True, "qkv_all_to_all": "one"},
    }
    models = {name: copy.deepcopy(block) for name in variants}
    for name, m in models.items():
        cpfx.parallelize(m, mesh, cpfx.ParallelConfig(compile=args.compile, **variants[name]))
    cpfx.reset_counters()

    def call(m):
        out = m(**inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    with torch.no_grad():
        errs = {}
        for name, m in models.items():
            out = call(m)  # first call compiles
            errs[name] = (out[0].float().cpu() - ref).abs().max().item()
        if cpfx.counters["lower_attention"]["ulysses"] != len(models):
            raise RuntimeError(f"expected one rewritten attention per copy: {dict(cpfx.counters)}")
        median_s = medians_in_turns(
            {name: functools.partial(call, m) for name, m in models.items()},
            args.repeats,
            args.warmup,
        )
    if rank == 0:
        q.put({"max_abs_vs_single": errs, "median_s": median_s})
    dist.destroy_process_group()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--block", choices=["single", "double"], default="single")
    p.add_argument("--tokens", type=int, default=4096, help="image tokens")
    p.add_argument("--txt", type=int, default=256, help="text tokens")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--compile", action="store_true", help="ParallelConfig(compile=True): inductor")
    args = p.parse_args()

    block, inputs = build(args, args.device)
    with torch.no_grad():
        ref = block(**inputs)[0].float().cpu()
    del block, inputs
    if args.device == "cuda":
        torch.cuda.empty_cache()
    r = spawn_ranks(_rank, args.world, args, ref)
    r["config"] = vars(args)
    med = r["median_s"]
    print(
        f"Flux {args.block}-stream block, {args.tokens}+{args.txt} tokens, {args.heads} heads x "
        f"{args.head_dim}, {args.world} ranks ({args.device}, {args.backend}, {args.dtype}"
        f"{', inductor' if args.compile else ''}, {args.threads} thread(s))"
    )
    for name in ("in_order", "overlapped", "one_qkv"):
        print(
            f"  {name:<11} {med[name] * 1e3:8.2f} ms   {med[name] / med['in_order']:.3f}x in_order"
            f"   max |out - single process| {r['max_abs_vs_single'][name]:.2e}"
        )
    write_json(args.json, r)


if __name__ == "__main__":
    main()
