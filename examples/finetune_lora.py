"""LoRA fine-tuning of a tiny Flux with context parallelism, a few steps on random data.

    torchrun --nproc-per-node 2 examples/finetune_lora.py              # Ulysses over 2 ranks
    torchrun --nproc-per-node 4 examples/finetune_lora.py --dp 2       # 2 samples x Ulysses 2
    torchrun --nproc-per-node 2 examples/finetune_lora.py --mesh ring --checkpointing

Every rank of a context-parallel group feeds the same sample (the same seed) and gets the whole
output; cpfx makes each rank's gradients the single process's, so a plain optimizer step keeps
the ranks' adapters identical. With `--dp`, each data-parallel slice trains on its own samples and
DDP averages the gradients over the slices. The script checks at the end that the adapters agree
on every rank.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from peft import LoraConfig
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

import cpfx
from cpfx.testing.tiny import build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dp", type=int, default=1, help="data-parallel slices")
    ap.add_argument("--mesh", choices=["ulysses", "ring"], default="ulysses")
    ap.add_argument("--image-tokens", type=int, default=256)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    a = ap.parse_args()

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world, rank = dist.get_world_size(), dist.get_rank()
    cp = world // a.dp
    names = ("dp", a.mesh) if a.dp > 1 else (a.mesh,)
    mesh = init_device_mesh("cpu", (a.dp, cp) if a.dp > 1 else (cp,), mesh_dim_names=names)

    model, _ = build("flux", img=a.image_tokens, txt=16, heads=4, head_dim=16, layers=2, single=2)
    model.requires_grad_(False)  # the base weights stay frozen; only the adapters train
    model.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"]))
    if a.checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    cpfx.parallelize(model, mesh)
    step_model = model
    if a.dp > 1:
        step_model = DistributedDataParallel(model, process_group=mesh.get_group("dp"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    dp_index = rank // cp
    for step in range(a.steps):
        # Same sample within a context-parallel group, another one per data-parallel slice.
        _, batch = build("flux", img=a.image_tokens, txt=16, heads=4, head_dim=16, layers=2,
                         single=2, seed=1000 * step + dp_index)
        target = torch.randn_like(batch["hidden_states"])
        t0 = time.perf_counter()
        out = step_model(**batch)[0]
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0:
            dt = time.perf_counter() - t0
            print(f"step {step}: loss {loss.item():.5f}  {dt:.2f} s", flush=True)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    spread = max((g - gathered[0]).abs().max().item() for g in gathered)
    if rank == 0:
        print(f"adapters on {world} ranks differ by at most {spread:.2g} after {a.steps} steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
