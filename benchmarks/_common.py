"""What the benchmark scripts share: the command line's common part and how results are written.

The scripts run as `python benchmarks/<name>.py` (this folder is then on `sys.path`), so they
import this module as `_common`; everything else they need comes from the installed `cpfx`
(`cpfx.testing` for tiny models and local ranks, `cpfx.measure` for timing and memory).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
"""Where dated results are kept (`benchmarks/RESULTS.md` cites them)."""


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser that shows the script's docstring as its help, with `--json PATH`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return p


def environment() -> dict[str, Any]:
    """The versions, date and machine a result was measured with."""
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    return {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(path: str | os.PathLike[str] | None, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` (nothing if `path` is None); values JSON does not
    know are written as their `str`."""
    if path is None:
        return
    Path(path).write_text(json.dumps(obj, indent=1, default=str))
    print("wrote", path)


def medians_in_turns(
    calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 0
) -> dict[str, float]:
    """On every rank of the default process group: call each of `calls` in turns (A B C, then
    C B A, ...), each call's time the slowest rank's (ranks start together after a barrier);
    the median seconds per name over `repeats` rounds after `warmup` untimed ones."""
    import statistics
    import time

    import torch
    import torch.distributed as dist

    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + repeats):
        for name in list(calls) if i % 2 == 0 else list(reversed(calls)):
            dist.barrier()
            t0 = time.perf_counter()
            calls[name]()
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if i >= warmup:
                times[name].append(dt.item())
    return {name: statistics.median(v) for name, v in times.items()}
