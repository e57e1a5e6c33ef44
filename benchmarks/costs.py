"""cpfx's own costs on CPU/gloo: bytes vs formula, scaling, parallelize cost, per-call overhead, memory.

    python benchmarks/costs.py [--json out.json] [--quick]

1. Bytes per forward per rank, counted from the rewritten graphs (`cpfx.explain`, one process,
   fake group), vs the closed-form formula, for Ulysses, ring, USP and FP8.
2. Scaling: single process (best of 1 and 2 intra-op threads) vs N ranks x 1 thread.
3. Cost of `parallelize`: first call (Dynamo capture + cpfx passes) vs a plain Dynamo capture.
4. Steady-state overhead per call: the Dynamo guards and cpfx's call wrapper, timed with the
   rewritten graph swapped for a stub (one process, fake process group).
5. Peak memory per rank vs the single process: bytes allocated during one forward above what was
   live before it (`cpfx.measure.peak_bytes`: the profiler's allocation events; weights and
   inputs, identical on every rank, are reported separately).
"""

from __future__ import annotations

import time

import torch
from _common import environment, parser, write_json

from cpfx.measure import median_time, peak_bytes
from cpfx.testing.launch import spawn_ranks

FLUX = dict(img=2048, txt=256, heads=4, head_dim=64, layers=2, single=2)
QUICK = dict(img=512, txt=64, heads=4, head_dim=32, layers=1, single=1)


def formula(kind, s, n, b=1, h=4, d=64, el=4, blocks=2, fp8=False, r=2):
    """Bytes one rank sends per forward for `blocks` attentions over `s` tokens on `n` ranks."""
    per = b * h * (s / n) * d * el  # one local [B, H, S/N, D] tensor
    row = (d + 4) / (d * el)  # FP8 bytes per element relative to the model dtype
    if kind == "ulysses":
        qvo = 3 * per * (row if fp8 else 1)
        return blocks * (qvo + per) * (n - 1) / n
    if kind == "ring":  # p2p: n-1 steps, K and V of one block each
        return blocks * (n - 1) * 2 * per
    if (
        kind == "usp"
    ):  # Ulysses over u = n / r on S/N tokens, ring over r blocks of S/r tokens, H/u heads
        u = n // r
        return blocks * (4 * per * (u - 1) / u + (r - 1) * 2 * b * (h / u) * (s / r) * d * el)
    raise ValueError(kind)


def bytes_table(cfg):
    from cpfx import ParallelConfig
    from cpfx.explain import explain
    from cpfx.testing import tiny

    s = cfg["img"] + cfg["txt"]
    blocks = cfg["layers"] + cfg["single"]
    rows = []
    for kind, n, names, shape, fp8, dt in [
        ("ulysses", 2, ("ulysses",), (2,), False, torch.float32),
        ("ulysses", 4, ("ulysses",), (4,), False, torch.float32),
        ("ring", 4, ("ring",), (4,), False, torch.float32),
        ("usp", 4, ("ring", "ulysses"), (2, 2), False, torch.float32),
        ("ulysses", 4, ("ulysses",), (4,), True, torch.bfloat16),
    ]:
        m, kw = tiny.build("flux", dtype=dt, **cfg)
        rep = explain(
            m,
            None,
            ParallelConfig(fp8_comm=fp8),
            world=n,
            mesh_shape=shape,
            mesh_dim_names=names,
            print_table=False,
            **kw,
        )
        counted = sum(b for k, _, b in rep.collectives if k != "all_gather_into_tensor")
        el = 2 if dt == torch.bfloat16 else 4
        expect = formula(
            kind, s, n, h=cfg["heads"], d=cfg["head_dim"], el=el, blocks=blocks, fp8=fp8
        )
        rows.append(
            {
                "strategy": kind + ("+fp8" if fp8 else ""),
                "n": n,
                "dtype": str(dt),
                "counted_MB": counted / 1e6,
                "formula_MB": expect / 1e6,
            }
        )
    return rows


def _rank(rank, world, q, cfg, repeats):
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import cpfx
    from cpfx.testing import tiny

    dist.init_process_group("gloo", rank=rank, world_size=world)
    m, kw = tiny.build("flux", **cfg)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ulysses",))
    cpfx.parallelize(m, mesh)
    with torch.no_grad():
        t0 = time.perf_counter()
        m(**kw)
        first = time.perf_counter() - t0
        dist.barrier()
        t_model = median_time(lambda: m(**kw), repeats)
        dist.barrier()
        peak = peak_bytes(lambda: m(**kw))
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    if rank == 0:
        q.put(
            {
                "first_call_s": first,
                "forward_s": t_model,
                "peak_MB_per_rank": [p / 1e6 for p in peaks],
            }
        )
    dist.destroy_process_group()


def overhead(cfg, world, repeats):
    """Per-call cost of calling the parallelized model beyond its rewritten graph: the Dynamo
    guards and cpfx's call wrapper. One process, fake process group of `world` ranks; the graph
    is swapped for a stub returning its last output, so compute noise cannot hide the overhead."""
    import importlib

    import cpfx
    from cpfx.explain import fake_world
    from cpfx.testing import tiny

    be_mod = importlib.import_module("cpfx.backend")
    rec = {"stub": False}
    orig = be_mod.compile_graph

    def recording(*a, **k):
        fn = orig(*a, **k)

        def call(*args):
            if not rec["stub"]:
                rec["fn"], rec["args"] = fn, args
                rec["out"] = fn(*args)
            return rec["out"]

        return call

    m, kw = tiny.build("flux", **cfg)
    torch._dynamo.reset()
    be_mod.compile_graph = recording
    try:
        with fake_world(world), torch.no_grad():
            mesh = torch.distributed.device_mesh.init_device_mesh(
                "cpu", (world,), mesh_dim_names=("ulysses",)
            )
            cpfx.parallelize(m, mesh, cpfx.ParallelConfig(check_collectives=False))
            m(**kw)
            graph = median_time(lambda: rec["fn"](*rec["args"]), 3)
            rec["stub"] = True
            m(**kw)
            stubbed = median_time(lambda: m(**kw), repeats)
    finally:
        be_mod.compile_graph = orig
        torch._dynamo.reset()
    return {"graph_s": graph, "overhead_s": stubbed}


def single(cfg, repeats):
    from cpfx.testing import tiny

    m, kw = tiny.build("flux", **cfg)
    best = None
    with torch.no_grad():
        m(**kw)
        for th in (1, 2):
            torch.set_num_threads(th)
            t = median_time(lambda: m(**kw), repeats)
            best = min(best or (t, th), (t, th))
        torch.set_num_threads(1)
        peak = peak_bytes(lambda: m(**kw))
        torch._dynamo.reset()
        t0 = time.perf_counter()
        torch.compile(m, backend="eager", dynamic=False)(**kw)
        capture = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in m.parameters())
    inputs = sum(v.numel() * v.element_size() for v in kw.values() if torch.is_tensor(v))
    return {
        "forward_s": best[0],
        "threads": best[1],
        "dynamo_capture_s": capture,
        "peak_MB": peak / 1e6,
        "weights_MB": weights / 1e6,
        "inputs_MB": inputs / 1e6,
    }


def main():
    p = parser(__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worlds", default="2,4")
    args = p.parse_args()
    cfg = QUICK if args.quick else FLUX
    out = {"environment": environment(), "config": cfg, "bytes": bytes_table(cfg)}
    print(f"{'strategy':<14}{'N':>3}  {'dtype':<16}{'counted MB':>12}{'formula MB':>12}")
    for r in out["bytes"]:
        print(
            f"{r['strategy']:<14}{r['n']:>3}  {r['dtype']:<16}{r['counted_MB']:>12.3f}{r['formula_MB']:>12.3f}"
        )
    out["single"] = single(cfg, args.repeats)
    s = out["single"]
    print(
        f"\nsingle process: {s['forward_s'] * 1e3:.1f} ms ({s['threads']} thread(s)); plain Dynamo capture "
        f"{s['dynamo_capture_s']:.1f} s; peak during a forward {s['peak_MB']:.1f} MB "
        f"(+ weights {s['weights_MB']:.1f} MB, inputs {s['inputs_MB']:.1f} MB, on every rank too)"
    )
    out["ranks"] = {}
    for world in [int(w) for w in args.worlds.split(",")]:
        r = spawn_ranks(_rank, world, cfg, args.repeats)
        r["overhead"] = o = overhead(cfg, world, 50)
        out["ranks"][world] = r
        print(
            f"N={world}: forward {r['forward_s'] * 1e3:.1f} ms (speedup "
            f"{s['forward_s'] / r['forward_s']:.2f}x), first call {r['first_call_s']:.1f} s "
            f"(capture + passes)\n      per-call overhead (Dynamo guards + cpfx wrapper, graph "
            f"stubbed out; one process, fake group): {o['overhead_s'] * 1e3:.2f} ms"
        )
        peaks = ", ".join(f"{p:.1f}" for p in r["peak_MB_per_rank"])
        print(
            f"      peak during a forward per rank: {peaks} MB "
            f"({max(r['peak_MB_per_rank']) / s['peak_MB']:.2f}x of the single process)"
        )
    write_json(args.json, out)


if __name__ == "__main__":
    main()
