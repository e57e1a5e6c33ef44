"""One training step (forward + backward) through cpfx's Ulysses vs the single process, CPU/gloo.

    python benchmarks/train_step.py [--worlds 2,4] [--repeats 3] [--quick] [--checkpointing]
                                    [--json out.json]

Tiny Flux (fp32, train mode, every parameter trained), a loss on the whole output. Per world
size: median time of a step (after a warm-up step that compiles), the peak bytes a step allocates
above what was live before it (`cpfx.measure.peak_bytes`; weights, inputs and gradients left from
an earlier step are not in it: gradients are set to None before each step), and the largest
parameter-gradient difference from the single process on any rank (relative to
max(1, max |grad|)), as the rank holds it and as it would be after summing it over the ranks.
`--diffusers` adds diffusers' own Ulysses (`enable_parallelism`) at each N. The single
process runs with the same thread count as one rank (1), so the time column compares like with
like on a machine with fewer cores than ranks only in the memory column.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from _common import environment, parser, write_json

from cpfx.measure import median_time, peak_bytes
from cpfx.testing.launch import spawn_ranks
from cpfx.testing.tiny import build

FLUX = dict(img=1024, txt=64, heads=4, head_dim=32, layers=2, single=2)
QUICK = dict(img=256, txt=32, heads=4, head_dim=16, layers=1, single=1)


def _step(m: torch.nn.Module, kw: dict[str, Any], w: torch.Tensor) -> None:
    m.zero_grad(set_to_none=True)
    out = m(**kw)[0]
    (out * w).sum().backward()


def _grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _rel(g: torch.Tensor, ref: torch.Tensor) -> float:
    return ((g - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


def _measure(m: torch.nn.Module, kw: dict[str, Any], repeats: int) -> dict[str, Any]:
    out = m(**kw)[0]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    _step(m, kw, w)  # warm-up (compiles)
    t = median_time(lambda: _step(m, kw, w), repeats)
    m.zero_grad(set_to_none=True)
    peak = peak_bytes(lambda: _step(m, kw, w))
    return {"step_s": t, "peak_mb": peak / 1e6, "grads": _grads(m)}


def _build(cfg: dict[str, Any], checkpointing: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    m, kw = build("flux", **cfg)
    if checkpointing:
        m.enable_gradient_checkpointing()
    m.train()
    return m, kw


def _parallelize(m: torch.nn.Module, method: str, world: int) -> None:
    import cpfx

    if method == "cpfx":
        cpfx.parallelize(m, None, cpfx.ParallelConfig())
        return
    from diffusers import ContextParallelConfig

    # diffusers computes rank % torch.accelerator.device_count(), which is 0 without a GPU.
    orig = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    finally:
        torch.accelerator.device_count = orig  # type: ignore[assignment]


def _rank(rank: int, world: int, q: Any, cfg: dict[str, Any], repeats: int, ckpt: bool,
          method: str = "cpfx") -> None:

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    m, kw = _build(cfg, ckpt)
    ref_m = copy.deepcopy(m)
    out = ref_m(**kw)[0]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    _step(ref_m, kw, w)
    ref = _grads(ref_m)
    del ref_m, out
    try:
        _parallelize(m, method, world)
        r = _measure(m, kw, repeats)
    except Exception as e:  # noqa: BLE001 - a peer that fails is a result
        if rank == 0:
            q.put({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        dist.destroy_process_group()
        return
    err = max(_rel(g, ref[n]) for n, g in r["grads"].items())
    summed = 0.0  # the error if the ranks' gradients were summed over the group afterwards
    for n, g in r["grads"].items():
        g = g.clone()
        dist.all_reduce(g)
        summed = max(summed, _rel(g, ref[n]))
    peaks = [None] * world
    dist.all_gather_object(peaks, (r["peak_mb"], err, summed))
    if rank == 0:
        q.put({"step_s": r["step_s"], "peak_mb": max(p[0] for p in peaks),
               "max_rel": max(p[1] for p in peaks), "max_rel_summed": max(p[2] for p in peaks)})
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    ap.add_argument("--diffusers", action="store_true",
                    help="also diffusers' own Ulysses (enable_parallelism) at each N")
    a = ap.parse_args()
    cfg = QUICK if a.quick else FLUX
    torch.set_num_threads(1)
    m, kw = _build(cfg, a.checkpointing)
    single = _measure(m, kw, a.repeats)
    rows: dict[Any, Any] = {
        1: {"step_s": single["step_s"], "peak_mb": single["peak_mb"], "max_rel": 0.0}
    }
    print(f"N=1  step {single['step_s'] * 1e3:8.1f} ms  peak {single['peak_mb']:7.1f} MB",
          flush=True)
    methods = ["cpfx", "diffusers"] if a.diffusers else ["cpfx"]
    for world in [int(x) for x in a.worlds.split(",")]:
        for method in methods:
            t0 = time.perf_counter()
            r = spawn_ranks(_rank, world, cfg, a.repeats, a.checkpointing, method)
            key = f"{method} N={world}"
            if "error" in r:
                rows[key] = r
                print(f"{key:16s} fails: {r['error']}", flush=True)
                continue
            err = r["max_rel"]
            rows[key] = r
            print(f"{key:16s} step {r['step_s'] * 1e3:8.1f} ms  peak {r['peak_mb']:7.1f} MB per "
                  f"rank ({r['peak_mb'] / single['peak_mb']:.2f}x)  grad max rel {err:.2g} "
                  f"(summed over ranks: {r['max_rel_summed']:.2g})  "
                  f"({time.perf_counter() - t0:.0f} s with setup)", flush=True)
    write_json(a.json, {"environment": environment(), "config": cfg,
                        "checkpointing": a.checkpointing, "rows": rows})


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
