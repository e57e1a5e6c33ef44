"""Command line: `python -m cpfx explain --model flux --world 4 --mesh usp` (the plan) and
`python -m cpfx doctor --model flux --world 2 [--disable single_transformer_blocks.0]` (what a
parallelized tiny model does at run time: `cpfx.diagnose`), both in one process under a fake
process group."""

from __future__ import annotations

import argparse
import json

from cpfx.config import ParallelConfig


def main(argv: list[str] | None = None) -> None:
    from cpfx.testing import tiny

    p = argparse.ArgumentParser(prog="python -m cpfx")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("explain", help="show the shard plan, strategies and bytes for a tiny model")
    e.add_argument("--model", choices=tiny.NAMES, default="flux")
    e.add_argument("--world", type=int, default=4)
    e.add_argument("--mesh", choices=["ulysses", "ring", "usp"], default="ulysses")
    e.add_argument("--rotate", choices=["p2p", "allgather"], default="p2p")
    e.add_argument("--fp8", action="store_true")
    e.add_argument("--model-kwargs", default="{}", help='JSON, e.g. \'{"img": 1023, "heads": 3}\'')
    e.add_argument("--json", help="also write the report as JSON here")
    e.add_argument("--verbose", action="store_true", help="also print every op's placement")
    d = sub.add_parser("doctor", help="run a parallelized tiny model twice and print cpfx.diagnose")
    d.add_argument("--model", choices=tiny.NAMES, default="flux")
    d.add_argument("--world", type=int, default=2)
    d.add_argument("--mesh", choices=["ulysses", "ring", "usp"], default="ulysses")
    d.add_argument("--model-kwargs", default="{}", help="JSON, e.g. '{\"img\": 1023}'")
    d.add_argument(
        "--disable",
        action="append",
        default=[],
        help="module path whose forward runs under torch.compiler.disable (shows what the report "
        "says about attention outside cpfx's graphs); repeatable",
    )
    args = p.parse_args(argv)
    if args.cmd == "doctor":
        doctor(args)
        return

    from cpfx.explain import explain

    model, inputs = tiny.build(args.model, **json.loads(args.model_kwargs))
    shape, names = _mesh_shape(args)
    cfg = ParallelConfig(ring_rotate=args.rotate, fp8_comm=args.fp8)
    report = explain(
        model,
        None,
        cfg,
        world=args.world,
        mesh_shape=shape,
        mesh_dim_names=names,
        verbose=args.verbose,
        **inputs,
    )
    if args.json:
        import dataclasses

        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(report), f, indent=1, default=str)


def _mesh_shape(args: argparse.Namespace) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The mesh shape and dim names `--world` and `--mesh` ask for."""
    if args.mesh == "usp":
        return (2, args.world // 2), ("ring", "ulysses")
    return (args.world,), (args.mesh,)


def doctor(args: argparse.Namespace) -> None:
    import warnings

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import cpfx
    from cpfx.testing import tiny

    model, inputs = tiny.build(args.model, **json.loads(args.model_kwargs))
    for path in args.disable:
        sub = model.get_submodule(path)
        sub.forward = torch.compiler.disable(sub.forward)
    shape, names = _mesh_shape(args)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.world)
    try:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        cpfx.parallelize(model, mesh, cpfx.ParallelConfig())
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", cpfx.CpfxWarning)  # the report below says it all
            model(**inputs)
            model(**inputs)
        print(cpfx.diagnose(model))
        print(
            "(one process under a fake process group: shapes, plan and bytes are those of rank 0;"
            " the output values are not computed)"
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
