"""Model x strategy matrix on gloo ranks: measured max abs difference vs the single process.

    python benchmarks/model_matrix.py [--models flux,qwen] [--json out.json]   # a markdown table

Every tiny family of `cpfx.testing.tiny` under each strategy, on a pool of local gloo ranks
(`cpfx.testing.launch.Pool`), each rank comparing with its own single-process output
(`cpfx.testing.parity`).
"""

from __future__ import annotations

from _common import environment, parser, write_json

CASES = {
    "Ulysses N=2": dict(world=2),
    "ring N=2 (p2p)": dict(world=2, mesh_names=("ring",), config={"ring_rotate": "p2p"}),
    "USP 2x2": dict(world=4, mesh_shape=(2, 2), mesh_names=("ring", "ulysses")),
    "uneven N=3": dict(world=3),
    "FP8 Ulysses N=2 (rel L2)": dict(world=2, config={"fp8_comm": True}),
}


def main() -> None:
    from cpfx.testing.launch import Pool
    from cpfx.testing.parity import parity
    from cpfx.testing.tiny import NAMES

    p = parser(__doc__)
    p.add_argument("--models", default=",".join(NAMES))
    args = p.parse_args()
    models = args.models.split(",")
    pools: dict[int, Pool] = {}
    table: dict[str, dict[str, str]] = {m: {} for m in models}
    try:
        for case, kw in CASES.items():
            kw = dict(kw)
            world = kw.pop("world")
            pool = pools.setdefault(world, Pool(world))
            for m in models:
                try:
                    res = pool.run(parity, model=m, **kw)[0]
                    key = "rel_l2" if "FP8" in case else "max_abs"
                    table[m][case] = f"{res[key]:.1e}"
                except Exception as e:  # noqa: BLE001 - a failure is a result
                    table[m][case] = "fails: " + str(e).splitlines()[1][:60]
                print(m, case, table[m][case], flush=True)
    finally:
        for pool in pools.values():
            pool.close()
    print("\n| model | " + " | ".join(CASES) + " |")
    print("|---|" + "---|" * len(CASES))
    for m in models:
        print(f"| {m} | " + " | ".join(table[m].get(c, "") for c in CASES) + " |")
    write_json(args.json, {"environment": environment(), "table": table})


if __name__ == "__main__":
    main()
