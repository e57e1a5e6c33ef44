"""Time to first output: whole-model capture vs regional (one graph per repeated block class).

    python benchmarks/first_call.py [--blocks 19,38] [--img 256] [--json out.json]

One process, fake 2-rank process group (compile-side costs only: the collectives return
placeholders), tiny Flux with FLUX.1's depth by default (19 double + 38 single blocks). Rows:
plain `torch.compile(backend="eager")` of the whole model; cpfx whole-model
(`ParallelConfig(regional=False)`); cpfx regional. Columns: first call, a second resolution's
first call, cpfx's pass time within them. Ratios are to the plain capture, measured in the same
run; `regional-dynamic` is `ParallelConfig(regional=True, dynamic=True)` (sizes captured
symbolically: a new resolution is a static variant, no new capture). A 2+2-block model is timed too (the pass time should not grow with depth in regional mode).
"""

from __future__ import annotations

import sys
import time

import torch
from _common import environment, parser, write_json

import cpfx
from cpfx.explain import fake_world
from cpfx.testing.tiny import build

_pass_s = [0.0]


def _count_pass_time() -> None:
    backend_mod = sys.modules["cpfx.backend"]
    run = backend_mod.run_passes

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return run(*a, **k)
        finally:
            _pass_s[0] += time.perf_counter() - t

    backend_mod.run_passes = timed


def _inputs(img: int, txt: int, layers: int, single: int):
    return build("flux", img=img, txt=txt, heads=2, head_dim=16, layers=layers, single=single)


def measure(mode: str, layers: int, single: int, img: int, txt: int) -> dict[str, float]:
    from torch.distributed.device_mesh import init_device_mesh

    torch._dynamo.reset()
    m, kw = _inputs(img, txt, layers, single)
    _, kw2 = _inputs(img // 2, txt, layers, single)
    row: dict[str, float] = {}
    with fake_world(2):
        if mode == "dynamo":
            f = torch.compile(m, backend="eager", dynamic=False)
        else:
            mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ulysses",))
            cfg = cpfx.ParallelConfig(
                regional=mode.startswith("regional"),
                dynamic=mode.endswith("dynamic"),
                check_collectives=False,
                check_inputs="never",
            )
            f = cpfx.parallelize(m, mesh, cfg)
        for key, k in (("first", kw), ("new_size", kw2)):
            _pass_s[0] = 0.0
            t = time.perf_counter()
            with torch.no_grad():
                f(**k)
            row[f"{key}_s"] = time.perf_counter() - t
            row[f"{key}_passes_s"] = _pass_s[0]
        t = time.perf_counter()
        with torch.no_grad():
            f(**kw2)
        row["steady_s"] = time.perf_counter() - t
    return row


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--blocks", default="19,38", help="double,single blocks of the deep model")
    ap.add_argument("--img", type=int, default=256)
    ap.add_argument("--txt", type=int, default=16)
    a = ap.parse_args()
    layers, single = (int(x) for x in a.blocks.split(","))
    _count_pass_time()
    rows = {}
    for depth in ((2, 2), (layers, single)):
        for mode in ("dynamo", "whole", "regional", "regional-dynamic"):
            r = measure(mode, *depth, a.img, a.txt)
            rows[f"{mode} {depth[0]}+{depth[1]}"] = r
            print(f"{mode:16s} {depth[0]:3d}+{depth[1]:<3d} first {r['first_s']:6.1f} s "
                  f"(passes {r['first_passes_s']:5.2f})  new size {r['new_size_s']:6.1f} s "
                  f"(passes {r['new_size_passes_s']:5.2f})", flush=True)
    deep = f"{layers}+{single}"
    plain = rows[f"dynamo {deep}"]["first_s"]
    for mode in ("whole", "regional", "regional-dynamic"):
        r = rows[f"{mode} {deep}"]
        print(f"{mode}: first call / plain Dynamo = {r['first_s'] / plain:.2f}; new size / first "
              f"= {r['new_size_s'] / r['first_s']:.2f}; passes {deep} / 2+2 = "
              f"{r['first_passes_s'] / max(rows[f'{mode} 2+2']['first_passes_s'], 1e-9):.2f}")
    if a.json:
        write_json(a.json, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
