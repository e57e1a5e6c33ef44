"""Per-call time of a regional model: token shards handed from block to block vs gathered after
every block, next to the whole-model graph, on real gloo ranks.

    python benchmarks/regional.py [--world 2] [--img 1024] [--blocks 4,4] [--repeats 9]

Tiny Flux (`--blocks` double,single), float32, 1 thread per rank. Four copies of the model on
every rank: `ParallelConfig(regional=False)`; `regional=True`; and `regional=True` with every
block graph gathering its outputs (how regional blocks ran before their shards stayed resident:
the runner is told never to keep them); `regional=True, dynamic=True` (sizes captured
symbolically, each graph a static variant). Each is checked against the single process, warmed up
(a block graph that is the whole block keeps its shards from its first run), then called in turns A B C C B A ...;
a call's time is the slowest rank's. Medians of `--repeats` calls each.
"""

from __future__ import annotations

import argparse
import copy
import functools

import torch
from _common import medians_in_turns, parser, write_json

from cpfx.testing.launch import spawn_ranks


def build(args: argparse.Namespace):
    from cpfx.testing import tiny

    double, single = (int(x) for x in args.blocks.split(","))
    return tiny.build(
        "flux", img=args.img, txt=args.txt, heads=args.heads, head_dim=args.head_dim,
        layers=double, single=single,
    )


def _rank(rank: int, world: int, q, args: argparse.Namespace, ref) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import cpfx
    from cpfx import resident

    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ulysses",))
    model, inputs = build(args)
    variants = {
        "whole": {},
        "regional": {"regional": True},
        "regional_gathered": {"regional": True},
        "regional_dynamic": {"regional": True, "dynamic": True},
    }
    models = {k: copy.deepcopy(model) for k in variants}
    for k, m in models.items():
        cpfx.parallelize(m, mesh, cpfx.ParallelConfig(**variants[k]))

    wrap = resident.wrap_outputs
    gathered = {"on": False}

    def wrap_outputs(out, layouts, group, keep):  # type: ignore[no-untyped-def]
        return wrap(out, layouts, group, keep and not gathered["on"])

    resident.wrap_outputs = wrap_outputs

    def call(name: str) -> torch.Tensor:
        gathered["on"] = name == "regional_gathered"
        return models[name](**inputs)[0]

    errs = {}
    with torch.no_grad():
        for name in models:
            for _ in range(3):  # compile, then let the block graphs keep their shards
                out = call(name)
            errs[name] = (out - ref).abs().max().item()
        median_s = medians_in_turns(
            {name: functools.partial(call, name) for name in models}, args.repeats
        )
        cpfx.reset_counters()
        call("regional")
        per_call = dict(cpfx.counters["resident"])
    if rank == 0:
        q.put(
            {
                "max_abs_vs_single": errs,
                "median_ms": {k: v * 1e3 for k, v in median_s.items()},
                "regional_per_call": per_call,
            }
        )
    dist.destroy_process_group()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--img", type=int, default=1024, help="image tokens")
    p.add_argument("--txt", type=int, default=64, help="text tokens")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--blocks", default="4,4", help="double,single")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, inputs = build(args)
    with torch.no_grad():
        ref = model(**inputs)[0]
    r = spawn_ranks(_rank, args.world, args, ref)
    r["config"] = vars(args)
    med = r["median_ms"]
    print(
        f"tiny Flux {args.blocks} blocks, {args.img}+{args.txt} tokens, {args.heads} heads x "
        f"{args.head_dim}, {args.world} gloo ranks x 1 thread (ms per call, medians of "
        f"{args.repeats}):"
    )
    for k, v in med.items():
        print(
            f"  {k:<18} {v:8.2f}  {v / med['whole']:.3f}x whole   max |out - single| "
            f"{r['max_abs_vs_single'][k]:.1e}"
        )
    print(f"  regional, one call: {r['regional_per_call']} (shards handed on / gathered)")
    write_json(args.json, r)


if __name__ == "__main__":
    main()
