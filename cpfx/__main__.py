"""Command line: `python -m cpfx explain --model flux --world 4 --mesh usp`."""

from __future__ import annotations

import argparse
import json

from cpfx.config import ParallelConfig


def main(argv: list[str] | None = None) -> None:
    from cpfx import tiny

    p = argparse.ArgumentParser(prog="python -m cpfx")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("explain", help="show the shard plan, strategies and bytes for a tiny model")
    e.add_argument("--model", choices=sorted(tiny.BUILDERS), default="flux")
    e.add_argument("--world", type=int, default=4)
    e.add_argument("--mesh", choices=["ulysses", "ring", "usp"], default="ulysses")
    e.add_argument("--rotate", choices=["p2p", "allgather"], default="p2p")
    e.add_argument("--fp8", action="store_true")
    e.add_argument("--model-kwargs", default="{}", help='JSON, e.g. \'{"img": 1023, "heads": 3}\'')
    e.add_argument("--json", help="also write the report as JSON here")
    args = p.parse_args(argv)

    from cpfx.explain import explain

    model, inputs = tiny.build(args.model, **json.loads(args.model_kwargs))
    if args.mesh == "usp":
        shape, names = (2, args.world // 2), ("ring", "ulysses")
    else:
        shape, names = (args.world,), (args.mesh,)
    cfg = ParallelConfig(ring_rotate=args.rotate, fp8_comm=args.fp8)
    report = explain(
        model, None, cfg, world=args.world, mesh_shape=shape, mesh_dim_names=names, **inputs
    )
    if args.json:
        import dataclasses

        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(report), f, indent=1, default=str)


if __name__ == "__main__":
    main()
