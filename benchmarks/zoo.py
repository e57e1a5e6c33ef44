"""Sweep every diffusers transformer class (`cpfx.testing.zoo`) through cpfx on gloo ranks.

    python benchmarks/zoo.py [--cases a,b] [--strategies ulysses2,ring2,ulysses3,regional3,dynamic2,dynamic3r,batch2]
                             [--json out.json] [--timeout S]

For each case: the single-process reference (float32, eval, no_grad), plain
`torch.compile(backend="eager")` of it (separates Dynamo's limits from cpfx's), then
`cpfx.parallelize` on real gloo ranks for each strategy, every (case, strategy) in freshly started
processes with a deadline, so a crash or hang is a result, not the end of the sweep. Verdicts:

    exact                          every output within 1e-5 * max(1, max |ref|), attention lowered
    exact, nothing parallelized    within tolerance but no attention was context-parallelized
    refused: <line>                a cpfx.CpfxError other than cpfx.PassError
    internal error: <type>: <line> anything else (PassError, errors from torch or cpfx's code)
    SILENT WRONG (max abs X)       ran, but the output differs
    crash / timeout                a rank process died / did not finish in time

Prints one markdown row per case and the count of each verdict; `--json` keeps everything,
including cpfx's `shard_tokens` / `lower_attention` counters and the first error's traceback.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import math
import multiprocessing as mp
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from _common import parser, write_json
from torch.overrides import TorchFunctionMode

TOL = 1e-5
"""Allowed max abs difference, relative to max(1, max |reference|)."""
TOL_LOW_PRECISION = 1e-2
"""The same, for models whose attention itself runs in bf16/fp16 (even in an fp32 model): a
context-parallel attention rounds its partial results once more than the single process."""


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A mesh and a config for `cpfx.parallelize`."""

    world: int
    mesh_names: tuple[str, ...]
    config: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    calls: int = 1
    """Calls made; the last one's output is compared."""


STRATEGIES: dict[str, Strategy] = {
    "ulysses2": Strategy(2, ("ulysses",)),
    "ring2": Strategy(2, ("ring",), {"ring_rotate": "p2p"}),
    "ulysses3": Strategy(3, ("ulysses",)),
    # Three calls: a regional block graph keeps its token shards from its second run on.
    "regional3": Strategy(3, ("ulysses",), {"regional": True}, calls=3),
    # Sizes captured symbolically; the graphs that run are static variants planned from them.
    "dynamic2": Strategy(2, ("ulysses",), {"dynamic": True}),
    "dynamic3r": Strategy(3, ("ulysses",), {"regional": True, "dynamic": True}, calls=3),
    # The batch rows split across ranks (a batch-1 case is refused by name).
    "batch2": Strategy(2, ("batch",)),
}

PRELOAD = [
    "torch",
    "torch.distributed",
    "diffusers.models.transformers",
    "cpfx",
    "cpfx.testing.zoo",
]
"""Imported once by the fork server; every job process forks from it (imports cost ~4 s each)."""


# ---------------------------------------------------------------------------------------------
# Inside the job processes


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _error(e: BaseException) -> dict[str, Any]:
    """How an exception is reported: type, first line, cpfx's classification, traceback tail."""
    import cpfx

    cause = e
    # Dynamo wraps backend errors (BackendCompilerFailed); report what the backend raised.
    while not isinstance(cause, cpfx.CpfxError) and getattr(cause, "inner_exception", None):
        cause = cause.inner_exception
    if not isinstance(cause, cpfx.CpfxError) and isinstance(e.__cause__, cpfx.CpfxError):
        cause = e.__cause__
    return {
        "type": type(cause).__name__,
        "message": _first_line(cause),
        "refused": isinstance(cause, cpfx.CpfxError) and not isinstance(cause, cpfx.PassError),
        "traceback": "".join(traceback.format_exception(e))[-6000:],
    }


def _diffs(ref: list[torch.Tensor], out: list[torch.Tensor]) -> dict[str, Any]:
    """Max abs difference per output tensor (inf on a shape mismatch or a non-finite value)."""
    if len(ref) != len(out):
        return {"max_abs": [float("inf")], "ref_max_abs": [], "shapes": "count differs"}
    diffs, ref_max = [], []
    for r, o in zip(ref, out):
        if r.shape != o.shape:
            diffs.append(float("inf"))
        else:
            d = (r.double() - o.detach().double()).abs().max().item() if r.numel() else 0.0
            diffs.append(float("inf") if math.isnan(d) else d)
        ref_max.append(r.double().abs().max().item() if r.numel() else 0.0)
    return {"max_abs": diffs, "ref_max_abs": ref_max}


def _write(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.rename(path)


class _CountAttention(TorchFunctionMode):
    """Counts the attention calls of a forward (SDPA and flex attention), by function name."""

    NAMES = ("scaled_dot_product_attention", "flex_attention")

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()
        self.dtypes: set[str] = set()
        """dtypes of the attention queries"""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.calls[name] += 1
            q = args[0] if args else (kwargs or {}).get("query")
            if isinstance(q, torch.Tensor):
                self.dtypes.add(str(q.dtype).replace("torch.", ""))
        return func(*args, **(kwargs or {}))


def reference_job(case_name: str, out_dir: str) -> None:
    """Single process: save the reference outputs, then try `torch.compile(backend="eager")`."""
    from cpfx.testing import zoo

    torch.set_num_threads(1)
    out = Path(out_dir)
    res: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        model, kwargs = zoo.build(case_name)
        counting = _CountAttention()
        with torch.no_grad(), counting:
            ref = [t.detach().clone() for t in zoo.outputs(model(**kwargs))]
        res["reference"] = {
            "ok": True,
            "seconds": time.perf_counter() - t0,
            "attention_calls": dict(counting.calls),
            "attention_dtypes": sorted(counting.dtypes),
            "shapes": [list(t.shape) for t in ref],
            "max_abs": [t.double().abs().max().item() for t in ref],
        }
        torch.save(ref, out / "ref.pt")
    except Exception as e:  # noqa: BLE001 - a failure is a result
        res["reference"] = {"ok": False, "error": _error(e)}
        _write(out / "reference.json", res)
        return
    _write(out / "reference.json", res)
    res["eager_dynamo"] = _eager_dynamo(case_name, ref)
    _write(out / "reference.json", res)


def _eager_dynamo(case_name: str, ref: list[torch.Tensor]) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    from cpfx.testing import zoo

    torch._dynamo.reset()
    counters.clear()
    try:
        model, kwargs = zoo.build(case_name)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = zoo.outputs(torch.compile(model, backend="eager")(**kwargs))
        d = _diffs(ref, out)
        ok = all(x <= TOL * max(1.0, m) for x, m in zip(d["max_abs"], d["ref_max_abs"]))
        return {
            "ok": ok,
            "seconds": time.perf_counter() - t0,
            "graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()),
            **d,
        }
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": _error(e)}


def rank_job(
    rank: int, case_name: str, strategy: str, port: int, out_dir: str, timeout: float
) -> None:
    """One rank of `cpfx.parallelize(model, mesh, config)(**inputs)`, compared with the reference."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import cpfx
    from cpfx.testing import zoo

    torch.set_num_threads(1)
    spec = STRATEGIES[strategy]
    res: dict[str, Any] = {"rank": rank}
    t0 = time.perf_counter()
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=spec.world,
            timeout=datetime.timedelta(seconds=timeout),
        )
        mesh = init_device_mesh("cpu", (spec.world,), mesh_dim_names=spec.mesh_names)
        cpfx.reset_counters()
        torch._dynamo.reset()
        model, kwargs = zoo.build(case_name)
        model = cpfx.parallelize(model, mesh, cpfx.ParallelConfig(**spec.config))
        with torch.no_grad():
            for _ in range(spec.calls):
                out = zoo.outputs(model(**kwargs))
        res.update(ok=True, **_diffs(torch.load(Path(out_dir) / "ref.pt"), out))
    except Exception as e:  # noqa: BLE001 - a failure is a result
        res.update(ok=False, error=_error(e))
    res["seconds"] = time.perf_counter() - t0
    res["counters"] = {k: dict(v) for k, v in cpfx.counters.items()}
    _write(Path(out_dir) / f"rank{rank}.json", res)
    if res["ok"] and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(
    ctx: Any, target: Any, arg_sets: list[tuple[Any, ...]], out: Path, timeout: float
) -> dict[str, Any]:
    """Start one process per arg tuple; wait until all exit or `timeout` passes. Once one reports
    an error or dies, the others get 15 s more (they may be stuck in a collective with it)."""
    procs = [ctx.Process(target=target, args=a, daemon=True) for a in arg_sets]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        died = any(p.exitcode not in (None, 0) for p in procs)
        if died or any(_reported_error(f) for f in out.glob("rank*.json")):
            deadline = min(deadline, time.monotonic() + 15)
        time.sleep(0.2)
    crashed = any(p.exitcode not in (None, 0) for p in procs)
    timed_out = any(p.is_alive() for p in procs) and not crashed
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    return {
        "timed_out": timed_out,
        "exitcodes": [p.exitcode for p in procs],
        "seconds": time.monotonic() - t0,
    }


def _reported_error(path: Path) -> bool:
    try:
        return not json.loads(path.read_text())["ok"]
    except (OSError, ValueError, KeyError):
        return False


def _exit_text(code: int | None) -> str:
    if code is None:
        return "killed"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


def run_reference(ctx: Any, case_name: str, out: Path, timeout: float) -> dict[str, Any]:
    proc = _run_processes(ctx, reference_job, [(case_name, str(out))], out, timeout)
    path = out / "reference.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if "reference" not in res:
        why = "timeout" if proc["timed_out"] else f"crash ({_exit_text(proc['exitcodes'][0])})"
        res["reference"] = {"ok": False, "error": {"type": why, "message": "", "refused": False}}
    if "eager_dynamo" not in res and res["reference"]["ok"]:
        why = "timeout" if proc["timed_out"] else f"crash ({_exit_text(proc['exitcodes'][0])})"
        res["eager_dynamo"] = {"ok": False, "error": {"type": why, "message": "", "refused": False}}
    res["seconds"] = proc["seconds"]
    return res


def _tolerance(reference: dict[str, Any]) -> float:
    low = {"bfloat16", "float16"} & set(reference.get("attention_dtypes", ()))
    return TOL_LOW_PRECISION if low else TOL


def run_strategy(
    ctx: Any, case_name: str, strategy: str, out: Path, timeout: float, tol: float = TOL
) -> dict[str, Any]:
    """All ranks of one (case, strategy) in fresh processes; returns the verdict and the details."""
    for f in out.glob("rank*"):
        f.unlink()
    world = STRATEGIES[strategy].world
    port = _free_port()
    args = [(r, case_name, strategy, port, str(out), timeout) for r in range(world)]
    proc = _run_processes(ctx, rank_job, args, out, timeout)
    ranks = {}
    for r in range(world):
        path = out / f"rank{r}.json"
        if path.exists():
            ranks[r] = json.loads(path.read_text())
    return {"verdict": verdict(ranks, proc, world, tol), "tolerance": tol, "ranks": ranks, **proc}


def verdict(
    ranks: dict[int, dict[str, Any]], proc: dict[str, Any], world: int, tol: float = TOL
) -> str:
    """The one-line verdict of a (case, strategy) from what its ranks reported."""
    errors = [ranks[r]["error"] for r in sorted(ranks) if not ranks[r]["ok"]]
    # A rank that sees its peer fail reports a RankDivergenceError: the peer's error is the cause.
    causes = [e for e in errors if e["type"] != "RankDivergenceError"]
    if causes or (errors and len(ranks) == world):
        e = (causes or errors)[0]
        if e["refused"]:
            return f"refused: {e['message']}"
        return f"internal error: {e['type']}: {e['message']}"
    if len(ranks) < world:
        if proc["timed_out"]:
            return "timeout"
        dead = [_exit_text(c) for c in proc["exitcodes"] if c not in (0, -signal.SIGKILL)]
        return f"crash ({', '.join(dead) or 'no result'})"
    worst = 0.0
    ok = True
    for res in ranks.values():
        for d, m in zip(res["max_abs"], res["ref_max_abs"]):
            worst = max(worst, d)
            ok &= d <= tol * max(1.0, m)
    if not ok:
        return f"SILENT WRONG (max abs {worst:.1e})"
    # Parallel: some attention runs on this rank's queries only (context-parallel with
    # collectives, or cross-attention of local queries to replicated keys).
    st = ranks[0]["counters"].get("shard_tokens", {})
    parallel = st.get("attention_sharded", 0) + st.get("attention_local", 0)
    exact = "exact" if tol == TOL else "exact (bf16 attention)"
    return exact if parallel > 0 else f"{exact}, nothing parallelized"


def category(v: str) -> str:
    """A verdict without its details, for the summary counts."""
    for prefix in ("refused", "internal error", "SILENT WRONG", "crash"):
        if v.startswith(prefix):
            return prefix
    return v


# ---------------------------------------------------------------------------------------------
# The sweep and its report


def sweep(names: list[str], strategies: list[str], timeout: float) -> dict[str, Any]:
    from cpfx.testing import zoo

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cpfx-zoo-") as tmp:
        for name in names:
            case = zoo.BY_NAME[name]
            entry: dict[str, Any] = {"class": case.cls, "note": case.note, "strategies": {}}
            results[name] = entry
            if case.skip_reason:
                entry["skip_reason"] = case.skip_reason
                _progress(name, "skipped: " + case.skip_reason)
                continue
            out = Path(tmp) / name
            out.mkdir()
            t0 = time.monotonic()
            entry.update(run_reference(ctx, name, out, timeout))
            _progress(name, "eager-Dynamo " + _dynamo_cell(entry))
            for s in strategies:
                if entry["reference"]["ok"]:
                    entry["strategies"][s] = run_strategy(
                        ctx, name, s, out, timeout, _tolerance(entry["reference"])
                    )
                else:
                    entry["strategies"][s] = {"verdict": "no reference"}
                _progress(name, f"{s}: {entry['strategies'][s]['verdict']}")
            entry["case_seconds"] = time.monotonic() - t0
    return results


def _progress(name: str, text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {text}", file=sys.stderr, flush=True)


def _dynamo_cell(entry: dict[str, Any]) -> str:
    if "skip_reason" in entry:
        return "skipped"
    if not entry["reference"]["ok"]:
        e = entry["reference"]["error"]
        return f"reference fails: {e['type']}: {e['message']}"
    d = entry["eager_dynamo"]
    if "error" in d:
        return f"fails: {d['error']['type']}: {d['error']['message']}"
    if not d["ok"]:
        return f"differs ({max(d['max_abs']):.1e})"
    breaks = f", {d['graph_breaks']} breaks" if d["graph_breaks"] else ""
    return f"ok ({d['graphs']} graph{'s' if d['graphs'] != 1 else ''}{breaks})"


def _attention_cell(entry: dict[str, Any]) -> str:
    """Attention calls of the single-process forward: `4` SDPA, or `2 + 2 flex`."""
    calls = entry.get("reference", {}).get("attention_calls")
    if calls is None:
        return ""
    text = str(calls.get("scaled_dot_product_attention", 0))
    flex = calls.get("flex_attention", 0)
    return text + (f" + {flex} flex" if flex else "")


def _cell(text: str, width: int = 110) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def report(results: dict[str, Any], strategies: list[str], meta: dict[str, Any]) -> str:
    """The markdown table, one row per case, and the count of each verdict per strategy."""
    lines = [
        (
            f"diffusers {meta['diffusers']}, torch {meta['torch']}, {meta['date']}; "
            f"{len(results)} cases, {meta['seconds']:.0f} s"
        ),
        "",
        "| case | class | attention | eager-Dynamo | " + " | ".join(strategies) + " |",
        "|---|---|---|---|" + "---|" * len(strategies),
    ]
    counts: dict[str, collections.Counter[str]] = {s: collections.Counter() for s in strategies}
    for name, entry in results.items():
        cells = [name, entry["class"], _attention_cell(entry), _dynamo_cell(entry)]
        for s in strategies:
            v = entry.get("skip_reason") and "skipped" or entry["strategies"][s]["verdict"]
            counts[s][category(v)] += 1
            cells.append(v)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += [
        "",
        "| verdict | " + " | ".join(strategies) + " |",
        "|---|" + "---|" * len(strategies),
    ]
    for cat in sorted({c for cnt in counts.values() for c in cnt}):
        lines.append(f"| {cat} | " + " | ".join(str(counts[s][cat]) for s in strategies) + " |")
    return "\n".join(lines)


def main() -> None:
    import diffusers

    from cpfx.testing import zoo

    p = parser(__doc__)
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--strategies", default="ulysses2,ring2,ulysses3")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per job (default 300)")
    args = p.parse_args()
    names = args.cases.split(",") if args.cases else [c.name for c in zoo.CASES]
    strategies = args.strategies.split(",")
    for n in names:
        if n not in zoo.BY_NAME:
            p.error(f"unknown case {n!r}")
    for s in strategies:
        if s not in STRATEGIES:
            p.error(f"unknown strategy {s!r}; expected some of {', '.join(STRATEGIES)}")
    t0 = time.monotonic()
    results = sweep(names, strategies, args.timeout)
    meta = {
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "strategies": {s: dataclasses.asdict(STRATEGIES[s]) for s in strategies},
        "tolerance": TOL,
        "timeout_s": args.timeout,
        "seconds": time.monotonic() - t0,
        "cpus": os.cpu_count(),
    }
    print(report(results, strategies, meta))
    write_json(args.json, {"meta": meta, "cases": results})


if __name__ == "__main__":
    main()
