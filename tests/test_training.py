"""Exact gradients through a parallelized model (train mode, grad enabled) on real gloo ranks:
every parameter's gradient on every rank vs the single process, same weights, same loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cpfx.testing.parity import first_output, fresh, make_mesh
from cpfx.testing.tiny import build

pytestmark = pytest.mark.ranks

TOL = 1e-5  # relative to max(1, max |grad|) of each parameter


def check(results):
    for r, res in enumerate(results):
        assert not res["missing"], f"rank {r}: no gradient for {res['missing'][:3]}"
        top = sorted(res["errors"].items(), key=lambda kv: -kv[1])
        assert res["max_rel"] <= TOL, f"rank {r}: {top[:8]} ... {top[-3:]}"
        assert res["params"] >= 8
    return results[0]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("model", ["flux", "qwen", "wan"])
def test_ulysses_gradients(pools, model, world):
    res = check(pools(world).run(train_grads, model=model))
    assert res["counters"]["lower_attention"]["ulysses"] >= 2
    assert res["counters"]["shard_tokens"]["grad_sum"] > 0
    # the parameters' gradient sums travel as one coalesced all-reduce
    assert res["counters"]["training"]["gradient_sums_coalesced"] > 10


def test_input_gradient_batch_two_odd_lengths(pools):
    check(pools(3).run(train_grads, model="flux", input_grad=True, batch2=True,
                       model_kwargs={"img": 62, "txt": 7}))


@pytest.mark.parametrize(
    "model, names", [("wan", ("ulysses",)), ("qwen", ("ring",))], ids=["wan-ulysses", "qwen-ring"]
)
def test_gradient_checkpointing(pools, model, names):
    res = check(pools(2).run(train_grads, model=model, mesh_names=names, checkpointing=True,
                             steps=1))
    assert res["counters"]["training"]["recompute_tagged"] > 20  # the blocks are recomputed


def test_lora_with_gradient_checkpointing(pools):
    pytest.importorskip("peft")
    res = check(pools(2).run(train_grads, model="flux", lora=True, checkpointing=True))
    assert all("lora" in n for n in res["errors"]), "only the adapters are trained"


@pytest.mark.parametrize("rotate", ["allgather", "p2p"])
@pytest.mark.parametrize("model", ["flux", "qwen"])
def test_ring_gradients(pools, model, rotate):
    res = check(pools(2).run(train_grads, model=model, mesh_names=("ring",),
                             config={"ring_rotate": rotate}))
    assert res["counters"]["lower_attention"][f"ring_{rotate}"] >= 2


def test_regional_gradients(pools):
    """`regional=True`: each block graph differentiated on its own; the hidden states between
    blocks are whole on every rank (their gradient summed at each block's slice)."""
    res = check(pools(2).run(train_grads, model="flux", model_kwargs={"layers": 2, "single": 2},
                             config={"regional": True}))
    assert res["counters"]["lower_attention"]["ulysses"] >= 2


def test_inductor_gradients(pools):
    res = check(pools(2).run(train_grads, model="flux", config={"compile": True}))
    assert res["counters"]["lower_attention"]["ulysses"] >= 2
    # inductor's backward also sends the parameters' gradient sums as one coalesced all-reduce
    assert res["counters"]["training"]["gradient_sums_coalesced"] > 10


def test_usp_2x2_gradients(pools):
    res = check(pools(4).run(train_grads, model="flux", mesh_shape=(2, 2),
                             mesh_names=("ring", "ulysses")))
    assert res["counters"]["lower_attention"]["usp_p2p"] >= 2


def test_data_parallel_times_ulysses_with_ddp(pools):
    """A ("dp", "ulysses") 2x2 mesh: each dp slice its own sample, DDP over the dp group;
    gradients equal the single process's average over both samples."""
    for r, res in enumerate(pools(4).run(dp_train)):
        assert res["max_rel"] <= TOL, f"rank {r}: {res['worst']}: {res['max_rel']:.3g}"
        assert res["params"] > 10 and res["parallel"] >= 2, res


# --- the task every rank of the pool runs -----------------------------------------------------


def _rel_error(g: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference, relative to max(1, largest |ref|)."""
    return ((g - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


def train_grads(
    model: str,
    mesh_shape: tuple[int, ...] | None = None,
    mesh_names: tuple[str, ...] = ("ulysses",),
    config: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    steps: int = 2,
    input_grad: bool = False,
    batch2: bool = False,
    lora: bool = False,
    checkpointing: bool = False,
) -> dict[str, Any]:
    """Gradients of every parameter (and of `hidden_states` with `input_grad`), train mode, vs
    the single process: a loss on the full output with fixed random weights, `steps` backward
    passes (the second call reuses the compiled graphs)."""
    import copy

    import cpfx

    fresh()
    m, kw = build(model, **(model_kwargs or {}))
    if batch2:  # a second, different sample: every per-sample input gets one more row
        for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"):
            x = kw[k]
            kw[k] = torch.cat([x, x * 0.5 + 0.1])
    if lora:  # peft adapters on the attention projections; the base weights frozen
        from peft import LoraConfig

        m.requires_grad_(False)
        m.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if checkpointing:
        m.enable_gradient_checkpointing()
    m.train()
    ref_m = copy.deepcopy(m)

    def loss_of(mod: torch.nn.Module, inputs: dict[str, Any], w: torch.Tensor | None):
        out = first_output(mod(**inputs))[0]
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)) if w is None else w
        return (out * w).sum(), w

    def grads(mod: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}
        if input_grad:
            out["<hidden_states>"] = inputs["hidden_states"].grad.clone()
        return out

    def run(mod: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
        res, w = [], None
        for _ in range(steps):
            mod.zero_grad(set_to_none=True)
            inputs = dict(kw)
            if input_grad:
                inputs["hidden_states"] = kw["hidden_states"].clone().requires_grad_(True)
            loss, w = loss_of(mod, inputs, w)
            loss.backward()
            res.append(grads(mod, inputs))
        return res

    ref = run(ref_m)
    mesh = make_mesh(mesh_shape, mesh_names)
    cpfx.parallelize(m, mesh, cpfx.ParallelConfig(**(config or {})))
    got = run(m)
    missing, errs = [], {}
    for r_step, g_step in zip(ref, got):
        for name, r in r_step.items():
            g = g_step.get(name)
            if g is None:
                missing.append(name)
                continue
            errs[name] = max(_rel_error(g, r), errs.get(name, 0.0))
    worst = max(errs, key=errs.__getitem__, default="")
    counters = {k: dict(v) for k, v in cpfx.counters.items()}
    return {
        "max_rel": errs.get(worst, 0.0),
        "worst": worst,
        "missing": missing,
        "params": len(ref[0]),
        "errors": errs,
        "counters": counters,
    }


def dp_train() -> dict[str, Any]:
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    import cpfx

    fresh()
    m, kw0 = build("flux")
    kw1 = build("flux", seed=1)[1]  # another sample (the weights stay the seed-0 ones)
    samples = [kw0, kw1]
    m.train()
    ref_m = copy.deepcopy(m)
    weights = []
    for i, kw in enumerate(samples):  # the single process: the mean of the two samples' losses
        out = first_output(ref_m(**kw))[0]
        weights.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(i)))
        ((out * weights[i]).sum() / len(samples)).backward()
    ref = {n: p.grad for n, p in ref_m.named_parameters()}
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ulysses"))
    cpfx.parallelize(m, mesh)
    ddp = DistributedDataParallel(m, process_group=mesh.get_group("dp"))
    d = dist.get_rank() // 2
    out = first_output(ddp(**samples[d]))[0]
    (out * weights[d]).sum().backward()  # DDP averages the gradients over the dp group
    errs = {n: _rel_error(p.grad, ref[n]) for n, p in m.named_parameters()}
    worst = max(errs, key=errs.__getitem__)
    return {"max_rel": errs[worst], "worst": worst, "params": len(ref),
            "parallel": cpfx.counters["lower_attention"]["ulysses"]}
