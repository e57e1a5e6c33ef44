"""Benchmark the FP8 all-to-all payload kernels (cpfx.kernels.fp8) on CUDA.

Times Triton quantize / dequantize against the torch reference for Ulysses-sized payloads
(default B=1, H=24, S=4096 and 16384, D=128, bf16, groups=8) with CUDA events around CUDA
graph replays (warm-up, median of many runs, inputs rotated so they don't sit in L2, no
launch gaps), prints the achieved bandwidth
(bytes read + written, once each) and its fraction of ``--peak-gbps`` and of a measured
device-to-device copy, checks Triton == reference bytes on the GPU, and can write JSON.

    python benchmarks/fp8_kernels.py [--peak-gbps 3350] [--sweep] [--json out.json]

Without CUDA it prints that it needs CUDA and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from _common import parser, write_json
from torch import Tensor

from cpfx.kernels import fp8

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROTATE_BYTES = 512 * 2**20  # rotate inputs over at least this much memory (several L2s)
SWEEP = [
    (rows, warps, hw) for rows in (16, 32, 64, 128) for warps in (4, 8) for hw in (False, True)
]


@dataclass(frozen=True)
class Result:
    """One timed configuration."""

    op: str  # "quantize" | "dequantize"
    impl: str  # "triton" | "reference"
    shape: tuple[int, int, int, int]  # (B, H, S, D)
    dtype: str
    groups: int
    rows_per_program: int | None  # Triton only; None = the wrapper's default
    num_warps: int | None
    hw_cast: bool | None  # hardware e4m3 cvt (True) or the integer path (False)
    ms: float  # median over the timed runs
    gbps: float  # (bytes read + bytes written) / time
    frac_peak: float  # gbps / --peak-gbps
    frac_copy: float  # gbps / measured device-to-device copy bandwidth


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument(
        "--shapes", nargs="+", default=["1,24,4096,128", "1,24,16384,128"], help="B,H,S,D"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--groups", type=int, default=8, help="all-to-all world size (H %% groups == 0)")
    p.add_argument("--peak-gbps", type=float, default=4800.0, help="H200 4800, H100 SXM 3350")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="also time rows x num_warps variants")
    return p.parse_args(argv)


def time_ms(
    fn: Callable[[Tensor], Tensor],
    inputs: list[Tensor],
    warmup: int,
    iters: int,
    graph: bool = True,
) -> float:
    """Median milliseconds per call of ``fn`` over the rotated ``inputs``, with CUDA events.

    With ``graph``, the calls (one per input) are captured in a CUDA graph and replayed, so
    host overhead and launch gaps stay out of the kernel time; plain launches otherwise or
    if capture fails.
    """
    for x in inputs:  # compile, allocator warm-up
        fn(x)
    torch.cuda.synchronize()
    run = lambda: [fn(x) for x in inputs]  # noqa: E731
    try:
        if graph:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                run()
            run = cuda_graph.replay
    except RuntimeError as err:  # pragma: no cover - depends on the CUDA / Triton build
        log.warning("CUDA graph capture failed (%s); timing plain launches", err)
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    new_event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    events = [(new_event(), new_event()) for _ in range(iters)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / len(inputs)


def copy_gbps() -> float:
    """Measured device-to-device copy bandwidth (bytes read + written), the practical ceiling."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda s: dst.copy_(s), [src], warmup=10, iters=20, graph=False)
    return 2 * src.numel() / ms / 1e6


def payload_bytes(shape: tuple[int, int, int, int], elt: int) -> int:
    """Bytes read + written by one quantize (the same for dequantize): x once, packed once."""
    B, H, S, D = shape
    return B * H * S * (D * elt + D + fp8.SCALE_BYTES)


def check_equal(x: Tensor, groups: int, hw_cast: bool) -> None:
    """Triton and the torch reference give identical bytes / values on this GPU."""
    packed = fp8.quantize_triton(x, groups, hw_cast=hw_cast)
    expected = fp8.quantize_reference(x, groups)
    if not torch.equal(packed, expected):
        on_cpu = fp8.quantize_reference(x.cpu(), groups)
        diffs = [
            (p != e).sum().item() for p, e in ((packed.cpu(), on_cpu), (expected.cpu(), on_cpu))
        ]
        raise SystemExit(
            f"MISMATCH: quantize {tuple(x.shape)} {x.dtype}: Triton != reference; bytes differing "
            f"from the CPU reference: Triton {diffs[0]}, CUDA reference {diffs[1]}"
        )
    out = fp8.dequantize_triton(packed, x.dtype, hw_cast=hw_cast)
    if not torch.equal(out, fp8.dequantize_reference(packed, x.dtype)):
        raise SystemExit(f"MISMATCH: dequantize {tuple(x.shape)} {x.dtype}: Triton != reference")


def bench_shape(
    shape: tuple[int, int, int, int], args: argparse.Namespace, copy: float
) -> list[Result]:
    """Time every implementation / configuration for one shape."""
    dtype, groups = DTYPES[args.dtype], args.groups
    elt = torch.finfo(dtype).bits // 8
    nbytes = payload_bytes(shape, elt)
    n_copies = max(2, -(-ROTATE_BYTES // nbytes))
    xs = [torch.randn(shape, device="cuda", dtype=dtype) for _ in range(n_copies)]
    hw_modes = (False, True) if torch.cuda.get_device_capability() >= (8, 9) else (False,)
    for hw in hw_modes:
        check_equal(xs[0], groups, hw)
    packs = [fp8.quantize_triton(x, groups) for x in xs]

    sweep = [c for c in SWEEP if c[2] in hw_modes] if args.sweep else []
    configs: list[tuple[int | None, int | None, bool | None]] = [(None, None, None)] + sweep
    results = []

    def record(
        op: str, impl: str, cfg: tuple, fn: Callable, inputs: list[Tensor], iters: int
    ) -> None:
        ms = time_ms(fn, inputs, min(args.warmup, iters), iters)
        gbps = nbytes / ms / 1e6
        frac_peak, frac_copy = gbps / args.peak_gbps, gbps / copy
        results.append(
            Result(op, impl, shape, args.dtype, groups, *cfg, ms, gbps, frac_peak, frac_copy)
        )

    for cfg in configs:
        kw = {
            k: v for k, v in zip(("rows_per_program", "num_warps", "hw_cast"), cfg) if v is not None
        }
        quant = lambda x: fp8.quantize_triton(x, groups, **kw)  # noqa: E731
        dequant = lambda p: fp8.dequantize_triton(p, dtype, **kw)  # noqa: E731
        record("quantize", "triton", cfg, quant, xs, args.iters)
        record("dequantize", "triton", cfg, dequant, packs, args.iters)
    ref_iters = max(5, args.iters // 5)
    none = (None, None, None)
    record(
        "quantize", "reference", none, lambda x: fp8.quantize_reference(x, groups), xs, ref_iters
    )
    record(
        "dequantize",
        "reference",
        none,
        lambda p: fp8.dequantize_reference(p, dtype),
        packs,
        ref_iters,
    )
    return results


def print_table(results: list[Result]) -> None:
    head = ("op", "impl", "B,H,S,D", "rows", "warps", "hw", "ms", "GB/s", "%peak", "%copy")
    print("{:<10} {:<9} {:<16} {:>4} {:>5} {:>5} {:>8} {:>7} {:>6} {:>6}".format(*head))
    for r in results:
        shape = ",".join(map(str, r.shape))
        rows = "-" if r.rows_per_program is None else r.rows_per_program
        warps = "-" if r.num_warps is None else r.num_warps
        hw = "-" if r.hw_cast is None else str(r.hw_cast)
        print(
            f"{r.op:<10} {r.impl:<9} {shape:<16} {rows:>4} {warps:>5} {hw:>5} {r.ms:8.4f} {r.gbps:7.0f}"
            f" {100 * r.frac_peak:5.1f}% {100 * r.frac_copy:5.1f}%"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/fp8_kernels.py needs CUDA (no GPU here); nothing to do.")
        return 0
    if not fp8.triton_available():
        print("benchmarks/fp8_kernels.py needs Triton; nothing to do.")
        return 0
    import triton

    copy = copy_gbps()
    device = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    print(f"{device}: {versions}, copy {copy:.0f} GB/s, peak {args.peak_gbps:.0f} GB/s")
    results = []
    for spec in args.shapes:
        shape = tuple(int(v) for v in spec.split(","))
        results += bench_shape(shape, args, copy)  # type: ignore[arg-type]
    print_table(results)
    print("check: Triton == reference (bytes and values) on every shape: OK")
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__}
    meta |= {"copy_gbps": copy, "peak_gbps": args.peak_gbps}
    write_json(args.json, {**meta, "results": [asdict(r) for r in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
