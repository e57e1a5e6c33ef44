"""A performance model of Ulysses context parallelism, checked where it can be measured.

    python benchmarks/perf_model.py [--json out.json] [--quick]
    python benchmarks/perf_model.py --device cuda        # parts 1 and 3 on a GPU (one is enough)

Model: one forward on N ranks takes
    T(N) = T_local(N) + T_comm(N)             (collectives waited in order: upper bound)
    T(N) >= max(T_local(N), T_comm(N))        (perfect overlap: lower bound)
where T_local(N) is one rank's compute on its shard (linear layers on S/N tokens, attention over
all S tokens with H/N heads) and T_comm(N) = bytes sent per rank / link bandwidth.

Part 1, measured on this machine (tiny diffusers Flux, float32 on CPU / bfloat16 on CUDA):
  T_1        the single-process forward;
  T_local(N) the rank-0 cpfx graph run under torch's fake process group: same shapes and kernels,
             the collectives return at once (their outputs are left uninitialized; the script
             checks the output stays finite, as garbage could otherwise slow the math down);
  bytes(N)   counted from the rewritten graph (`cpfx.explain`);
  bandwidth  an all_to_all_single microbenchmark on N real ranks at the model's message size;
  T(N)       the real forward on N ranks, to compare with the model's bounds.
Part 2, FLUX.1-dev at 1024x1024 (4096 image + 512 text tokens, 28 steps) on NVIDIA L20s, the
  seed's figures (23.56 s on 1 GPU, 13.80 s Ulysses-2, 8.28 s Ulysses-4): closed-form FLOPs and
  bytes per step, the efficiency implied by the 1-GPU time, the link bandwidth each multi-GPU
  figure implies, and estimates for N=8 and for FP8 all-to-alls (bytes x 0.637 at head dim 128).
Part 3, CUDA only: part 1's per-rank compute on this GPU (FLUX.1-dev-sized blocks: 24 heads x 128,
  4096 + 512 tokens, bfloat16) scaled to FLUX.1-dev's 57 blocks and 28 steps, plus each N's
  communication at the link bandwidth part 2 found for the L20s. On one GPU the real N-rank runs
  are skipped (NCCL wants one GPU per rank); T_local(N) needs only the fake group.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch
from _common import parser, write_json

from cpfx.measure import median_time
from cpfx.testing.launch import spawn_ranks

CPU_CFG = dict(img=2048, txt=256, heads=4, head_dim=64, layers=2, single=2)
GPU_CFG = dict(img=4096, txt=512, heads=24, head_dim=128, layers=1, single=2)  # FLUX 1:2
QUICK_CFG = dict(img=512, txt=64, heads=4, head_dim=32, layers=1, single=1)


def build(cfg, device, dtype):
    from cpfx.testing import tiny

    return tiny.build("flux", device=device, dtype=dtype, **cfg)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def profile(label, fn, device, rows=12):
    """Print where `fn`'s time goes: top ops by self device (CUDA) or CPU time, and the
    host-device synchronizations and copies it makes per call."""
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    calls = 3
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
    avg = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"\n--- profile: {label} ({calls} calls) ---")
    print(avg.table(sort_by=key, row_limit=rows, max_name_column_width=60))
    syncs = {
        e.key: e.count // calls
        for e in avg
        if any(w in e.key for w in ("Synchronize", "Memcpy", "_local_scalar_dense", "item"))
    }
    print(f"per call: {syncs or 'no host-device syncs or copies'}")


def local_compute(model, kw, world, device, repeats, prof=False, compile=False):
    """T_local(N): rank 0's rewritten graph (of a copy of `model`) under a fake process group of
    `world` ranks; and the bytes it sends per forward, counted from the graph."""
    import copy

    import cpfx
    from cpfx.explain import explain, fake_world

    m = copy.deepcopy(model)
    torch._dynamo.reset()
    with fake_world(world), torch.no_grad():
        mesh = torch.distributed.device_mesh.init_device_mesh(
            device, (world,), mesh_dim_names=("ulysses",)
        )
        config = cpfx.ParallelConfig(check_collectives=False)
        sent = explain(m, mesh, config, print_table=False, **kw).bytes_per_forward
        cpfx.parallelize(m, mesh, dataclasses.replace(config, compile=compile))
        out = m(**kw)[0]
        finite = bool(torch.isfinite(out).all())

        def run():
            m(**kw)
            _sync(device)

        t = median_time(run, repeats)
        if prof:
            profile(f"rank 0 of {world} (fake group)", run, device)
    torch._dynamo.reset()
    return t, finite, sent


def _rank(rank, world, q, cfg, device, repeats, compile):
    torch.set_num_threads(1)
    import torch.distributed as dist

    import cpfx

    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m, kw = build(cfg, device, dtype)
    mesh = torch.distributed.device_mesh.init_device_mesh(
        device, (world,), mesh_dim_names=("ulysses",)
    )
    cpfx.parallelize(m, mesh, cpfx.ParallelConfig(compile=compile))
    el = torch.finfo(dtype).bits // 8
    s_local = math.ceil((cfg["img"] + cfg["txt"]) / world)
    msg = torch.randn(s_local, cfg["heads"] * cfg["head_dim"], device=device).to(dtype)

    def a2a():
        out = torch.empty_like(msg)
        dist.all_to_all_single(out, msg)
        _sync(device)

    def fwd():
        m(**kw)
        _sync(device)

    with torch.no_grad():
        fwd()
        a2a()
        dist.barrier()
        t_a2a = median_time(a2a, 3 * repeats)
        dist.barrier()
        t_fwd = median_time(fwd, repeats)
    sent = msg.numel() * el * (world - 1) / world
    if rank == 0:
        q.put({"forward_s": t_fwd, "a2a_s": t_a2a, "a2a_sent_bytes": sent})
    dist.destroy_process_group()


def part1(cfg, device, worlds, repeats, prof=(), compile=False):
    """Measured T_1, T_local(N), bytes(N); bandwidth and T(N) where N devices exist (CPU: always)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_num_threads(1)
    m, kw = build(cfg, device, dtype)
    run1 = torch.compile(m) if compile else m

    def single():
        run1(**kw)
        _sync(device)

    with torch.no_grad():
        single()
        t1 = median_time(single, repeats)
        if prof:
            profile("single process", single, device)
    rows = []
    for n in worlds:
        t_local, finite, sent = local_compute(m, kw, n, device, repeats, n in prof, compile)
        row = {
            "n": n,
            "t1_ms": t1 * 1e3,
            "t_local_ms": t_local * 1e3,
            "t1_over_n_ms": t1 / n * 1e3,
            "output_finite": finite,
            "sent_MB": sent / 1e6,
        }
        rows.append(row)
        if device == "cuda" and torch.cuda.device_count() < n:
            continue  # one rank per GPU: the real run and the link need n GPUs
        real = spawn_ranks(_rank, n, cfg, device, repeats, compile)
        bw = real["a2a_sent_bytes"] / real["a2a_s"]
        t_comm = sent / bw
        row.update(
            a2a_GBps=bw / 1e9,
            t_comm_ms=t_comm * 1e3,
            model_upper_ms=(t_local + t_comm) * 1e3,
            model_lower_ms=max(t_local, t_comm) * 1e3,
            measured_ms=real["forward_s"] * 1e3,
        )
    return rows


def part3(cfg, measured, link):
    """GPU: this GPU's per-rank compute, scaled from the measured blocks to FLUX.1-dev's 57 blocks
    and 28 steps, plus the communication of each N at `link` GB/s per rank."""
    blocks = cfg["layers"] + cfg["single"]
    scale = (FLUX_DEV["double"] + FLUX_DEV["single"]) / blocks * STEPS
    rows = [{"n": 1, "compute_s": measured[0]["t1_ms"] / 1e3 * scale, "comm_s": 0.0}]
    for r in measured:
        _, sent = flux_step(r["n"])
        bw = link.get(r["n"], min(link.values())) * 1e9
        rows.append(
            {
                "n": r["n"],
                "compute_s": r["t_local_ms"] / 1e3 * scale,
                "comm_s": sent * STEPS / bw,
                "link_GBps": bw / 1e9,
            }
        )
    for r in rows:
        r["model_s"] = r["compute_s"] + r["comm_s"]
        r["seed_l20_s"] = SEED_L20.get(r["n"])
    return rows


# --- part 2: FLUX.1-dev on L20 ------------------------------------------------------------------

FLUX_DEV = dict(dim=3072, heads=24, head_dim=128, double=19, single=38, img=4096, txt=512)
SEED_L20 = {1: 23.56, 2: 13.80, 4: 8.28}
STEPS = 28


def flux_step(n, fp8=False, el=2):
    """(FLOPs per rank, bytes sent per rank) of one FLUX.1-dev forward on n Ulysses ranks."""
    c = FLUX_DEV
    s, d, blocks = c["img"] + c["txt"], c["dim"], c["double"] + c["single"]
    # Per token and block: QKV 3d^2 + out d^2 + MLP 8d^2 (double: per stream; single: fused
    # QKV + MLP-in 7d^2, out 5d^2), 2 FLOPs per multiply-add; attention QK^T and PV, 4 S^2 d.
    flops = blocks * (24 * d * d * s + 4 * s * s * d) / n
    local = s / n * d * el  # one rank's [S/N, d] slice of Q, K, V or O
    qvo = (c["head_dim"] + 4) / (c["head_dim"] * el) if fp8 else 1.0
    sent = blocks * local * (n - 1) / n * (1 + 3 * qvo) if n > 1 else 0.0
    return flops, sent


def part2(bw8_gbps=None):
    """Seed-calibrated model; N=8 uses `bw8_gbps` (default: the bandwidth Ulysses-4 implies)."""
    f1, _ = flux_step(1)
    achieved = (
        f1 * STEPS / SEED_L20[1]
    )  # FLOP/s the 1-GPU run reached (pipeline overheads included)
    rows = []
    for n in (2, 4, 8):
        fl, sent = flux_step(n)
        _, sent8 = flux_step(n, fp8=True)
        t_compute = fl * STEPS / achieved
        row = {"n": n, "compute_s": t_compute, "sent_GB_per_rank": sent * STEPS / 1e9}
        if n in SEED_L20:
            row["seed_s"] = SEED_L20[n]
            row["link_GBps"] = sent * STEPS / (SEED_L20[n] - t_compute) / 1e9
            row["link"] = "implied"
        else:
            row["seed_s"] = None
            row["link_GBps"] = bw8_gbps or rows[-1]["link_GBps"]
            row["link"] = "assumed"
        bw = row["link_GBps"] * 1e9
        row["model_bf16_s"] = t_compute + sent * STEPS / bw
        row["model_fp8_s"] = t_compute + sent8 * STEPS / bw
        row["model_bf16_overlap_bound_s"] = max(t_compute, sent * STEPS / bw)
        rows.append(row)
    return {"achieved_TFLOPs": achieved / 1e12, "flops_per_step": f1, "rows": rows}


HOST_CFG = dict(img=16, txt=8, heads=8, head_dim=16, layers=1, single=2)


def host_floor(worlds, rounds=12, block=25):
    """Per-forward time at a size where the host's per-op dispatch dominates (CPU, 1 thread): the
    single process (eager, and through Dynamo) vs rank 0 of a cpfx model under the fake group
    (Q, K, V in three all-to-alls or in one; with the per-call input check, and without it). Each
    variant runs `block` calls in a row (its weights stay in the CPU caches, as for a model called
    in a loop), variants take turns for `rounds` rounds; medians of the calls, one N at a time."""
    import copy

    import cpfx
    from cpfx.explain import fake_world

    torch.set_num_threads(1)
    m, kw = build(HOST_CFG, "cpu", torch.float32)
    variants = {
        "rank_three_qkv": {"qkv_all_to_all": "three"},
        "rank_one_qkv": {"qkv_all_to_all": "one"},
        "rank_one_unchecked": {"qkv_all_to_all": "one", "check_inputs": "never"},
        "rank_one_dynamic": {"qkv_all_to_all": "one", "dynamic": True},
    }
    res = {}
    for n in worlds:
        torch._dynamo.reset()
        with fake_world(n), torch.no_grad():
            mesh = torch.distributed.device_mesh.init_device_mesh(
                "cpu", (n,), mesh_dim_names=("ulysses",)
            )
            fns = {"single_eager": m, "single_dynamo": torch.compile(m, backend="eager")}
            for name, v in variants.items():
                cfg = cpfx.ParallelConfig(check_collectives=False, **v)
                fns[name] = cpfx.parallelize(copy.deepcopy(m), mesh, cfg)
            times = {k: [] for k in fns}
            for f in fns.values():
                for _ in range(3):
                    f(**kw)
            for _ in range(rounds):
                for k, f in fns.items():
                    for _ in range(block):
                        t0 = time.perf_counter()
                        f(**kw)
                        times[k].append(time.perf_counter() - t0)
        for k, v in times.items():
            res.setdefault(k + "_ms", []).append(statistics.median(v) * 1e3)
    torch._dynamo.reset()
    return res


def main():
    p = parser(__doc__)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--worlds", default=None, help="default: 2 on CPU, 2,4,8 on CUDA")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--bw8",
        type=float,
        default=None,
        help="GB/s per rank assumed for 8 L20s (default: the bandwidth Ulysses-4 implies)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="T1 through torch.compile, T_local with ParallelConfig(compile=True) (inductor)",
    )
    p.add_argument("--profile", default="", help="N,...: print a profile of T1 and T_local(N)")
    p.add_argument(
        "--host",
        action="store_true",
        help="only the host-overhead floor: tiny sizes on CPU, single process vs a rank's graph",
    )
    args = p.parse_args()
    if args.host:
        res = host_floor([int(w) for w in (args.worlds or "2,8").split(",")])
        print(
            "host time per forward, CPU 1 thread, tiny Flux 16+8 tokens, 1+2 blocks (ms; "
            "medians of calls in turns, one column per N):"
        )
        base = res["single_dynamo_ms"]
        for k, v in res.items():
            ratios = "".join(f"{t / b:7.2f}x" for t, b in zip(v, base))
            print(f"  {k[:-3]:<14}" + "".join(f"{t:8.2f}" for t in v) + "   vs Dynamo:" + ratios)
        write_json(args.json, res)
        return
    cfg = QUICK_CFG if args.quick else (GPU_CFG if args.device == "cuda" else CPU_CFG)
    out = {"config": cfg, "device": args.device, "compile": args.compile}

    p2 = out["flux_dev_l20"] = part2(args.bw8)

    worlds = [
        int(w) for w in (args.worlds or ("2,4,8" if args.device == "cuda" else "2")).split(",")
    ]
    t0 = time.perf_counter()
    out["measured"] = part1(
        cfg,
        args.device,
        worlds,
        args.repeats,
        {int(n) for n in args.profile.split(",") if n},
        args.compile,
    )
    print(
        f"Part 1: tiny Flux {cfg['img']}+{cfg['txt']} tokens, {cfg['heads']} heads x "
        f"{cfg['head_dim']}, {cfg['layers']}+{cfg['single']} blocks, {args.device}"
        f"{', inductor' if args.compile else ''} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    print(
        f"{'N':>3}{'T1':>9}{'T1/N':>9}{'T_local':>9}{'MB sent':>9}{'a2a GB/s':>10}{'T_comm':>9}"
        f"{'model lo..hi':>16}{'measured':>10}  (ms)"
    )
    for r in out["measured"]:
        line = (
            f"{r['n']:>3}{r['t1_ms']:>9.1f}{r['t1_over_n_ms']:>9.1f}{r['t_local_ms']:>9.1f}"
            f"{r['sent_MB']:>9.2f}"
        )
        if "measured_ms" in r:
            line += (
                f"{r['a2a_GBps']:>10.2f}{r['t_comm_ms']:>9.1f}"
                f"{r['model_lower_ms']:>8.1f}..{r['model_upper_ms']:<6.1f}{r['measured_ms']:>10.1f}"
            )
        else:
            line += "   (fewer GPUs than ranks: no real run)"
        if not r["output_finite"]:
            line += "  (fake-group output not finite: T_local suspect)"
        print(line)
    if args.device == "cuda":
        link = {r["n"]: r["link_GBps"] for r in p2["rows"]}
        out["flux_dev_this_gpu"] = part3(cfg, out["measured"], link)
        print(
            f"\nPart 3: this GPU's compute scaled to FLUX.1-dev (57 blocks, {STEPS} steps) + "
            "communication at the link bandwidth the L20 figures imply"
        )
        print(f"{'N':>3}{'compute s':>11}{'comm s':>9}{'model s':>9}{'seed L20 s':>12}")
        for r in out["flux_dev_this_gpu"]:
            seed = r["seed_l20_s"] or float("nan")
            print(
                f"{r['n']:>3}{r['compute_s']:>11.2f}{r['comm_s']:>9.2f}{r['model_s']:>9.2f}"
                f"{seed:>12.2f}"
            )

    print(
        f"\nPart 2: FLUX.1-dev 1024x1024, {STEPS} steps, L20 (seed figures); 1 GPU reached "
        f"{p2['achieved_TFLOPs']:.0f} TFLOP/s on {p2['flops_per_step'] / 1e12:.0f} TFLOP per step"
    )
    print(
        f"{'N':>3}{'compute s':>11}{'GB sent/rank':>14}{'link GB/s':>12}{'model bf16 s':>14}"
        f"{'overlap bound':>15}{'model fp8 s':>13}{'seed s':>8}"
    )
    for r in p2["rows"]:
        print(
            f"{r['n']:>3}{r['compute_s']:>11.2f}{r['sent_GB_per_rank']:>14.1f}"
            f"{r['link_GBps']:>7.1f} {r['link'][:4]}{r['model_bf16_s']:>14.2f}{r['model_bf16_overlap_bound_s']:>15.2f}"
            f"{r['model_fp8_s']:>13.2f}{r['seed_s'] or float('nan'):>8.2f}"
        )
    write_json(args.json, out)


if __name__ == "__main__":
    main()
