"""cpfx demo: a tiny diffusers Flux at a few thousand tokens on N gloo ranks.

Prints the max difference to the single-process output, the time per forward of both, and the
bytes each rank sends per forward.

    python examples/demo.py                 # N=2, Ulysses
    python examples/demo.py --world 4 --mesh ring --rotate p2p
"""

from __future__ import annotations

import argparse
import time

import torch

from cpfx.measure import median_time
from cpfx.testing import tiny
from cpfx.testing.launch import spawn_ranks


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The tiny random Flux of cpfx's tests (`cpfx.testing.tiny`) at the demo's sizes."""
    return tiny.build(
        "flux",
        img=args.image_tokens,
        txt=args.text_tokens,
        heads=args.heads,
        head_dim=args.head_dim,
        layers=args.layers,
        single=args.layers,
    )


def single_process(args: argparse.Namespace) -> tuple[torch.Tensor, float, int]:
    """The reference: best of 1 and 2 intra-op threads (2 can be slower on a busy 2-core box)."""
    model, inputs = build(args)
    best = (float("inf"), 0)
    with torch.no_grad():
        out = model(**inputs)[0]
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t = median_time(lambda: model(**inputs), args.repeats)
            best = min(best, (t, threads))
    return out, best[0], best[1]


def rank_main(rank: int, world: int, q, args: argparse.Namespace, ref: torch.Tensor) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import cpfx

    dist.init_process_group("gloo", rank=rank, world_size=world)
    if args.mesh == "usp":
        mesh = init_device_mesh("cpu", (2, args.world // 2), mesh_dim_names=("ring", "ulysses"))
    else:
        mesh = init_device_mesh("cpu", (args.world,), mesh_dim_names=(args.mesh,))
    model, inputs = build(args)
    cpfx.parallelize(model, mesh, cpfx.ParallelConfig(ring_rotate=args.rotate, fp8_comm=args.fp8))
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(**inputs)[0]
        compile_s = time.perf_counter() - t0
        dist.barrier()
        t = median_time(lambda: model(**inputs), args.repeats)
    if rank == 0:
        q.put(
            {
                "max_abs": (out - ref).abs().max().item(),
                "time": t,
                "compile_s": compile_s,
                "sent_bytes": cpfx.sent_bytes_per_call(model),
            }
        )
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--mesh", choices=["ulysses", "ring", "usp"], default="ulysses")
    p.add_argument("--rotate", choices=["p2p", "allgather"], default="p2p")
    p.add_argument("--fp8", action="store_true", help="FP8 all-to-all for Q/V/O")
    p.add_argument("--image-tokens", type=int, default=2048)
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    ref, t_single, threads = single_process(args)
    r = spawn_ranks(rank_main, args.world, args, ref)
    tokens = args.image_tokens + args.text_tokens
    print(
        f"cpfx demo: FluxTransformer2DModel (tiny, random), {tokens} tokens, "
        f"{args.world} gloo ranks, mesh={args.mesh}"
        + (f", rotate={args.rotate}" if args.mesh != "ulysses" else "")
    )
    print(f"  max |cpfx - single process|   {r['max_abs']:.3e}")
    print(
        f"  single process forward        {t_single * 1e3:8.1f} ms  ({threads} thread(s), best of 1 and 2)"
    )
    print(
        f"  cpfx forward ({args.world} ranks x 1 thread) {r['time'] * 1e3:8.1f} ms  "
        f"(ratio {t_single / r['time']:.2f}x; first call incl. capture {r['compile_s']:.1f} s)"
    )
    print(f"  bytes sent per rank/forward   {r['sent_bytes'] / 1e6:8.2f} MB")
    ok = r["max_abs"] <= 1e-4
    print("  parity:", "OK" if ok else "MISMATCH")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
