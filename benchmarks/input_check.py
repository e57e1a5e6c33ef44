"""What the default input check costs: every input hashed on every call (`check_inputs="always"`,
the default) vs hashed on a signature's first call only ("first") vs no check ("never").

    python benchmarks/input_check.py [--world 2] [--repeats 7] [--blocks 1,2]

A Flux transformer whose inputs have FLUX.1-dev's shapes at 1024x1024 (latents [1, 4096, 64],
T5 states [1, 512, 4096], pooled [1, 768], ids, timestep, guidance: 2.4 M input elements) but few
and narrow blocks (`--blocks` double,single, 4 heads x 128), float32, 1 thread per rank on real
gloo ranks. Three copies of the model, one per setting, called in turns; a call's time is the
slowest rank's. Also the hashing alone (`rankcheck.digest_rows` over those inputs, one process).
A real FLUX.1-dev call has 57 blocks of 24 heads, so the share measured here is an upper bound.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch
from _common import environment, medians_in_turns, parser, write_json

from cpfx.testing.launch import spawn_ranks


def build(args: argparse.Namespace):
    from diffusers import FluxTransformer2DModel

    double, single = (int(x) for x in args.blocks.split(","))
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
        attention_head_dim=128, num_attention_heads=4, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    ).eval()
    g = torch.Generator().manual_seed(1)
    img, txt = args.img, args.txt
    inputs = dict(
        hidden_states=torch.randn(1, img, 64, generator=g),
        encoder_hidden_states=torch.randn(1, txt, 4096, generator=g),
        pooled_projections=torch.randn(1, 768, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.randn(img, 3, generator=g),
        txt_ids=torch.zeros(txt, 3),
        guidance=torch.tensor([3.5]),
        return_dict=False,
    )
    return model, inputs


def hashing_alone(inputs: dict, repeats: int) -> float:
    """Median seconds of `digest_rows` over the call's tensors (what "always" adds per call)."""
    from cpfx import rankcheck
    from cpfx.runtime import SLOTS, SMALL

    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        rankcheck.digest_rows(tensors, SLOTS, SMALL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def _rank(rank: int, world: int, q, args: argparse.Namespace, ref) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import cpfx

    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ulysses",))
    model, inputs = build(args)
    models = {k: copy.deepcopy(model) for k in ("always", "first", "never")}
    for k, m in models.items():
        cpfx.parallelize(m, mesh, cpfx.ParallelConfig(check_inputs=k))

    def call(name: str) -> torch.Tensor:
        return models[name](**inputs)[0]

    errs = {}
    with torch.no_grad():
        for name in models:
            for _ in range(2):
                out = call(name)
            errs[name] = (out - ref).abs().max().item()
        median_s = medians_in_turns(
            {name: functools.partial(call, name) for name in models}, args.repeats
        )
    if rank == 0:
        q.put({"max_abs_vs_single": errs, "median_ms": {k: v * 1e3 for k, v in median_s.items()}})
    dist.destroy_process_group()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--img", type=int, default=4096, help="image tokens")
    p.add_argument("--txt", type=int, default=512, help="text tokens")
    p.add_argument("--blocks", default="1,2", help="double,single")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, inputs = build(args)
    with torch.no_grad():
        ref = model(**inputs)[0]
    alone_s = hashing_alone(inputs, args.repeats)
    r = spawn_ranks(_rank, args.world, args, ref)
    r["hashing_alone_ms"] = alone_s * 1e3
    r["input_elements"] = sum(v.numel() for v in inputs.values() if isinstance(v, torch.Tensor))
    r["config"] = vars(args)
    r["environment"] = environment()
    med = r["median_ms"]
    print(
        f"Flux with FLUX.1-dev's inputs ({r['input_elements'] / 1e6:.1f} M elements), blocks "
        f"{args.blocks}, {args.world} gloo ranks x 1 thread (ms per call, medians of "
        f"{args.repeats}):"
    )
    for k, v in med.items():
        print(
            f"  check_inputs={k:<7} {v:8.2f}  {v / med['never']:.4f}x never   "
            f"max |out - single| {r['max_abs_vs_single'][k]:.1e}"
        )
    print(
        f"  hashing the inputs alone: {r['hashing_alone_ms']:.2f} ms "
        f"({r['hashing_alone_ms'] / med['always'] * 100:.2f}% of an 'always' call)"
    )
    write_json(args.json, r)


if __name__ == "__main__":
    main()
