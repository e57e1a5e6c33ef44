"""Task functions the gloo pool runs on every rank (module-level, so workers can import them)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _fresh() -> None:
    import cpfx

    torch._dynamo.reset()
    cpfx.reset_counters()


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...]):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", tuple(shape), mesh_dim_names=tuple(names))


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    out = out.sample if hasattr(out, "sample") else out
    if isinstance(out, (tuple, list)):  # Z-Image returns a list of per-sample tensors
        out = torch.stack(list(out))
    return out


def parity(
    model: str,
    mesh_shape: tuple[int, ...] | None = None,
    mesh_names: tuple[str, ...] = ("ulysses",),
    config: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    dtype: str = "float32",
    calls: int = 1,
) -> dict[str, Any]:
    """Single-process output vs cpfx output of the same weights on this rank."""
    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build(model, dtype=getattr(torch, dtype), **(model_kwargs or {}))
    with torch.no_grad():
        ref = _first(m(**kw)).float()
    mesh = make_mesh(mesh_shape or (dist.get_world_size(),), mesh_names)
    cpfx.parallelize(m, mesh, cpfx.ParallelConfig(**(config or {})))
    with torch.no_grad():
        for _ in range(calls):
            out = _first(m(**kw)).float()
    diff = (out - ref).abs().max().item()
    rel = ((out - ref).norm() / ref.norm()).item()
    counters = {k: dict(v) for k, v in cpfx.counters.items()}
    return {"max_abs": diff, "rel_l2": rel, "counters": counters, "shape": tuple(out.shape)}


def diverging_graphs(timeout_s: float = 60.0) -> str:
    """Rank 1 compiles a different collective schedule (allgather ring vs p2p ring)."""
    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build("flux")
    rotate = "allgather" if dist.get_rank() == 1 else "p2p"
    cfg = cpfx.ParallelConfig(ring_rotate=rotate, timeout_s=timeout_s)
    cpfx.parallelize(m, make_mesh((dist.get_world_size(),), ("ring",)), cfg)
    try:
        with torch.no_grad():
            m(**kw)
    except cpfx.RankDivergenceError as e:
        return f"RankDivergenceError: {e}"
    return "no error"


def rank_dies(timeout_s: float = 20.0) -> str:
    """The last rank exits in the middle of the forward; the others must raise, not hang."""
    import os
    import time

    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build("flux")
    cfg = cpfx.ParallelConfig(timeout_s=timeout_s, check_collectives=False)
    cpfx.parallelize(m, make_mesh((dist.get_world_size(),), ("ulysses",)), cfg)
    if dist.get_rank() == dist.get_world_size() - 1:
        os._exit(3)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            m(**kw)
    except Exception as e:  # noqa: BLE001 - any error is fine, hanging is not
        return f"raised after {time.perf_counter() - t0:.1f}s: {type(e).__name__}"
    return "no error"


def resolutions(sizes: list[int]) -> list[float]:
    """One parallelized model, several input resolutions in a row: each vs single process."""
    import cpfx
    from tests.models import build

    _fresh()
    m, _ = build("flux")
    refs = []
    for n in sizes:
        _, kw = build("flux", img=n)
        with torch.no_grad():
            refs.append((kw, m(**kw)[0]))
    cpfx.parallelize(m, make_mesh((dist.get_world_size(),), ("ulysses",)))
    diffs = []
    with torch.no_grad():
        for kw, ref in refs:
            diffs.append((m(**kw)[0] - ref).abs().max().item())
    return diffs


def different_inputs() -> str:
    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build("flux", seed=dist.get_rank())  # rank-dependent inputs: a user error
    cpfx.parallelize(
        m, make_mesh((dist.get_world_size(),), ("ulysses",)), cpfx.ParallelConfig(check_inputs=True)
    )
    try:
        with torch.no_grad():
            m(**kw)
    except cpfx.RankDivergenceError as e:
        return str(e)
    return "no error"


def flux_pipeline(steps: int = 3) -> dict[str, float]:
    """A real FluxPipeline (tiny random components, prompt embeddings given): image vs single process."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    import cpfx
    from tests.models import build

    _fresh()
    m, _ = build("flux", img=64, txt=8)
    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=m,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    emb, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)

    def run():
        return pipe(
            prompt_embeds=emb,
            pooled_prompt_embeds=pooled,
            height=32,
            width=32,
            num_inference_steps=steps,
            guidance_scale=1.0,
            output_type="pt",
            generator=torch.Generator().manual_seed(1),
        ).images

    with torch.no_grad():
        ref = run()
        cpfx.parallelize(pipe.transformer, make_mesh((dist.get_world_size(),), ("ulysses",)))
        img = run()
    gathered = [torch.empty_like(img) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, img)
    return {
        "max_abs": (img - ref).abs().max().item(),
        "across_ranks": max((x - img).abs().max().item() for x in gathered),
        "calls": cpfx.counters["lower_attention"]["ulysses"],
    }


def compiled(mode: str, mesh_name: str = "ulysses", fp8: bool = False) -> dict[str, float]:
    """`ParallelConfig(compile=True)` (inductor) or `torch.compile(backend="cpfx")` vs eager cpfx
    (with the same `fp8_comm`)."""
    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build("flux")
    with torch.no_grad():
        ref = m(**kw)[0]
    mesh = make_mesh((dist.get_world_size(),), (mesh_name,))
    eager_m, _ = build("flux")
    cpfx.parallelize(eager_m, mesh, cpfx.ParallelConfig(fp8_comm=fp8))
    with torch.no_grad():
        eager = eager_m(**kw)[0]
        cpfx.reset_counters()  # from here on: the compiled model's passes only
        if mode == "inductor":
            cpfx.parallelize(m, mesh, cpfx.ParallelConfig(compile=True, fp8_comm=fp8))
            out = m(**kw)[0]
        else:
            out = torch.compile(m, backend="cpfx", dynamic=False)(**kw)[0]
    return {
        "vs_eager": (out - eager).abs().max().item(),
        "max_abs": (out - ref).abs().max().item(),
        "rel_l2": ((out - ref).norm() / ref.norm()).item(),
        "eager_rel_l2": ((eager - ref).norm() / ref.norm()).item(),
        "lowered": sum(cpfx.counters["lower_attention"].values()),
        "fp8_ops": sum(cpfx.counters["fp8_comm"].values()),
    }


class GQAAttention(torch.nn.Module):
    """Self-attention with fewer K/V heads than query heads (enable_gqa), a mask and RoPE-like scale."""

    def __init__(self, heads: int, kv_heads: int, dim: int = 16):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, dim
        self.q = torch.nn.Linear(32, heads * dim)
        self.k = torch.nn.Linear(32, kv_heads * dim)
        self.v = torch.nn.Linear(32, kv_heads * dim)
        self.o = torch.nn.Linear(heads * dim, 32)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (self.h, self.d)).transpose(1, 2)
        k = self.k(x).unflatten(-1, (self.kv, self.d)).transpose(1, 2)
        v = self.v(x).unflatten(-1, (self.kv, self.d)).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=True, scale=0.3
        )
        return self.o(out.transpose(1, 2).flatten(2))


def gqa_parity(
    heads: int, kv_heads: int, tokens: int = 30, names: tuple[str, ...] = ("ulysses",)
) -> float:
    import cpfx

    _fresh()
    torch.manual_seed(0)
    m = GQAAttention(heads, kv_heads).eval()
    x = torch.randn(1, tokens, 32)
    mask = torch.rand(1, tokens) > 0.3
    with torch.no_grad():
        ref = m(x, mask)
        cpfx.parallelize(m, make_mesh((dist.get_world_size(),), names))
        out = m(x, mask)
    assert cpfx.counters["shard_tokens"]["attention_sharded"] == 1
    return (out - ref).abs().max().item()


def ring_leaves_nothing_pending() -> int:
    import cpfx
    from cpfx import p2p
    from tests.models import build

    _fresh()
    m, kw = build("flux")
    cpfx.parallelize(
        m, make_mesh((dist.get_world_size(),), ("ring",)), cpfx.ParallelConfig(ring_rotate="p2p")
    )
    with torch.no_grad():
        m(**kw)
    return len(p2p._pending_sends)


def gather_both_ways() -> dict[str, float]:
    """`comm.all_gather_rows` as an all-gather and as the all-to-all it becomes for gloo on CUDA
    (device_type="cuda" takes that route on gloo; the tensors stay on the CPU)."""
    from cpfx import comm

    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD.group_name
    blocks = [torch.arange(24.0).reshape(3, 2, 4) + 100 * r for r in range(world)]
    want = torch.cat(blocks)
    out = {}
    for device_type in ("cpu", "cuda"):
        got = comm.all_gather_rows(
            blocks[rank], world, group, shape=(3, 2, 4), device_type=device_type
        )
        out[device_type] = (got - want).abs().max().item()
    out["routed"] = comm.gathers_by_all_to_all("cuda", group)
    return out


# --- runtime checks (issues 15 and 16) --------------------------------------------------------


def _call_counting_collectives(m: torch.nn.Module, kw: dict[str, Any]) -> tuple[Any, int]:
    """`m(**kw)` and the number of collectives it issued (0 if Dynamo ran it eagerly)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        @classmethod
        def ignore_compile_internals(cls) -> bool:
            return True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            ns = func.namespace
            if (ns == "_c10d_functional" and "wait" not in func.__name__) or ns == "cpfx":
                self.n += 1
            return func(*args, **(kwargs or {}))

    with Count() as c:
        out = m(**kw)
    return out, c.n


def lora_sweep(strengths: list[float]) -> dict[str, Any]:
    """One LoRA adapter, a different strength each call: exact, and collectives on every call."""
    from peft import LoraConfig

    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build("flux")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    m.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), "a"
    )
    refs = []
    with torch.no_grad():
        for s in strengths:
            m.set_adapters(["a"], [s])
            refs.append(m(**kw)[0])
    cpfx.parallelize(m, make_mesh((dist.get_world_size(),), ("ulysses",)))
    diffs, collectives = [], []
    with torch.no_grad():
        for s, ref in zip(strengths, refs):
            m.set_adapters(["a"], [s])
            out, n = _call_counting_collectives(m, kw)
            diffs.append((out[0] - ref).abs().max().item())
            collectives.append(n)
    return {"diffs": diffs, "collectives": collectives, "graphs": len(m._cpfx["graphs"])}


def same_class_sizes(sizes: list[int]) -> dict[str, Any]:
    """Two models of one class (Wan 2.2's two experts), each called at every size in turn."""
    import cpfx
    from tests.models import build

    _fresh()
    models = [build("flux", seed=s)[0] for s in (0, 1)]
    cases = []
    with torch.no_grad():
        for n in sizes:
            for m in models:
                kw = build("flux", img=n)[1]
                cases.append((m, kw, m(**kw)[0]))
    mesh = make_mesh((dist.get_world_size(),), ("ulysses",))
    for m in models:
        cpfx.parallelize(m, mesh)
    diffs, collectives = [], []
    with torch.no_grad():
        for m, kw, ref in cases:
            out, n = _call_counting_collectives(m, kw)
            diffs.append((out[0] - ref).abs().max().item())
            collectives.append(n)
    return {"diffs": diffs, "collectives": collectives}


def attention_in_disabled_region(strict: bool) -> dict[str, Any]:
    """A block whose forward is `torch.compiler.disable`d: its attention runs outside cpfx."""
    import warnings

    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build("flux", layers=1, single=2)
    with torch.no_grad():
        ref = m(**kw)[0]
    block = m.single_transformer_blocks[1]
    block.forward = torch.compiler.disable(block.forward)
    mesh = make_mesh((dist.get_world_size(),), ("ulysses",))
    cpfx.parallelize(m, mesh, cpfx.ParallelConfig(strict=True) if strict else None)
    out: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            out["max_abs"] = (m(**kw)[0] - ref).abs().max().item()
        except cpfx.CpfxError as e:
            out["error"] = f"{type(e).__name__}: {e}"
        first = [str(w.message) for w in caught if issubclass(w.category, cpfx.CpfxWarning)]
        caught.clear()
        if "error" not in out:
            m(**kw)
        later = [str(w.message) for w in caught if issubclass(w.category, cpfx.CpfxWarning)]
    out.update(warnings=first, later_warnings=later)
    return out


def rank_seeded_inputs() -> str:
    """Inputs drawn from a generator seeded with the rank, default config."""
    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build("flux", seed=dist.get_rank())
    cpfx.parallelize(m, make_mesh((dist.get_world_size(),), ("ulysses",)))
    try:
        with torch.no_grad():
            m(**kw)
    except cpfx.RankDivergenceError as e:
        return f"RankDivergenceError: {e}"
    return "no error"


def threads(mesh_name: str, calls: int = 20, n_threads: int = 2) -> dict[str, Any]:
    """`n_threads` threads calling one parallelized model `calls` times each, at once."""
    import threading

    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build("flux")
    with torch.no_grad():
        ref = m(**kw)[0]
    cpfx.parallelize(m, make_mesh((dist.get_world_size(),), (mesh_name,)))
    with torch.no_grad():
        m(**kw)  # compile once before the threads start
    diffs: list[float] = []
    errors: list[str] = []
    start = threading.Barrier(n_threads)

    def work() -> None:
        start.wait()
        for _ in range(calls):
            try:
                with torch.no_grad():
                    diffs.append((m(**kw)[0] - ref).abs().max().item())
            except Exception as e:  # noqa: BLE001 - reported
                errors.append(f"{type(e).__name__}: {e}")

    ts = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    from cpfx import p2p

    return {"diffs": diffs, "errors": errors, "pending": len(p2p._pending_sends)}


def shape_mismatch() -> dict[str, Any]:
    """The last rank gets fewer image tokens than the others."""
    import time

    import cpfx
    from tests.models import build

    _fresh()
    last = dist.get_rank() == dist.get_world_size() - 1
    m, kw = build("flux", img=48 if last else 64)
    cpfx.parallelize(m, make_mesh((dist.get_world_size(),), ("ulysses",)))
    dist.barrier()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            m(**kw)
    except cpfx.RankDivergenceError as e:
        return {"error": str(e), "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


def skipped_call(steps: int = 4) -> dict[str, Any]:
    """A denoising-like loop (a new timestep each call); the last rank skips step 1."""
    import time

    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build("flux")
    cpfx.parallelize(m, make_mesh((dist.get_world_size(),), ("ulysses",)))
    last = dist.get_rank() == dist.get_world_size() - 1
    out: dict[str, Any] = {"ok_steps": [], "error": None}
    for step in range(steps):
        if last and step == 1:
            continue
        kw["timestep"] = torch.tensor([1.0 - step / steps])
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                m(**kw)
            out["ok_steps"].append(step)
        except cpfx.RankDivergenceError as e:
            out.update(error=str(e), step=step, seconds=time.perf_counter() - t0)
            break
    return out


def token_swap(kind: str) -> dict[str, Any]:
    """Rank 1's inputs differ from rank 0's by two swapped tokens, or by a NaN's payload."""
    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build("flux")
    x = kw["hidden_states"].clone()
    if dist.get_rank() == 1:
        if kind == "swap":
            x[:, [3, 40]] = x[:, [40, 3]]
        else:
            x.view(torch.int32)[0, 5, 0] = 0x7FC00001  # a NaN with another payload
    elif kind == "nan":
        x.view(torch.int32)[0, 5, 0] = 0x7FC00000
    kw["hidden_states"] = x
    cpfx.parallelize(m, make_mesh((dist.get_world_size(),), ("ulysses",)))
    try:
        with torch.no_grad():
            m(**kw)
    except cpfx.RankDivergenceError as e:
        return {"error": str(e)}
    return {"error": None}


def _proc_counts() -> tuple[int, int]:
    import os

    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


def leak_check(n: int = 10) -> dict[str, Any]:
    """fds and threads of this process over `n` parallelize calls (and one call of each model),
    and the WORLD group's timeout before and after."""
    import datetime

    import cpfx
    from tests.models import build

    _fresh()

    def world_timeout() -> float | None:
        try:
            be = dist.group.WORLD._get_backend(torch.device("cpu"))
            return be.options._timeout.total_seconds()
        except Exception:  # noqa: BLE001
            return None

    mesh = make_mesh((dist.get_world_size(),), ("ulysses",))
    before_timeout = world_timeout()
    counts = []
    for i in range(n + 1):
        m, kw = build("flux")
        cpfx.parallelize(m, mesh, cpfx.ParallelConfig(timeout_s=7.0))
        with torch.no_grad():
            m(**kw)
        counts.append(_proc_counts())
    dist.barrier(timeout=datetime.timedelta(seconds=60))
    return {"counts": counts, "timeout": (before_timeout, world_timeout())}


def killed_rank(timeout_s: float = 20.0, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The last rank exits after parallelize; the others call twice."""
    import os
    import time

    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build("flux")
    cfg = cpfx.ParallelConfig(timeout_s=timeout_s, **(config or {}))
    cpfx.parallelize(m, make_mesh((dist.get_world_size(),), ("ulysses",)), cfg)
    if dist.get_rank() == dist.get_world_size() - 1:
        os._exit(3)
    out = {}
    for call in ("first", "second"):
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                m(**kw)
            out[call] = "no error"
        except Exception as e:  # noqa: BLE001 - the type is what is checked
            out[call] = f"{type(e).__name__}: {e}"
        out[call + "_s"] = time.perf_counter() - t0
    return out


def collective_sizes_differ() -> str:
    """Input check off; the last rank compiles for other shapes: check_collectives must catch it."""
    import cpfx
    from tests.models import build

    _fresh()
    last = dist.get_rank() == dist.get_world_size() - 1
    m, kw = build("flux", img=48 if last else 64)
    cfg = cpfx.ParallelConfig(check_inputs="never", timeout_s=60.0)
    cpfx.parallelize(m, make_mesh((dist.get_world_size(),), ("ulysses",)), cfg)
    try:
        with torch.no_grad():
            m(**kw)
    except cpfx.RankDivergenceError as e:
        return f"RankDivergenceError: {e}"
    return "no error"


class _SelfAttention(torch.nn.Module):
    def __init__(self, dropout_p: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(16, 48)
        self.dropout_p = dropout_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p)


def one_rank_fails_to_compile(timeout_s: float = 120.0) -> dict[str, Any]:
    """The last rank's model has an attention cpfx refuses (dropout): only it fails in a pass."""
    import time

    import cpfx

    _fresh()
    last = dist.get_rank() == dist.get_world_size() - 1
    m = _SelfAttention(0.1 if last else 0.0).eval()
    cfg = cpfx.ParallelConfig(timeout_s=timeout_s)
    cpfx.parallelize(m, make_mesh((dist.get_world_size(),), ("ulysses",)), cfg)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            m(torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(0)))
        err = "no error"
    except Exception as e:  # noqa: BLE001 - the type is what is checked
        err = f"{type(e).__name__}: {e}"
    return {"error": err, "seconds": time.perf_counter() - t0}


def cache_dit_pipeline(mode: str = "model", steps: int = 8) -> dict[str, Any]:
    """A tiny FluxPipeline with cache-dit's DBCache: the same image as the single process with the
    same cache. mode "model": parallelize the transformer, then enable_cache; "blocks":
    enable_cache, then parallelize each transformer block (the blocks the cache runs)."""
    import warnings

    import cache_dit
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    import cpfx
    from tests.models import build

    _fresh()

    def pipeline() -> Any:
        m, _ = build("flux", img=64, txt=8, layers=2, single=4)
        torch.manual_seed(2)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=1,
            norm_num_groups=4,
            sample_size=32,
            shift_factor=0.0,
            scaling_factor=1.0,
        )
        pipe = FluxPipeline(FlowMatchEulerDiscreteScheduler(), vae, None, None, None, None, m)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def cache(pipe: Any) -> None:
        cfg = cache_dit.DBCacheConfig(
            Fn_compute_blocks=1,
            Bn_compute_blocks=0,
            residual_diff_threshold=0.8,
            max_warmup_steps=2,
        )
        cache_dit.enable_cache(pipe, cache_config=cfg)

    def run(pipe: Any) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        emb, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
        with torch.no_grad():
            return pipe(
                prompt_embeds=emb,
                pooled_prompt_embeds=pooled,
                height=32,
                width=32,
                num_inference_steps=steps,
                guidance_scale=1.0,
                output_type="pt",
                generator=torch.Generator().manual_seed(1),
            ).images

    ref_pipe = pipeline()
    cache(ref_pipe)
    ref = run(ref_pipe)
    uncached = run(pipeline())
    pipe = pipeline()
    mesh = make_mesh((dist.get_world_size(),), ("ulysses",))
    t = pipe.transformer
    blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
    if mode == "model":
        cpfx.parallelize(t, mesh)
        cache(pipe)
    else:
        cache(pipe)
        for b in blocks:
            cpfx.parallelize(b, mesh)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = run(pipe)
    reports = t._cpfx.reports if mode == "model" else blocks[0]._cpfx.reports
    return {
        "max_abs": (img - ref).abs().max().item(),
        "cache_effect": (ref - uncached).abs().max().item(),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, cpfx.CpfxWarning)],
        "first_call": (reports[0].parallel, reports[0].outside_total),
        "block_calls": [b._cpfx.calls for b in blocks] if mode == "blocks" else None,
    }


def regional(
    model: str, model_kwargs: dict[str, Any] | None = None, calls: int = 2
) -> dict[str, Any]:
    """`ParallelConfig(regional=True)`: parity with the single process, the graphs compiled (one
    per block class expected) and what the observed call's attentions ran as."""
    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build(model, **(model_kwargs or {}))
    with torch.no_grad():
        ref = _first(m(**kw)).float()
    mesh = make_mesh((dist.get_world_size(),), ("ulysses",))
    cpfx.parallelize(m, mesh, cpfx.ParallelConfig(regional=True))
    diffs = []
    with torch.no_grad():
        for _ in range(calls):
            diffs.append((_first(m(**kw)).float() - ref).abs().max().item())
    rt = m._cpfx
    (report,) = rt.reports
    return {
        "max_abs": max(diffs),
        "graphs": len(rt.graphs),
        "blocks": sum(1 for b in m.modules() if type(b).__name__ in m._repeated_blocks),
        "parallel": report.parallel,
        "outside": report.outside_total,
        "runs": sum(g.runs for g in rt.graphs),
        "reasons": rt.recompile_reasons,
    }


def train_grads(
    model: str,
    mesh_shape: tuple[int, ...] | None = None,
    mesh_names: tuple[str, ...] = ("ulysses",),
    config: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    steps: int = 2,
    input_grad: bool = False,
    batch2: bool = False,
) -> dict[str, Any]:
    """Gradients of every parameter (and of `hidden_states` with `input_grad`), train mode, vs
    the single process: a loss on the full output with fixed random weights, `steps` backward
    passes (the second call reuses the compiled graphs)."""
    import copy

    import cpfx
    from tests.models import build

    _fresh()
    m, kw = build(model, **(model_kwargs or {}))
    if batch2:  # a second, different sample: every per-sample input gets one more row
        for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"):
            x = kw[k]
            kw[k] = torch.cat([x, x * 0.5 + 0.1])
    m.train()
    ref_m = copy.deepcopy(m)

    def loss_of(mod: torch.nn.Module, inputs: dict[str, Any], w: torch.Tensor | None):
        out = _first(mod(**inputs))
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
    mesh = make_mesh(mesh_shape or (dist.get_world_size(),), mesh_names)
    cpfx.parallelize(m, mesh, cpfx.ParallelConfig(**(config or {})))
    got = run(m)
    worst, worst_name, missing, errs = 0.0, "", [], {}
    for r_step, g_step in zip(ref, got):
        for name, r in r_step.items():
            g = g_step.get(name)
            if g is None:
                missing.append(name)
                continue
            err = ((g - r).abs().max() / max(1.0, r.abs().max().item())).item()
            errs[name] = max(err, errs.get(name, 0.0))
            if err > worst:
                worst, worst_name = err, name
    counters = {k: dict(v) for k, v in cpfx.counters.items()}
    return {
        "max_rel": worst,
        "worst": worst_name,
        "missing": missing,
        "params": len(ref[0]),
        "errors": errs,
        "counters": counters,
    }
