"""Measuring a call: median wall time and peak memory (the demo and the benchmarks use these)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn`, in seconds (warm up before calling this)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], Any], device: str = "cpu") -> int:
    """Peak bytes allocated by one call of `fn` above what was live before it.

    CPU: the profiler's allocation events, summed in time order (process RSS cannot show this:
    malloc keeps freed pages). CUDA: the caching allocator's peak statistic."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "linear"}
_ATTENTION = {
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
}


def _node_flops(n: torch.fx.Node) -> int:
    """Multiply-add FLOPs (2 per multiply-add) of one node's matmul, attention or convolution,
    from the shapes in `meta["val"]`; 0 for every other op."""
    from torch.utils.flop_counter import flop_registry

    packet = getattr(n.target, "overloadpacket", None)
    name = getattr(packet, "__name__", "")
    vals: list[Any] = [a.meta.get("val") for a in n.args if isinstance(a, torch.fx.Node)]
    out = n.meta.get("val")
    if name in _MATMULS and isinstance(out, torch.Tensor):
        w = vals[0] if name in ("mm", "bmm", "linear") else vals[1]  # the left operand
        return 2 * out.numel() * int(w.shape[-1])
    if name in _ATTENTION:
        q, k, v = vals[:3]
        heads_rows = q.numel() // q.shape[-1]  # B * H * Sq
        return 2 * heads_rows * int(k.shape[-2]) * (int(q.shape[-1]) + int(v.shape[-1]))
    if name in ("convolution", "_convolution") and packet in flop_registry:
        return int(flop_registry[packet](*vals, *n.args[len(vals):], out_val=out))
    return 0


def graph_flops(gm: torch.fx.GraphModule) -> int:
    """FLOPs of one run of an ATen graph (matmuls, attention, convolutions), from its shapes."""
    return sum(_node_flops(n) for n in gm.graph.nodes if n.op == "call_function")


def model_flops(model: torch.nn.Module, kwargs: dict[str, Any]) -> int:
    """FLOPs of `model(**kwargs)` in this process, counted like `graph_flops` on the functional
    ATen graphs cpfx plans on (captured through Dynamo and `cpfx.capture`: a compile of the
    model's forward with a counting backend, which Dynamo caches like any other)."""
    from torch._functorch.aot_autograd import make_boxed_func

    from cpfx.capture import functionalize

    total: list[int] = []

    def count(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        total.append(graph_flops(gm))
        return make_boxed_func(gm.forward)

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        return functionalize(gm, example_inputs, count)

    with torch.no_grad():
        torch.compile(model, backend=backend)(**kwargs)
    return sum(total)
