"""cpfx vs. the peers, side by side, on CPU/gloo with N=2 ranks.

Same tiny-but-real diffusers transformers (random weights, a few thousand tokens, several
layers), same inputs, same degree, one job:

  phase 1  single process, best of 1 and 2 intra-op threads (interleaved), also the reference
           output every method is checked against;
  phase 2  per model, one pair of spawned gloo ranks (1 thread each) per method, all alive
           together; each pair's own default process group is its 2-rank world, so a failing
           peer (or one that patches globals, as cache-dit patches diffusers' attention
           registry) cannot disturb another method, and the processes coordinate only through
           the parent's TCPStore. Every pair sets its copy of the model up once (first call =
           capture / warm-up, checked against the reference); a pair whose method failed
           reports and exits (cache-dit's failed ring left a gloo thread spinning at ~1 core).
           The working pairs then take turns: one timed forward of one method at a time while
           the other processes sleep in a TCPStore wait, A B C A B C ... (order rotated every
           round), median per method; a forward's time is the slower rank's.

Methods (rows):
  cpfx-ulysses        cpfx.parallelize, 1-D "ulysses" mesh
  cpfx-ring-p2p       cpfx.parallelize, 1-D "ring" mesh, ring_rotate="p2p"
  diffusers-ulysses   model.enable_parallelism(ContextParallelConfig(ulysses_degree=2))
  diffusers-ring      model.enable_parallelism(ContextParallelConfig(ring_degree=2))
  cache-dit-ulysses   cache_dit.enable_cache(model, parallelism_config=ParallelismConfig(ulysses_size=2))
  cache-dit-ring      cache_dit.enable_cache(model, parallelism_config=ParallelismConfig(ring_size=2))

Peers are run exactly as shipped except for the shims listed in the status column (and in
benchmarks/README.md). A peer that fails is a result: the script still exits 0.

    python benchmarks/side_by_side.py                 # flux, qwen, wan at full size (~5 min on a quiet 2-core VM)
    python benchmarks/side_by_side.py --quick         # small sizes, smoke run
    python benchmarks/side_by_side.py --models flux --repeats 7 --json /tmp/r.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp
from _common import parser, write_json

WORLD = 2
TOL = 1e-4  # float32: max abs diff above this is reported as WRONG
COLL_TIMEOUT = 120.0  # set from --coll-timeout in the ranks

# name -> (cpfx.testing.tiny sizes for the full run, for --quick)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "flux": (
        {"img": 2048, "txt": 256, "heads": 4, "head_dim": 64, "layers": 2, "single": 2},
        {"img": 256, "txt": 32, "heads": 4, "head_dim": 32, "layers": 1, "single": 1},
    ),
    # Qwen-Image: h*w image tokens + txt text tokens; cpfx.testing.tiny's mask has a hole inside the
    # prompt and padding at its end.
    "qwen": (
        {"h": 48, "w": 48, "txt": 64, "heads": 4, "head_dim": 64, "layers": 2},
        {"h": 16, "w": 16, "txt": 16, "heads": 4, "head_dim": 32, "layers": 1},
    ),
    # Wan: frames * (h/2) * (w/2) video tokens, cross-attention to txt replicated text tokens.
    "wan": (
        {"frames": 8, "h": 32, "w": 32, "txt": 64, "heads": 4, "head_dim": 64, "layers": 2},
        {"frames": 2, "h": 16, "w": 16, "txt": 16, "heads": 4, "head_dim": 32, "layers": 1},
    ),
}

METHODS = [
    "cpfx-ulysses",
    "cpfx-ring-p2p",
    "diffusers-ulysses",
    "diffusers-ring",
    "cache-dit-ulysses",
    "cache-dit-ring",
]
# which cpfx row a peer row is compared with in the "cpfx/peer" column
CPFX_COUNTERPART = {
    "diffusers-ulysses": "cpfx-ulysses",
    "cache-dit-ulysses": "cpfx-ulysses",
    "diffusers-ring": "cpfx-ring-p2p",
    "cache-dit-ring": "cpfx-ring-p2p",
}

SHIM_DIFFUSERS = (
    "torch.accelerator.device_count patched to return 1 during enable_parallelism "
    "(diffusers computes rank % device_count(), 0 on CPU)"
)


def tokens_of(name: str, kw: dict[str, Any]) -> str:
    if name == "flux":
        return f"{kw['img']} img + {kw['txt']} txt tokens, joint attention"
    if name == "qwen":
        return f"{kw['h'] * kw['w']} img + {kw['txt']} txt tokens, joint attention, holed text mask"
    if name == "wan":
        return (
            f"{kw['frames'] * (kw['h'] // 2) * (kw['w'] // 2)} video tokens, "
            f"cross-attention to {kw['txt']} txt tokens"
        )
    return "?"


def build(name: str, kw: dict[str, Any]):
    from cpfx.testing import tiny

    return tiny.build(name, **kw)


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
    return {
        "ref": ref,
        "median_s": med,
        "best_threads": best,
        "best_s": med[best],
        "times_s": times,
    }


# --------------------------------------------------------------------------------------------
# phase 2: ranks
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def accelerator_count_shim():
    orig = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = orig  # type: ignore[assignment]


def setup_method(method: str, name: str, kw: dict[str, Any]) -> tuple[Any, dict, str]:
    """Build a fresh copy of the model and parallelize it with `method` over the default process
    group (this method's own pair of processes). Returns (model, inputs, shim note); raises on
    failure."""
    from torch.distributed.device_mesh import init_device_mesh

    model, inputs = build(name, kw)
    if method.startswith("cpfx"):
        import cpfx

        dim = "ulysses" if method == "cpfx-ulysses" else "ring"
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=(dim,))
        cpfx.parallelize(
            model,
            mesh,
            cpfx.ParallelConfig(ring_rotate="p2p", fp8_comm=False, timeout_s=COLL_TIMEOUT),
        )
        return model, inputs, ""
    if method.startswith("diffusers"):
        from diffusers import ContextParallelConfig

        cfg = (
            ContextParallelConfig(ulysses_degree=WORLD)
            if method == "diffusers-ulysses"
            else ContextParallelConfig(ring_degree=WORLD)
        )
        try:
            model.enable_parallelism(config=cfg)  # as shipped first: fails on CPU
            return model, inputs, ""
        except ZeroDivisionError:
            # diffusers' ModelMixin._resolve_parallel_config does
            #   torch.device(device_type, rank % torch.accelerator.device_count())
            # and device_count() is 0 without an accelerator. The ZeroDivisionError is raised
            # before anything is recorded on the model, so the same model can be retried.
            with accelerator_count_shim():
                model.enable_parallelism(config=cfg)
            return model, inputs, SHIM_DIFFUSERS
    if method.startswith("cache-dit"):
        import cache_dit
        from cache_dit import ParallelismConfig

        pc = (
            ParallelismConfig(ulysses_size=WORLD)
            if method == "cache-dit-ulysses"
            else ParallelismConfig(ring_size=WORLD)
        )
        model = cache_dit.enable_cache(model, cache_config=None, parallelism_config=pc)
        return model, inputs, ""
    raise ValueError(method)


class Store:
    """Coordination through the parent's TCPStore only (no collective group over all ranks):
    processes of failed methods can leave early without breaking anyone's barrier."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def put(self, key: str, value: Any) -> None:
        self.store.set(key, json.dumps(value))

    def get(self, key: str) -> Any:
        return json.loads(self.store.get(key))  # blocks until the key exists

    def wait(self, *keys: str) -> None:
        self.store.wait(list(keys))  # a blocking socket read: no CPU while waiting


def rank_main(
    index: int, args: argparse.Namespace, store_port: int, case: tuple[str, dict, Any], q
) -> None:
    """One rank of one method for one case: process `index` is local rank index % 2 of method
    args.methods[index // 2]. Each pair's default process group is its own 2-rank world, so the
    peers run unmodified over "the whole group" and a peer that fails or patches globals (cache-dit
    patches diffusers' attention registry) cannot disturb another method."""
    torch.set_num_threads(1)
    global COLL_TIMEOUT
    COLL_TIMEOUT = args.coll_timeout
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch.distributed as dist

    name, kw, ref = case
    methods = args.methods
    M = len(methods)
    method, lr, pair = methods[index // WORLD], index % WORLD, index // WORLD
    raw_store = dist.TCPStore(
        "127.0.0.1",
        store_port,
        is_master=False,
        timeout=datetime.timedelta(seconds=4 * args.coll_timeout + 120),
    )
    st = Store(raw_store)
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"{name}/pair{pair}", raw_store),
        rank=lr,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=args.coll_timeout),
    )
    import diffusers  # noqa: F401

    def pair_ok(key: str) -> tuple[bool, str]:
        """Both ranks of this pair wrote `key`; a failure on either fails the method."""
        outs = [st.get(f"{key}/{r}") for r in range(WORLD)]
        bad = [(r, o["msg"]) for r, o in enumerate(outs) if not o["ok"]]
        if bad:
            return False, bad[0][1] + (f" (rank {bad[0][0]} only)" if len(bad) < WORLD else "")
        return True, outs[0]["msg"]

    def leave(res: dict[str, Any]) -> None:
        """Report and exit at once. A failed peer can leave operations posted on its group
        (cache-dit's ring does; its gloo thread then spun at ~1 core while the other methods
        were being timed): the process must go, not linger."""
        q.put((name, method, lr, res))
        q.close()
        q.join_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    res: dict[str, Any] = {"method": method, "rank": lr}
    model = inputs = None
    diff = float("nan")
    t0 = time.perf_counter()
    try:
        model, inputs, msg = setup_method(method, name, kw)
        ok = True
    except Exception as e:  # noqa: BLE001 - a failing peer is a result
        ok, msg = False, "setup: " + short(e)
        if args.verbose:
            traceback.print_exc()
    if ok:
        try:
            with torch.no_grad():
                out = first_tensor(model(**inputs))
                out2 = first_tensor(model(**inputs))  # warm-up (cpfx: the captured graph reused)
            diff = max((out - ref).abs().max().item(), (out2 - ref).abs().max().item())
            del out, out2
        except Exception as e:  # noqa: BLE001
            ok, msg = False, "forward: " + short(e)
            if args.verbose:
                traceback.print_exc()
    res["setup_and_first_calls_s"] = time.perf_counter() - t0
    st.put(f"{name}/{method}/setup/{lr}", {"ok": ok, "msg": msg})
    alive, msg = pair_ok(f"{name}/{method}/setup")
    st.put(f"{name}/alive/{pair}", alive)  # both ranks write the same value
    if not alive:
        res["error"] = msg
        leave(res)
    res["max_abs_diff"] = diff
    res["shim"] = msg
    if method.startswith("cpfx"):
        import cpfx

        res["sent_bytes_per_rank"] = cpfx.sent_bytes_per_call(model)
        res["graphs_after_warmup"] = len(model._cpfx["graphs"])

    # every pair has set up; the timed turns go round the pairs that work
    order = [k for k in range(M) if st.get(f"{name}/alive/{k}")]

    # timed rounds: one pair at a time. Turn t belongs to one pair; it starts when turn t-1's
    # "done" key is in the store and sets its own when both its ranks have finished. Every
    # other process blocks in a TCPStore wait (a socket read: no CPU) meanwhile, so nothing
    # but the pair being timed (and whatever else runs on the machine) uses the cores.
    times: list[float] = []
    own_cpu = 0.0  # CPU time of this process during its own timed forwards
    cpu0, wall0 = time.process_time(), time.perf_counter()
    turn = 0
    with torch.no_grad():
        for r in range(args.repeats):
            for j in range(len(order)):
                k = order[(j + r) % len(order)]  # rotate the order every round
                if turn:
                    st.wait(f"{name}/done/{turn - 1}")
                if k == pair and alive:
                    dist.barrier()  # both ranks of this pair start together
                    c0, t0 = time.process_time(), time.perf_counter()
                    try:
                        first_tensor(model(**inputs))
                        fok, fmsg = True, ""
                    except Exception as e:  # noqa: BLE001
                        fok, fmsg = False, "timed forward: " + short(e)
                    dt = time.perf_counter() - t0
                    own_cpu += time.process_time() - c0
                    st.put(f"{name}/{method}/t{r}/{lr}", {"ok": fok, "msg": fmsg, "dt": dt})
                    ok_r, fmsg = pair_ok(f"{name}/{method}/t{r}")  # waits for the partner
                    if ok_r:
                        times.append(
                            max(st.get(f"{name}/{method}/t{r}/{i}")["dt"] for i in range(WORLD))
                        )
                    else:
                        alive = False
                        res["error"] = fmsg
                        model = inputs = None
                    if lr == 0:
                        raw_store.set(f"{name}/done/{turn}", "1")
                elif k == pair and lr == 0:  # failed during the timed rounds: pass the turn
                    raw_store.set(f"{name}/done/{turn}", "1")
                turn += 1
        st.wait(f"{name}/done/{turn - 1}")
    # CPU this process used outside its own timed forwards during the timed phase: ~0 expected
    res["timing_phase_wall_s"] = time.perf_counter() - wall0
    res["waiting_cpu_s"] = time.process_time() - cpu0 - own_cpu
    if alive and times:
        res["times_s"] = times
        res["median_s"] = statistics.median(times)
        if method.startswith("cpfx"):
            n = len(model._cpfx["graphs"])
            if n != res["graphs_after_warmup"]:
                res["shim"] = f"recompiled during timing ({n} graphs)"
    if alive:
        dist.barrier()  # the partner has read every key it needs
    leave(res)


def merge(rank_results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the two ranks' reports of one method."""
    rs = sorted(rank_results, key=lambda r: r["rank"])
    out = dict(rs[0])
    out.pop("rank", None)
    diffs = [r.get("max_abs_diff") for r in rs if r.get("max_abs_diff") is not None]
    if diffs:
        out["max_abs_diff"] = max(diffs)
    out["setup_and_first_calls_s"] = max(r["setup_and_first_calls_s"] for r in rs)
    out["waiting_cpu_s"] = sum(r.get("waiting_cpu_s", 0.0) for r in rs)
    for r in rs:
        if "error" in r:
            out["error"] = r["error"]
            out.pop("median_s", None)
    return out


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
    scale = single["ref"].abs().max().item()
    lines = [f"== {name}: {tokens_of(name, kw)}; {kw}; reference max |y| = {scale:.3g}"]
    hdr = (
        f"{'method':<22}{'ms/fwd':>9}{'vs single':>11}{'cpfx/peer':>11}{'max abs diff':>14}  status"
    )
    lines.append(hdr)
    lines.append("-" * len(hdr))
    sm = single["median_s"]
    lines.append(
        f"{'single process':<22}{single['best_s'] * 1e3:9.1f}{1.0:10.2f}x{'':>11}{0.0:14.1e}  "
        f"ok (best of: 1 thread {sm[1] * 1e3:.1f} ms, 2 threads {sm[2] * 1e3:.1f} ms)"
    )
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
    p = parser(__doc__)
    p.add_argument("--models", default="flux,qwen,wan", help="comma list of flux,qwen,wan")
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma list of " + ",".join(METHODS)
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed forwards per method (default 5, quick 3)"
    )
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--coll-timeout", type=float, default=120.0, help="gloo collective timeout (s)")
    p.add_argument(
        "--deadline", type=float, default=1500.0, help="kill the ranks after this many s"
    )
    p.add_argument("--verbose", action="store_true", help="print peer tracebacks")
    args = p.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m}")
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in CASES:
            p.error(f"unknown model {m}")

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    print(
        f"side_by_side: torch {torch.__version__}, {os.cpu_count()} cores, load avg {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f}; N={WORLD} gloo ranks x 1 thread; repeats={args.repeats}"
        f"{' (quick)' if args.quick else ''}",
        flush=True,
    )
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    from importlib import metadata

    for pkg, dist_name in (
        ("diffusers", "diffusers"),
        ("cache_dit", "cache-dit"),
        ("cpfx", "cpfx"),
    ):
        try:
            __import__(pkg)
            versions[pkg] = metadata.version(dist_name)
        except Exception as e:  # noqa: BLE001
            versions[pkg] = "not importable: " + short(e)
    try:
        import subprocess

        here = os.path.dirname(os.path.abspath(__file__))

        def git(*a: str) -> str:
            return subprocess.run(
                ["git", "-C", here, *a], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()

        dirty = git("status", "--porcelain", "--", "../cpfx", "../passes", "../kernels")
        versions["cpfx_git"] = git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except Exception as e:  # noqa: BLE001 - only informative
        versions["cpfx_git"] = "unknown: " + short(e)
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
        print(
            f"[phase 1] {name}: single process 1 thread {s['median_s'][1] * 1e3:.1f} ms, "
            f"2 threads {s['median_s'][2] * 1e3:.1f} ms ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )

    import torch.distributed as dist

    store = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=4 * args.coll_timeout + 120),
    )
    nprocs = WORLD * len(args.methods)
    print(
        f"[phase 2] per model: {nprocs} rank processes, one gloo pair per method "
        f"({', '.join(args.methods)}), taking turns",
        flush=True,
    )
    ctx = mp.get_context("spawn")
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    problems: dict[str, str] = {}
    deadline = time.perf_counter() + args.deadline
    for case in cases:
        name = case[0]
        q = ctx.Queue()
        per = raw.setdefault(name, {})

        def drain(q: Any = q, per: dict[str, list[dict[str, Any]]] = per) -> None:
            while True:
                try:
                    _name, method, _lr, res = q.get_nowait()
                except Exception:  # noqa: BLE001 - queue.Empty
                    return
                per.setdefault(method, []).append(res)

        if time.perf_counter() > deadline:
            problems[name] = f"not run: the {args.deadline:.0f} s deadline had passed"
            continue
        pc = mp.start_processes(
            rank_main,
            args=(args, store.port, case, q),
            nprocs=nprocs,
            join=False,
            start_method="spawn",
        )
        try:
            while not pc.join(timeout=1):
                drain()
                if time.perf_counter() > deadline:
                    problems[name] = f"ranks killed after the {args.deadline:.0f} s deadline"
                    for proc in pc.processes:
                        if proc.is_alive():
                            proc.kill()
                    break
        except Exception as e:  # noqa: BLE001 - a rank died: report what we have
            problems[name] = "rank process died: " + short(e, 400)
            for proc in pc.processes:
                if proc.is_alive():
                    proc.kill()
        time.sleep(0.3)
        drain()
        print(
            f"[phase 2] {name} done ({time.perf_counter() - t_start:.0f} s since start)", flush=True
        )
    problem = "; ".join(f"{k}: {v}" for k, v in problems.items()) or None
    results: dict[str, dict[str, Any]] = {}
    for name, per in raw.items():
        if name in problems and not per:
            continue
        results[name] = {}
        for m in args.methods:
            rs = per.get(m, [])
            if len(rs) == WORLD:
                results[name][m] = merge(rs)
            else:
                results[name][m] = {
                    "method": m,
                    "error": f"no result from {WORLD - len(rs)} rank(s): "
                    + problems.get(name, "rank exited without reporting"),
                }

    print()
    out_json: dict[str, Any] = {
        "versions": versions,
        "load_avg_start": load,
        "repeats": args.repeats,
        "quick": args.quick,
        "world": WORLD,
        "tolerance": TOL,
        "cases": {},
    }
    for name, kw, _ in cases:
        single = singles[name]
        res = results.get(name)
        if res is None:
            print(f"== {name}: no result from the ranks ({problem or 'unknown'})\n")
            out_json["cases"][name] = {"config": kw, "error": problem or "no result"}
            continue
        print(table(name, kw, single, res))
        wall = max((r.get("timing_phase_wall_s", 0.0) for r in res.values()), default=0.0)
        waiting = sum(r.get("waiting_cpu_s", 0.0) for r in res.values())
        if wall:
            print(
                f"   timed phase {wall:.1f} s; all rank processes together used {waiting:.2f} CPU-s "
                f"outside their own timed forwards ({100 * waiting / wall:.0f}% of one core; "
                "turn-taking overhead, should be near 0)"
            )
        print()
        rows = {}
        for m, r in res.items():
            rr = dict(r)
            rr["status"] = status_of(r)
            if r.get("median_s"):
                rr["ratio_vs_single"] = single["best_s"] / r["median_s"]
                cp = CPFX_COUNTERPART.get(m)
                if cp and res.get(cp, {}).get("median_s"):
                    rr["ratio_cpfx_over_peer"] = res[cp]["median_s"] / r["median_s"]
            rows[m] = rr
        out_json["cases"][name] = {
            "config": kw,
            "tokens": tokens_of(name, kw),
            "single_process": {
                "median_s_by_threads": single["median_s"],
                "best_threads": single["best_threads"],
                "best_s": single["best_s"],
                "times_s_by_threads": single["times_s"],
            },
            "methods": rows,
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
    print(
        f"total {out_json['wall_s']:.0f} s; load avg at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}"
        " (timings on a shared 2-core VM are load-sensitive: compare ratios from the same run)"
    )
    write_json(args.json, out_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
