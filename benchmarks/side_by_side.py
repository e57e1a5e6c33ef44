"""cpfx vs. the peers, side by side, on CPU/gloo with N=2 ranks.

Same tiny-but-real diffusers transformers (random weights, a few thousand tokens, several
layers), same inputs, same degree, one job:

  phase 1  single process, best of 1 and 2 intra-op threads (interleaved), also the reference
           output every method is checked against;
  phase 2  2 spawned gloo ranks x 1 thread, alive for the whole comparison. Per model every
           method's copy of the model is set up once (first call = capture / warm-up), then the
           timed forwards alternate between methods (A B C A B C ...), median per method.

Methods (rows):
  cpfx-ulysses        cpfx.parallelize, 1-D "ulysses" mesh
  cpfx-ring-p2p       cpfx.parallelize, 1-D "ring" mesh, ring_rotate="p2p"
  diffusers-ulysses   model.enable_parallelism(ContextParallelConfig(ulysses_degree=2))
  diffusers-ring      model.enable_parallelism(ContextParallelConfig(ring_degree=2))
  cache-dit-ulysses   cache_dit.enable_cache(model, parallelism_config=ParallelismConfig(ulysses_size=2))
  cache-dit-ring      cache_dit.enable_cache(model, parallelism_config=ParallelismConfig(ring_size=2))

Peers are run exactly as shipped except for the shims listed in the status column (and in
benchmarks/README.md). A peer that fails is a result: the script still exits 0.

    python benchmarks/side_by_side.py                 # flux, qwen, wan at full size (~10 min on 2 cores)
    python benchmarks/side_by_side.py --quick         # small sizes, smoke run
    python benchmarks/side_by_side.py --models flux --repeats 7 --json /tmp/r.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp

WORLD = 2
TOL = 1e-4  # float32: max abs diff above this is reported as WRONG
COLL_TIMEOUT = 120.0  # set from --coll-timeout in the ranks

# name -> (cpfx.tiny builder kwargs for the full run, for --quick)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "flux": (dict(img=2048, txt=256, heads=4, head_dim=64, layers=2, single=2),
             dict(img=256, txt=32, heads=4, head_dim=32, layers=1, single=1)),
    # Qwen-Image: h*w image tokens + txt text tokens; cpfx.tiny's mask has a hole inside the
    # prompt and padding at its end.
    "qwen": (dict(h=48, w=48, txt=64, heads=4, head_dim=64, layers=2),
             dict(h=16, w=16, txt=16, heads=4, head_dim=32, layers=1)),
    # Wan: frames * (h/2) * (w/2) video tokens, cross-attention to txt replicated text tokens.
    "wan": (dict(frames=8, h=32, w=32, txt=64, heads=4, head_dim=64, layers=2),
            dict(frames=2, h=16, w=16, txt=16, heads=4, head_dim=32, layers=1)),
}

METHODS = ["cpfx-ulysses", "cpfx-ring-p2p", "diffusers-ulysses", "diffusers-ring",
           "cache-dit-ulysses", "cache-dit-ring"]
# which cpfx row a peer row is compared with in the "cpfx/peer" column
CPFX_COUNTERPART = {"diffusers-ulysses": "cpfx-ulysses", "cache-dit-ulysses": "cpfx-ulysses",
                    "diffusers-ring": "cpfx-ring-p2p", "cache-dit-ring": "cpfx-ring-p2p"}

SHIM_DIFFUSERS = ("torch.accelerator.device_count patched to return 1 during enable_parallelism "
                  "(diffusers computes rank % device_count(), 0 on CPU)")


def tokens_of(name: str, kw: dict[str, Any]) -> str:
    if name == "flux":
        return f"{kw['img']} img + {kw['txt']} txt tokens, joint attention"
    if name == "qwen":
        return f"{kw['h'] * kw['w']} img + {kw['txt']} txt tokens, joint attention, holed text mask"
    if name == "wan":
        return (f"{kw['frames'] * (kw['h'] // 2) * (kw['w'] // 2)} video tokens, "
                f"cross-attention to {kw['txt']} txt tokens")
    return "?"


def build(name: str, kw: dict[str, Any]):
    import cpfx.tiny

    return cpfx.tiny.build(name, **kw)


def first_tensor(out: Any) -> torch.Tensor:
    t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
    if hasattr(t, "wait") and not isinstance(t, torch.nn.Parameter) and type(t) is not torch.Tensor:
        t = t.wait()  # cache-dit can hand back an un-waited AsyncCollectiveTensor
    return t


def short(e: BaseException, n: int = 160) -> str:
    msg = str(e).strip().splitlines()
    msg = msg[0] if msg else ""
    s = f"{type(e).__name__}: {msg}"
    return s if len(s) <= n else s[: n - 3] + "..."


# --------------------------------------------------------------------------------------------
# phase 1: single process
# --------------------------------------------------------------------------------------------

def single_process(name: str, kw: dict[str, Any], repeats: int) -> dict[str, Any]:
    model, inputs = build(name, kw)
    times: dict[int, list[float]] = {1: [], 2: []}
    with torch.no_grad():
        torch.set_num_threads(1)
        ref = first_tensor(model(**inputs)).clone()
        torch.set_num_threads(2)
        model(**inputs)  # warm-up at 2 threads too
        for _ in range(repeats):
            for th in (1, 2):
                torch.set_num_threads(th)
                t0 = time.perf_counter()
                first_tensor(model(**inputs))
                times[th].append(time.perf_counter() - t0)
    med = {th: statistics.median(v) for th, v in times.items()}
    best = min(med, key=med.get)
    del model
    gc.collect()
    return {"ref": ref, "median_s": med, "best_threads": best, "best_s": med[best],
            "times_s": times}


# --------------------------------------------------------------------------------------------
# phase 2: ranks
# --------------------------------------------------------------------------------------------

class Registry:
    """Snapshots of diffusers' global attention-backend registry.

    cache-dit replaces diffusers' "native" backend (and others) in
    `diffusers.models.attention_dispatch._AttentionBackendRegistry` with its own wrappers, globally.
    To keep the diffusers rows diffusers' own code (and cpfx's captured graphs' guards valid), the
    registry is switched back to diffusers' state around every non-cache-dit call and to
    cache-dit's state around cache-dit calls. Switching is dict/set assignment, outside the timing.
    """

    def __init__(self) -> None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry as R

        self.R = R
        self.states: dict[str, dict[str, Any]] = {"diffusers": self.snapshot()}

    def snapshot(self) -> dict[str, Any]:
        out = {}
        for k, v in vars(self.R).items():
            if k.startswith("__") or callable(v) or isinstance(v, (classmethod, staticmethod)):
                continue
            out[k] = copy.copy(v)
        return out

    def restore(self, which: str) -> None:
        for k, v in self.states[which].items():
            cur = getattr(self.R, k, None)
            if isinstance(cur, dict) and isinstance(v, dict):
                if cur != v:
                    cur.clear()
                    cur.update(v)
            elif isinstance(cur, set) and isinstance(v, set):
                if cur != v:
                    cur.clear()
                    cur.update(v)
            else:
                setattr(self.R, k, v)

    def changed_keys(self, a: str, b: str) -> list[str]:
        sa, sb = self.states[a], self.states[b]
        return sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))


@contextlib.contextmanager
def accelerator_count_shim():
    orig = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = orig  # type: ignore[assignment]


def setup_method(method: str, name: str, kw: dict[str, Any], reg: Registry) -> tuple[Any, dict, str]:
    """Build a fresh copy of the model and parallelize it with `method`. Returns (model, inputs,
    shim-note). Raises on failure."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    model, inputs = build(name, kw)
    if method.startswith("cpfx"):
        import cpfx

        dim = "ulysses" if method == "cpfx-ulysses" else "ring"
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=(dim,))
        cpfx.parallelize(model, mesh, cpfx.ParallelConfig(ring_rotate="p2p", fp8_comm=False,
                                                       timeout_s=COLL_TIMEOUT))
        return model, inputs, ""
    if method.startswith("diffusers"):
        from diffusers import ContextParallelConfig

        reg.restore("diffusers")
        cfg = (ContextParallelConfig(ulysses_degree=WORLD) if method == "diffusers-ulysses"
               else ContextParallelConfig(ring_degree=WORLD))
        note = ""
        try:
            model.enable_parallelism(config=cfg)
        except ZeroDivisionError:
            # diffusers' _resolve_parallel_config: torch.device(type, rank % accelerator count)
            model, inputs = build(name, kw)
            with accelerator_count_shim():
                model.enable_parallelism(config=cfg)
            note = SHIM_DIFFUSERS
        return model, inputs, note
    if method.startswith("cache-dit"):
        import cache_dit
        from cache_dit import ParallelismConfig

        reg.restore("cache-dit" if "cache-dit" in reg.states else "diffusers")
        pc = (ParallelismConfig(ulysses_size=WORLD) if method == "cache-dit-ulysses"
              else ParallelismConfig(ring_size=WORLD))
        model = cache_dit.enable_cache(model, cache_config=None, parallelism_config=pc)
        if "cache-dit" not in reg.states:
            reg.states["cache-dit"] = reg.snapshot()
        dist.barrier()
        return model, inputs, ""
    raise ValueError(method)


def rank_main(rank: int, args: argparse.Namespace, port: int, cases: list[tuple[str, dict, Any]],
              q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    global COLL_TIMEOUT
    COLL_TIMEOUT = args.coll_timeout
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=args.coll_timeout))
    ctl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=args.coll_timeout))
    import diffusers  # noqa: F401

    reg = Registry()  # diffusers' own registry, before cache-dit is imported

    def agree(ok: bool, msg: str) -> tuple[bool, str]:
        """Both ranks' outcome; a failure on any rank fails the method."""
        outs: list[Any] = [None] * WORLD
        dist.all_gather_object(outs, (ok, msg), group=ctl)
        bad = [(r, m) for r, (o, m) in enumerate(outs) if not o]
        if bad:
            return False, bad[0][1] + (f" (rank {bad[0][0]})" if len(bad) < WORLD else "")
        return True, outs[0][1]

    def maxall(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctl)
        return t.item()

    def state_for(method: str) -> str:
        return "cache-dit" if method.startswith("cache-dit") and "cache-dit" in reg.states else "diffusers"

    for name, kw, ref in cases:
        methods = [m for m in args.methods]
        res: dict[str, dict[str, Any]] = {}
        live: dict[str, tuple[Any, dict]] = {}
        for m in methods:
            model = None
            r: dict[str, Any] = {"method": m}
            t0 = time.perf_counter()
            try:
                model, inputs, note = setup_method(m, name, kw, reg)
                ok, msg = True, note
            except Exception as e:  # noqa: BLE001 - a failing peer is a result
                ok, msg = False, "setup: " + short(e)
                if args.verbose:
                    traceback.print_exc()
            ok, msg = agree(ok, msg)
            if ok:
                try:
                    reg.restore(state_for(m))
                    with torch.no_grad():
                        out = first_tensor(model(**inputs))
                        out2 = first_tensor(model(**inputs))  # warm-up (cpfx: captured graph reused)
                    diff = (out - ref).abs().max().item()
                    diff2 = (out2 - ref).abs().max().item()
                    diff = max(diff, diff2)
                    fok = True
                except Exception as e:  # noqa: BLE001
                    fok, msg, diff = False, "forward: " + short(e), float("nan")
                    if args.verbose:
                        traceback.print_exc()
                ok2, msg2 = agree(fok, msg)
                if not ok2:
                    ok, msg = False, msg2
            r["setup_and_first_calls_s"] = maxall(time.perf_counter() - t0)
            if ok:
                r["max_abs_diff"] = maxall(diff)
                r["shim"] = msg
                if m.startswith("cpfx"):
                    import cpfx

                    r["sent_bytes_per_rank"] = cpfx.sent_bytes_per_call(model)
                    r["graphs_after_warmup"] = len(model._cpfx["graphs"])
                live[m] = (model, inputs)
            else:
                r["error"] = msg
            res[m] = r
            model = None
            gc.collect()

        # timed rounds, methods interleaved
        times: dict[str, list[float]] = {m: [] for m in live}
        dead: set[str] = set()
        with torch.no_grad():
            for _ in range(args.repeats):
                for m, (model, inputs) in live.items():
                    if m in dead:
                        continue
                    reg.restore(state_for(m))
                    dist.barrier(group=ctl)
                    t0 = time.perf_counter()
                    try:
                        first_tensor(model(**inputs))
                        fok, msg = True, ""
                    except Exception as e:  # noqa: BLE001
                        fok, msg = False, "timed forward: " + short(e)
                    dt = time.perf_counter() - t0
                    ok, msg = agree(fok, msg)
                    if not ok:
                        dead.add(m)
                        res[m]["error"] = msg
                        continue
                    times[m].append(maxall(dt))
        reg.restore("diffusers")
        for m, (model, _) in live.items():
            if m in dead:
                continue
            res[m]["times_s"] = times[m]
            res[m]["median_s"] = statistics.median(times[m])
            if m.startswith("cpfx"):
                n = len(model._cpfx["graphs"])
                if n != res[m]["graphs_after_warmup"]:
                    res[m]["shim"] = f"recompiled during timing ({n} graphs)"
        if "cache-dit" in reg.states:
            res["_registry_keys_swapped"] = reg.changed_keys("diffusers", "cache-dit")  # type: ignore[assignment]
        live.clear()
        gc.collect()
        if rank == 0:
            q.put((name, res))
        dist.barrier(group=ctl)
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

def status_of(r: dict[str, Any]) -> str:
    if "error" in r:
        return "fails: " + r["error"]
    if not r.get("max_abs_diff", float("nan")) <= TOL:
        s = f"WRONG: max abs diff {r.get('max_abs_diff'):.2e} > {TOL:g}"
    else:
        s = "ok"
    if r.get("shim"):
        s = ("ok with shim: " if s == "ok" else s + "; shim: ") + r["shim"]
    return s


def table(name: str, kw: dict[str, Any], single: dict[str, Any], res: dict[str, Any]) -> str:
    lines = [f"== {name}: {tokens_of(name, kw)}; {kw}"]
    hdr = f"{'method':<22}{'ms/fwd':>9}{'vs single':>11}{'cpfx/peer':>11}{'max abs diff':>14}  status"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    sm = single["median_s"]
    lines.append(f"{'single process':<22}{single['best_s'] * 1e3:9.1f}{1.0:10.2f}x{'':>11}{0.0:14.1e}  "
                 f"ok (best of: 1 thread {sm[1] * 1e3:.1f} ms, 2 threads {sm[2] * 1e3:.1f} ms)")
    for m in METHODS:
        if m not in res:
            continue
        r = res[m]
        med = r.get("median_s")
        ms = f"{med * 1e3:9.1f}" if med else f"{'-':>9}"
        vs = f"{single['best_s'] / med:10.2f}x" if med else f"{'-':>11}"
        cp = CPFX_COUNTERPART.get(m)
        cmed = res.get(cp, {}).get("median_s") if cp else None
        ratio = f"{cmed / med:11.2f}" if (cmed and med) else f"{'-':>11}"
        d = r.get("max_abs_diff")
        ds = f"{d:14.1e}" if d is not None else f"{'-':>14}"
        lines.append(f"{m:<22}{ms}{vs}{ratio}{ds}  {status_of(r)}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="flux,qwen,wan", help="comma list of flux,qwen,wan")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ",".join(METHODS))
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per method (default 5, quick 3)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--json", default=None, help="write the results to this path")
    p.add_argument("--coll-timeout", type=float, default=120.0, help="gloo collective timeout (s)")
    p.add_argument("--deadline", type=float, default=1500.0, help="kill the ranks after this many s")
    p.add_argument("--verbose", action="store_true", help="print peer tracebacks")
    args = p.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m}")
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in CASES:
            p.error(f"unknown model {m}")

    import warnings
    import logging

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    print(f"side_by_side: torch {torch.__version__}, {os.cpu_count()} cores, load avg {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}; N={WORLD} gloo ranks x 1 thread; repeats={args.repeats}"
          f"{' (quick)' if args.quick else ''}", flush=True)
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("diffusers", "cache_dit", "cpfx"):
        try:
            mod = __import__(pkg)
            versions[pkg] = getattr(mod, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            versions[pkg] = "not importable: " + short(e)
    print("versions:", versions, flush=True)

    t_start = time.perf_counter()
    cases = []
    singles: dict[str, dict[str, Any]] = {}
    for name in models:
        kw = CASES[name][1 if args.quick else 0]
        t0 = time.perf_counter()
        s = single_process(name, kw, args.repeats)
        singles[name] = s
        cases.append((name, kw, s["ref"]))
        print(f"[phase 1] {name}: single process 1 thread {s['median_s'][1] * 1e3:.1f} ms, "
              f"2 threads {s['median_s'][2] * 1e3:.1f} ms ({time.perf_counter() - t0:.0f} s)", flush=True)

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results: dict[str, dict[str, Any]] = {}
    problem = None
    pc = mp.start_processes(rank_main, args=(args, port, cases, q), nprocs=WORLD, join=False,
                            start_method="spawn")
    deadline = time.perf_counter() + args.deadline

    def drain() -> None:
        while True:
            try:
                name, res = q.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty
                return
            results[name] = res
            print(f"[phase 2] {name} done ({time.perf_counter() - t_start:.0f} s since start)", flush=True)

    try:
        while not pc.join(timeout=2):
            drain()
            if time.perf_counter() > deadline:
                problem = f"ranks killed after the {args.deadline:.0f} s deadline"
                for proc in pc.processes:
                    if proc.is_alive():
                        proc.kill()
                break
    except Exception as e:  # noqa: BLE001 - a rank died: report what we have
        problem = "rank process died: " + short(e, 400)
    time.sleep(0.5)
    drain()

    print()
    out_json: dict[str, Any] = {"versions": versions, "load_avg_start": load, "repeats": args.repeats,
                                "quick": args.quick, "world": WORLD, "tolerance": TOL, "cases": {}}
    for name, kw, _ in cases:
        single = singles[name]
        res = results.get(name)
        if res is None:
            print(f"== {name}: no result from the ranks ({problem or 'unknown'})\n")
            out_json["cases"][name] = {"config": kw, "error": problem or "no result"}
            continue
        print(table(name, kw, single, res))
        swapped = res.get("_registry_keys_swapped")
        if swapped:
            print(f"   (cache-dit rows ran with cache-dit's registrations in diffusers' attention registry; "
                  f"the others with diffusers' own: switched keys {swapped})")
        print()
        rows = {}
        for m, r in res.items():
            if m.startswith("_"):
                continue
            rr = dict(r)
            rr["status"] = status_of(r)
            if r.get("median_s"):
                rr["ratio_vs_single"] = single["best_s"] / r["median_s"]
                cp = CPFX_COUNTERPART.get(m)
                if cp and res.get(cp, {}).get("median_s"):
                    rr["ratio_cpfx_over_peer"] = res[cp]["median_s"] / r["median_s"]
            rows[m] = rr
        out_json["cases"][name] = {
            "config": kw, "tokens": tokens_of(name, kw),
            "single_process": {"median_s_by_threads": single["median_s"], "best_threads": single["best_threads"],
                               "best_s": single["best_s"], "times_s_by_threads": single["times_s"]},
            "methods": rows, "registry_keys_swapped_for_cache_dit": swapped,
        }
    try:
        load_end = os.getloadavg()
    except OSError:
        load_end = (float("nan"),) * 3
    out_json["load_avg_end"] = load_end
    out_json["wall_s"] = time.perf_counter() - t_start
    if problem:
        out_json["problem"] = problem
        print("problem:", problem)
    print(f"total {out_json['wall_s']:.0f} s; load avg at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}"
          " (timings on a shared 2-core VM are load-sensitive: compare ratios from the same run)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out_json, f, indent=1, default=str)
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
