"""Tests of cpfx.kernels.fp8: reference semantics, fake impls, compile, Triton vs reference.

The Triton kernels run on CPU under TRITON_INTERPRET=1 in ONE subprocess per session (the
variable must be set before Triton decorates the kernels, and must not leak into other test
modules). The parent builds the inputs, the subprocess (this file run as a script) runs the
Triton kernels on them, and the parent asserts bit-identity with the reference.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from cpfx.kernels import fp8

log = logging.getLogger(__name__)

HAS_TRITON = importlib.util.find_spec("triton") is not None
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def naive_quantize(x: Tensor, groups: int) -> Tensor:
    """Element-by-element loop over the documented layout (tiny inputs only)."""
    B, H, S, D = x.shape
    Hg = H // groups
    out = torch.empty(groups, S, B, Hg, D + 4, dtype=torch.uint8)
    for g, s, b, h in itertools.product(range(groups), range(S), range(B), range(Hg)):
        row = x[b, g * Hg + h, s, :].float()
        amax = max(abs(float(v)) for v in row)
        scale = torch.tensor(amax / 448.0 if amax > 0 else 1.0, dtype=torch.float32)
        for d in range(D):
            v = torch.tensor(float(row[d]) / float(scale), dtype=torch.float32)
            out[g, s, b, h, d] = v.to(torch.float8_e4m3fn).view(torch.uint8)
        out[g, s, b, h, D:] = scale.reshape(1).view(torch.uint8)
    return out


def assert_same_values(actual: Tensor, expected: Tensor) -> None:
    """Bit-identical, except that any two NaNs count as equal."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    bits = torch.int32 if actual.dtype == torch.float32 else torch.int16
    a, e = actual.view(bits)[~nan_a], expected.view(bits)[~nan_e]
    assert torch.equal(a, e), f"{(a != e).sum().item()} of {a.numel()} values differ"


def scales_of(packed: Tensor) -> Tensor:
    """fp32 scales ``[G, S, B, Hg]`` stored at the end of each packed row."""
    return packed[..., -4:].contiguous().view(torch.float32).squeeze(-1)


def e4m3_grid() -> Tensor:
    """All finite non-negative e4m3fn values, ascending (0 .. 448)."""
    return torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def tie_rows(D: int = 64) -> Tensor:
    """Rows whose amax is 448 (scale 1): grid points, midpoints (ties) and their fp32 neighbours."""
    grid = e4m3_grid()
    mid = (grid[1:] + grid[:-1]) / 2
    values = torch.cat(
        [grid, mid, mid.nextafter(torch.tensor(0.0)), mid.nextafter(torch.tensor(1e3))]
    )
    values = torch.cat([values, -values, torch.tensor([1e-45, 2.0**-126, 2.0**-10, 3 * 2.0**-10])])
    per_row = D - 1
    values = torch.nn.functional.pad(values, (0, -len(values) % per_row))
    rows = values.reshape(-1, per_row)
    return torch.cat([torch.full((rows.shape[0], 1), 448.0), rows], dim=1)


def over_448_rows(D: int = 8, n: int = 4) -> Tensor:
    """Rows whose amax / (amax / 448) lands above 448 in fp32 (the saturating case)."""
    amax = torch.linspace(1.0, 2.0, 200_000)
    hits = amax[amax / (amax / 448.0) > 448.0][:n]
    assert len(hits) == n, "no fp32 value found whose division overshoots 448"
    return torch.cat([hits[:, None], torch.rand(n, D - 1) * hits[:, None]], dim=1)


def special_input() -> Tensor:
    """[1, 2, S, 64] fp32: ties, saturation, zeros, inf/nan rows, fp32 subnormals, tiny scales."""
    D = 64
    ties = tie_rows(D)
    over = torch.nn.functional.pad(over_448_rows(8), (0, D - 8))
    specials = torch.zeros(8, D)
    specials[1, 3] = float("inf")
    specials[2, 5] = float("-inf")
    specials[3, 7] = float("nan")
    specials[4, :2] = torch.tensor([float("inf"), float("nan")])
    specials[5, :] = 1e-45  # fp32 subnormal amax: amax / 448 underflows to 0 -> scale 1
    specials[6, :] = torch.linspace(-3e-39, 3e-39, D)  # subnormal amax, scale subnormal
    specials[7, :] = -0.0
    specials[0, 1:] = 1.0  # plus a normal-looking row
    rows = torch.cat([ties, over, specials])
    rows = torch.nn.functional.pad(rows, (0, 0, 0, rows.shape[0] % 2))
    return rows.reshape(2, -1, D).unsqueeze(0)  # [1, 2, S, D]


def random_input(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Tensor:
    """Normal values with per-token magnitudes spread over many decades."""
    gen = torch.Generator().manual_seed(seed)
    B, H, S, D = shape
    mag = torch.logspace(-8, 4, S)[None, None, :, None]
    return (torch.randn(shape, generator=gen) * mag).to(dtype)


def all_bytes_packed() -> Tensor:
    """uint8 [1, 6, 1, 2, 128 + 4]: every e4m3 byte, under scales incl. inf, nan, tiny, huge."""
    D = 128
    scales = torch.tensor([1.0, 0.37, 1e-40, 3e35, float("inf"), float("nan")])
    data = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    scale_bytes = [s.reshape(1, 1).expand(2, 1).contiguous().view(torch.uint8) for s in scales]
    rows = [torch.cat([data, sb], dim=1) for sb in scale_bytes]
    return torch.stack(rows).reshape(1, len(scales), 1, 2, D + 4)


# (B, H, S, D, groups, dtype) run through both implementations
CASES = [
    (1, 4, 13, 7, 2, torch.float32),
    (2, 8, 5, 72, 4, torch.bfloat16),
    (1, 4, 9, 128, 1, torch.float16),
    (2, 4, 3, 16, 4, torch.bfloat16),
]


def interpreter_inputs() -> dict[str, object]:
    """Everything the interpreter subprocess runs: quantize inputs and dequantize inputs."""
    quant = [(random_input(c[:4], c[5], seed=i), c[4]) for i, c in enumerate(CASES)]
    quant.append((special_input(), 2))
    strided = (
        random_input((2, 8, 6, 24), torch.float32, 9).transpose(1, 2).contiguous().transpose(1, 2)
    )
    quant.append((strided, 2))
    deq = [(fp8.quantize_reference(x, g), x.dtype) for x, g in quant[: len(CASES)]]
    deq += [(all_bytes_packed(), dt) for dt in DTYPES]
    return {"quant": quant, "deq": deq}


# ---------------------------------------------------------------------------------------
# Reference semantics
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,H,S,D,groups,dtype", CASES + [(1, 8, 4, 8, 8, torch.float32)])
def test_reference_round_trip(
    B: int, H: int, S: int, D: int, groups: int, dtype: torch.dtype
) -> None:
    x = random_input((B, H, S, D), dtype, seed=1)
    packed = fp8.quantize_reference(x, groups)
    assert packed.shape == (groups, S, B, H // groups, D + 4) and packed.dtype == torch.uint8
    assert packed.is_contiguous()
    out = fp8.dequantize_reference(packed, dtype)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 of the value, plus half the
    # smallest subnormal step (2**-10 * scale) near zero, plus the output dtype's rounding
    # (half an ulp relative, half its subnormal step absolute).
    xf, of = x.float(), out.float()
    scale = xf.abs().amax(-1, keepdim=True) / 448
    info = torch.finfo(dtype)
    bound = (xf.abs() * 2**-4 + scale * 2**-10) * (1 + 2**-7)
    if dtype != torch.float32:
        bound = bound + xf.abs() * info.eps / 2 + info.smallest_normal * info.eps
    assert ((of - xf).abs() <= bound).all()


def test_reference_layout_matches_naive_loop() -> None:
    x = random_input((2, 4, 3, 5), torch.float32, seed=2)
    x[0, 1, 2] = 0.0
    for groups in (1, 2, 4):
        assert torch.equal(fp8.quantize_reference(x, groups), naive_quantize(x, groups))


def test_reference_noncontiguous_input() -> None:
    x = random_input((2, 6, 8, 16), torch.bfloat16, seed=3)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, S, D] view of [B, S, H, D]
    assert not strided.is_contiguous()
    assert torch.equal(fp8.quantize_reference(strided, 3), fp8.quantize_reference(x, 3))


def test_zero_rows_give_zeros_not_nan() -> None:
    x = torch.zeros(1, 2, 3, 8)
    packed = fp8.quantize_reference(x, 2)
    assert torch.equal(scales_of(packed), torch.ones(2, 3, 1, 1))
    assert torch.equal(fp8.dequantize_reference(packed, torch.float32), x)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_rows_stay_non_finite(bad: float) -> None:
    x = random_input((1, 2, 4, 8), torch.float32, seed=4)
    x[0, 1, 2, 3] = bad
    out = fp8.dequantize_reference(fp8.quantize_reference(x, 1), torch.float32)
    assert out[0, 1, 2].isnan().all()  # the whole row: 0 * inf and nan * anything are NaN
    finite = torch.ones_like(x, dtype=torch.bool)
    finite[0, 1, 2] = False
    assert out[finite].isfinite().all()


def test_saturation_and_ties_match_torch_cast() -> None:
    x = special_input()
    packed = fp8.quantize_reference(x, 1)
    q = packed[..., :-4].contiguous().view(torch.float8_e4m3fn).float()
    assert q[~q.isnan()].abs().max() == 448.0
    ties = tie_rows()  # scale 1: the bytes are torch's round-to-nearest-even cast
    expected = ties.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(fp8.quantize_reference(ties[None, None], 1)[0, :, 0, 0, :-4], expected)
    ties_to_even = torch.tensor([17.0, 19.0, 31.5]).to(torch.float8_e4m3fn).float()
    assert torch.equal(ties_to_even, torch.tensor([16.0, 20.0, 32.0]))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        fp8.quantize_reference(torch.zeros(1, 6, 2, 4), 4)
    with pytest.raises(TypeError):
        fp8.quantize_reference(torch.zeros(1, 4, 2, 4, dtype=torch.int32), 2)
    with pytest.raises(ValueError):
        fp8.dequantize_reference(torch.zeros(1, 2, 1, 1, 4, dtype=torch.uint8), torch.float32)


# ---------------------------------------------------------------------------------------
# Custom ops: fake impls, dispatch, compile
# ---------------------------------------------------------------------------------------


def test_custom_ops_dispatch_to_reference_on_cpu() -> None:
    x = random_input((1, 4, 5, 12), torch.bfloat16, seed=5)
    packed = torch.ops.cpfx.fp8_quantize(x, 2)
    assert torch.equal(packed, fp8.quantize_reference(x, 2))
    expected = fp8.dequantize_reference(packed, torch.float16)
    assert_same_values(torch.ops.cpfx.fp8_dequantize(packed, torch.float16), expected)


def test_fake_impls() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 13, 72, dtype=torch.bfloat16)
        packed = torch.ops.cpfx.fp8_quantize(x, 4)
        assert packed.shape == (4, 13, 2, 2, 76) and packed.dtype == torch.uint8
        out = torch.ops.cpfx.fp8_dequantize(packed, torch.float16)
        assert out.shape == (2, 8, 13, 72) and out.dtype == torch.float16


def test_opcheck() -> None:
    x = random_input((1, 4, 3, 8), torch.float32, seed=6)
    torch.library.opcheck(torch.ops.cpfx.fp8_quantize.default, (x, 2))
    packed = fp8.quantize_reference(x, 2)
    torch.library.opcheck(torch.ops.cpfx.fp8_dequantize.default, (packed, torch.bfloat16))


def test_compile_aot_eager_one_node_each() -> None:
    def round_trip(x: Tensor) -> Tensor:
        return torch.ops.cpfx.fp8_dequantize(torch.ops.cpfx.fp8_quantize(x * 2, 2), x.dtype) + 1

    x = random_input((1, 4, 6, 16), torch.bfloat16, seed=7)
    compiled = torch.compile(round_trip, backend="aot_eager", fullgraph=True)
    assert_same_values(compiled(x), round_trip(x))

    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Tensor]):  # noqa: ANN202
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(round_trip, backend=capture, fullgraph=True)(x)
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function"]
    targets = [str(n.target).removesuffix(".default") for n in calls]
    assert targets.count("cpfx.fp8_quantize") == 1
    assert targets.count("cpfx.fp8_dequantize") == 1


# ---------------------------------------------------------------------------------------
# Triton under TRITON_INTERPRET=1 (CPU): bit-identical to the reference
# ---------------------------------------------------------------------------------------


def _run_interpreter_worker(inputs: dict[str, object], tmp: Path) -> dict[str, list[Tensor]]:
    torch.save(inputs, tmp / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, __file__, str(tmp / "in.pt"), str(tmp / "out.pt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(tmp / "out.pt")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    inputs = interpreter_inputs()
    return inputs, _run_interpreter_worker(inputs, tmp_path_factory.mktemp("fp8_interp"))


def test_triton_interpreter_quantize_bit_identical(interpreted) -> None:  # noqa: ANN001
    inputs, outputs = interpreted
    for (x, groups), got in zip(inputs["quant"], outputs["quant"], strict=True):
        expected = fp8.quantize_reference(x, groups)
        assert got.shape == expected.shape and got.dtype == torch.uint8
        mismatch = (got != expected).nonzero()
        where = f"{x.dtype} {tuple(x.shape)} groups={groups}"
        assert mismatch.numel() == 0, f"{where}: bytes differ at {mismatch[:5].tolist()}"


def test_triton_interpreter_dequantize_bit_identical(interpreted) -> None:  # noqa: ANN001
    inputs, outputs = interpreted
    for (packed, dtype), got in zip(inputs["deq"], outputs["deq"], strict=True):
        assert_same_values(got, fp8.dequantize_reference(packed, dtype))


def _interpreter_worker(in_path: str, out_path: str) -> None:
    """Subprocess entry (TRITON_INTERPRET=1): run the Triton kernels on the parent's inputs."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    inputs = torch.load(in_path)
    quant = [fp8.quantize_triton(x, groups) for x, groups in inputs["quant"]]
    deq = [fp8.dequantize_triton(packed, dtype) for packed, dtype in inputs["deq"]]
    # many small programs: exercises masking of a partial last program
    quant_small = fp8.quantize_triton(*inputs["quant"][0], rows_per_program=4)
    deq_small = fp8.dequantize_triton(*inputs["deq"][0], rows_per_program=4)
    outputs = {"quant": quant, "deq": deq, "quant_small": quant_small, "deq_small": deq_small}
    torch.save(outputs, out_path)


def test_triton_interpreter_small_programs(interpreted) -> None:  # noqa: ANN001
    inputs, outputs = interpreted
    x, groups = inputs["quant"][0]
    assert torch.equal(outputs["quant_small"], fp8.quantize_reference(x, groups))
    packed, dtype = inputs["deq"][0]
    assert_same_values(outputs["deq_small"], fp8.dequantize_reference(packed, dtype))


# ---------------------------------------------------------------------------------------
# Tier C: compiled Triton on CUDA
# ---------------------------------------------------------------------------------------


def _needs_sm89(hw_cast: bool) -> bool:
    return hw_cast and torch.cuda.get_device_capability() < (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hw_cast", [False, True], ids=["int_path", "hw_cast"])
def test_triton_cuda_matches_reference(hw_cast: bool) -> None:
    if _needs_sm89(hw_cast):
        pytest.skip("hardware e4m3 conversions need sm_89+")
    shapes = CASES + [(1, 24, 1024, 128, 8, torch.bfloat16), (2, 8, 333, 72, 4, torch.float16)]
    inputs = [(random_input(c[:4], c[5], seed=i), c[4]) for i, c in enumerate(shapes)]
    inputs.append((special_input(), 2))
    for x, groups in inputs:
        packed = fp8.quantize_triton(x.cuda(), groups, hw_cast=hw_cast)
        expected = fp8.quantize_reference(x, groups)
        assert torch.equal(packed.cpu(), expected), f"quantize {x.dtype} {tuple(x.shape)}"
        assert torch.equal(torch.ops.cpfx.fp8_quantize(x.cuda(), groups).cpu(), expected)
        assert torch.equal(fp8.quantize_reference(x.cuda(), groups).cpu(), expected)
        for dtype in DTYPES:
            got = fp8.dequantize_triton(packed, dtype, hw_cast=hw_cast).cpu()
            assert_same_values(got, fp8.dequantize_reference(expected, dtype))
    for dtype in DTYPES:
        packed = all_bytes_packed()
        got = fp8.dequantize_triton(packed.cuda(), dtype, hw_cast=hw_cast).cpu()
        assert_same_values(got, fp8.dequantize_reference(packed, dtype))
        assert_same_values(torch.ops.cpfx.fp8_dequantize(packed.cuda(), dtype).cpu(), got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inductor_cuda_round_trip() -> None:
    def round_trip(x: Tensor) -> Tensor:
        return torch.ops.cpfx.fp8_dequantize(torch.ops.cpfx.fp8_quantize(x, 2), x.dtype)

    x = random_input((1, 8, 64, 64), torch.bfloat16, seed=8).cuda()
    compiled = torch.compile(round_trip, backend="inductor", fullgraph=True)
    assert_same_values(compiled(x).cpu(), round_trip(x.cpu()))


if __name__ == "__main__":
    _interpreter_worker(*sys.argv[1:3])
