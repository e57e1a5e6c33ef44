"""FP8 (float8 e4m3fn) quantize / dequantize of an all-to-all payload, fused with the permute.

Ulysses attention sends Q, V and the attention output O through an all-to-all. With
``fp8_comm`` they travel as e4m3fn bytes with one fp32 scale per (token, head) row of
``head_dim`` elements, the 4 scale bytes inline at the end of each row, so a single
``uint8`` tensor crosses the collective.

Ops (one graph node each; Triton on CUDA, the torch reference on every other device):

- ``torch.ops.cpfx.fp8_quantize(x, groups)``: ``x`` ``[B, H, S, D]`` (fp32 / bf16 / fp16,
  any strides), ``H % groups == 0``, ``Hg = H // groups`` -> contiguous ``uint8``
  ``[groups, S, B, Hg, D + 4]``::

      packed[g, s, b, h, :D]    = e4m3fn bytes of x[b, g*Hg + h, s, :] / scale
      packed[g, s, b, h, D:D+4] = bytes of the fp32 scale (scale.view(torch.uint8), little-endian)

- ``torch.ops.cpfx.fp8_dequantize(packed, dtype)``: the inverse, ``uint8``
  ``[G, S, B, Hg, D + 4]`` -> contiguous ``dtype`` ``[B, G*Hg, S, D]`` with
  ``out[b, g*Hg + h, s, :] = float(e4m3fn(packed[g, s, b, h, :D])) * scale``, computed in
  fp32 and rounded once (to nearest even) to ``dtype``. ``dtype`` is an ordinary
  ``torch.dtype`` argument (schema type ``ScalarType``): fp32, bf16 or fp16.

Exact numerics (the Triton kernels and the references agree bit for bit):

- ``amax = max(|row|)`` in fp32; ``amax = NaN`` if any element of the row is NaN.
- ``scale = amax / 448`` (IEEE fp32 division). If that is ``0`` (an all-zero row, or an
  amax so tiny the division underflows) then ``scale = 1``: zero rows give zeros, never
  NaN. A NaN scale is stored as the canonical quiet NaN ``0x7FC00000``.
- ``v = x_fp32 / scale`` (IEEE fp32 division), then e4m3fn with round-to-nearest-even,
  subnormals (multiples of 2**-9 below 2**-6) included, and finite ``v`` saturated to
  +-448 (the division can land slightly above 448). ``-0.0`` keeps its sign bit (0x80).
- NaN / inf rule: a row holding any NaN or +-inf gets a non-finite scale (NaN, resp. +inf)
  and its ``v`` are NaN or +-0, so after a round trip EVERY element of that row is NaN
  (``0 * inf = NaN``). Nothing is clipped silently; finite rows are unaffected. A NaN
  element is always encoded as the byte ``0x7F`` (positive canonical e4m3fn NaN).

Two code paths in each kernel, chosen by the constexpr ``HW_CAST``:

- integer path (the interpreter, and GPUs older than sm_89): the e4m3fn byte is built from
  the fp32 bits with integer arithmetic (clamp, round-to-nearest-even with carry into the
  exponent, subnormals) and decoded likewise, because Triton's interpreter
  (TRITON_INTERPRET=1, used by the CPU tests) casts fp32 -> e4m3 wrongly (ties away from
  zero, no carry into the exponent, no saturation); fp32 -> bf16 is rounded in integers
  too (the interpreter truncates).
- hardware path (default on CUDA sm_89+): Triton's fp8 casts, i.e. the GPU's
  ``cvt.rn.satfinite`` conversions, which round the same way; fewer instructions.

Both use ``tl.math.div_rn`` (plain ``/`` on CUDA is an approximate division), and the torch
reference divides by a tensor, never a Python scalar (CUDA turns that into a multiply).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

try:  # Triton is optional: CPU-only installs use the torch reference.
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

    def _jit(fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn


__all__ = [
    "E4M3_MAX",
    "SCALE_BYTES",
    "dequantize_reference",
    "dequantize_triton",
    "fp8_dequantize",
    "fp8_quantize",
    "quantize_reference",
    "quantize_triton",
    "triton_available",
]

E4M3_MAX = 448.0
"""Largest finite float8 e4m3fn value."""
SCALE_BYTES = 4
"""Bytes of the fp32 scale stored at the end of every packed row."""
_NAN_BYTE = 0x7F
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per program on CUDA (best of a rows x warps sweep on an H200, B=1 H=24 S=16384
# D=128 bf16: quantize 32 rows of 128, dequantize 64 rows of 128).
_ELEMENTS_PER_PROGRAM_QUANTIZE = 4096
_ELEMENTS_PER_PROGRAM_DEQUANTIZE = 8192
_ELEMENTS_PER_PROGRAM_INTERPRETER = 65536  # the interpreter pays per program instance


def triton_available() -> bool:
    """True when Triton imported (kernels usable on CUDA, or anywhere under TRITON_INTERPRET=1)."""
    return triton is not None


# ---------------------------------------------------------------------------------------
# Validation and shapes
# ---------------------------------------------------------------------------------------


def _check_quantize_args(x: Tensor, groups: int) -> tuple[int, int, int, int]:
    """Validate ``fp8_quantize`` arguments; return ``(B, H, S, D)``."""
    if x.dim() != 4:
        raise ValueError(f"fp8_quantize: expected x of shape [B, H, S, D], got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fp8_quantize: x must be fp32, bf16 or fp16, got {x.dtype}")
    B, H, S, D = x.shape
    if groups < 1 or H % groups != 0:
        raise ValueError(f"fp8_quantize: {H} heads are not divisible into groups={groups}")
    return B, H, S, D


def _check_dequantize_args(packed: Tensor, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """Validate ``fp8_dequantize`` arguments; return ``(G, S, B, Hg, D)``."""
    if packed.dim() != 5 or packed.dtype != torch.uint8:
        raise ValueError(
            "fp8_dequantize: expected uint8 packed of shape [G, S, B, Hg, D + 4], "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fp8_dequantize: dtype must be fp32, bf16 or fp16, got {dtype}")
    G, S, B, Hg, row = packed.shape
    if row <= SCALE_BYTES:
        raise ValueError(f"fp8_dequantize: packed rows of {row} bytes hold no data after the scale")
    return G, S, B, Hg, row - SCALE_BYTES


# ---------------------------------------------------------------------------------------
# Pure-torch reference
# ---------------------------------------------------------------------------------------


def _row_scale(xf: Tensor) -> Tensor:
    """fp32 ``[..., D]`` -> fp32 scale ``[..., 1]`` per the module docstring's rule."""
    amax = xf.abs().amax(dim=-1, keepdim=True)
    # A tensor divisor, not a Python scalar: CUDA turns `t / scalar` into `t * (1 / scalar)`,
    # which is not the IEEE quotient and would differ from the kernel in the last bit.
    scale = amax / torch.full_like(amax, E4M3_MAX)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    has_nan = xf.isnan().any(dim=-1, keepdim=True)
    return torch.where(has_nan, torch.full_like(scale, float("nan")), scale)


def _to_e4m3_bytes(v: Tensor) -> Tensor:
    """fp32 -> e4m3fn bytes: saturate finite values to +-448, round to nearest even, NaN -> 0x7F."""
    q = v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(v.isnan(), torch.full_like(q, _NAN_BYTE), q)


def quantize_reference(x: Tensor, groups: int) -> Tensor:
    """Pure-torch ``fp8_quantize``: ``[B, H, S, D]`` -> uint8 ``[groups, S, B, H/groups, D + 4]``."""
    B, H, S, D = _check_quantize_args(x, groups)
    xf = x.float()
    scale = _row_scale(xf)  # [B, H, S, 1]
    q = _to_e4m3_bytes(xf / scale)  # [B, H, S, D]
    rows = torch.cat([q, scale.contiguous().view(torch.uint8)], dim=-1)  # [B, H, S, D + 4]
    # [B, H, S, D+4] -> [B, G, Hg, S, D+4] -> [G, S, B, Hg, D+4]
    rows = rows.reshape(B, groups, H // groups, S, D + SCALE_BYTES)
    return rows.permute(1, 3, 0, 2, 4).contiguous()


def dequantize_reference(packed: Tensor, dtype: torch.dtype) -> Tensor:
    """Pure-torch ``fp8_dequantize``: uint8 ``[G, S, B, Hg, D + 4]`` -> ``dtype`` ``[B, G*Hg, S, D]``."""
    G, S, B, Hg, D = _check_dequantize_args(packed, dtype)
    values = packed[..., :D].contiguous().view(torch.float8_e4m3fn).float()
    scale = packed[..., D:].contiguous().view(torch.float32)  # [G, S, B, Hg, 1]
    out = (values * scale).to(dtype)  # [G, S, B, Hg, D]
    # [G, S, B, Hg, D] -> [B, G, Hg, S, D] -> [B, G*Hg, S, D]
    return out.permute(2, 0, 3, 1, 4).reshape(B, G * Hg, S, D).contiguous()


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------


@_jit
def _e4m3_byte(v):
    """fp32 tensor -> int32 e4m3fn byte (RNE, saturate to +-448, subnormals, NaN -> 0x7F)."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    is_nan = mag > 0x7F800000
    mag = tl.minimum(mag, 0x43E00000)  # saturate: bits of 448.0 (also maps inf, never NaN)
    # Normal range [2**-6, 448]: rebias the exponent (127 -> 7) and round the 23-bit
    # mantissa to 3 bits, ties to even; a carry runs into the exponent as it should.
    odd = (mag >> 20) & 1
    normal = (mag - (120 << 23) + 0x7FFFF + odd) >> 20
    # Subnormal range (< 2**-6): k = round_half_even(|v| * 2**9), k in 0..8 (8 = 2**-6).
    exp = tl.maximum(mag >> 23, 1)
    mant = (mag & 0x7FFFFF) | tl.where((mag >> 23) > 0, 0x800000, 0)
    shift = tl.minimum(141 - exp, 31)  # >= 21 here
    half = 1 << (shift - 1)
    sub = (mant + half - 1 + ((mant >> shift) & 1)) >> shift
    byte = tl.where(mag < (121 << 23), sub, normal) | sign
    return tl.where(is_nan, 0x7F, byte)


@_jit
def _e4m3_value(byte):
    """int32 e4m3fn byte -> fp32 value (exact)."""
    sign = (byte & 0x80) << 24
    exp = (byte >> 3) & 0xF
    mant = byte & 0x7
    normal = (sign | ((exp + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)
    sub = mant.to(tl.float32) * 0.001953125  # |value| = mant * 2**-9
    # The sign goes in as a bit: Triton lowers unary minus to `0 - x`, which loses -0.0.
    sub = (sub.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    value = tl.where(exp == 0, sub, normal)
    nan = tl.full(value.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    return tl.where((byte & 0x7F) == 0x7F, nan, value)


@_jit
def _bf16_bits(value):
    """fp32 tensor -> int32 holding the bf16 bits, round to nearest even (NaN -> 0x7FC0)."""
    bits = value.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(value != value, 0x7FC0, rounded & 0xFFFF)


@_jit
def _packed_row_coords(rows, S, B, Hg):
    """int32 packed row ``((g*S + s)*B + b)*Hg + h`` -> int64 ``(g, s, b, h)``.

    The divisions stay in int32 (64-bit division is slow on GPUs; the host checks that the
    row count fits), the coordinates are widened for the address arithmetic.
    """
    h = rows % Hg
    t = rows // Hg
    b = t % B
    t = t // B
    s = t % S
    g = t // S
    return g.to(tl.int64), s.to(tl.int64), b.to(tl.int64), h.to(tl.int64)


@_jit
def _fp8_quantize_kernel(
    x_ptr,  # input [B, H, S, D], fp32 / bf16 / fp16, any strides
    out_ptr,  # output uint8 [G, S, B, Hg, D + 4], contiguous
    n_rows,  # G * S * B * Hg: number of packed rows
    S,  # tokens
    B,  # batch
    Hg,  # heads per group
    D,  # head_dim
    stride_b,  # x.stride(0), in elements
    stride_h,  # x.stride(1)
    stride_s,  # x.stride(2)
    stride_d,  # x.stride(3)
    HW_CAST: tl.constexpr,  # use the GPU's fp32 -> e4m3 cvt (sm_89+), not the integer rounding
    ROWS: tl.constexpr,  # packed rows per program (power of two)
    BLOCK: tl.constexpr,  # power of two >= D
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # int32: n_rows < 2**31
    row_ok = rows < n_rows
    g, s, b, h = _packed_row_coords(rows, S, B, Hg)
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = row_ok[:, None] & (cols < D)[None, :]

    src = b * stride_b + (g * Hg + h) * stride_h + s * stride_s
    x = tl.load(x_ptr + src[:, None] + cols[None, :] * stride_d, mask=mask, other=0.0)
    x = x.to(tl.float32)

    amax = tl.max(tl.abs(x), axis=1)
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    scale = tl.where(scale == 0.0, 1.0, scale)
    nan = tl.full(scale.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    scale = tl.where(has_nan, nan, scale)

    v = tl.math.div_rn(x, scale[:, None])
    if HW_CAST:  # cvt.rn.satfinite: the same RNE + saturation; NaN made canonical below
        byte = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        byte = tl.where(v != v, 0x7F, byte).to(tl.uint8)
    else:
        byte = _e4m3_byte(v).to(tl.uint8)
    dst = rows * (D + 4)
    tl.store(out_ptr + dst[:, None] + cols[None, :], byte, mask=mask)

    nib = tl.arange(0, 4)  # the 4 little-endian bytes of the fp32 scale
    scale_bits = scale.to(tl.int32, bitcast=True)
    scale_bytes = (scale_bits[:, None] >> (nib[None, :] * 8)) & 0xFF
    tl.store(
        out_ptr + dst[:, None] + D + nib[None, :], scale_bytes.to(tl.uint8), mask=row_ok[:, None]
    )


@_jit
def _fp8_dequantize_kernel(
    packed_ptr,  # input uint8 [G, S, B, Hg, D + 4], contiguous
    out_ptr,  # output [B, G*Hg, S, D], contiguous; an int16 view of it when BF16_BITS
    n_rows,  # G * S * B * Hg: number of packed rows
    S,  # tokens
    B,  # batch
    Hg,  # heads per group
    D,  # head_dim
    H,  # G * Hg: heads of the output
    BF16_BITS: tl.constexpr,  # bf16 output rounded here in integers, stored via an int16 view
    HW_CAST: tl.constexpr,  # use the GPU's e4m3 -> fp32 cvt (sm_89+), not the integer decode
    ROWS: tl.constexpr,  # packed rows per program (power of two)
    BLOCK: tl.constexpr,  # power of two >= D
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # int32: n_rows < 2**31
    row_ok = rows < n_rows
    g, s, b, h = _packed_row_coords(rows, S, B, Hg)
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = row_ok[:, None] & (cols < D)[None, :]

    src = rows * (D + 4)
    byte = tl.load(packed_ptr + src[:, None] + cols[None, :], mask=mask, other=0)
    s0 = tl.load(packed_ptr + src + D, mask=row_ok, other=0).to(tl.int32)
    s1 = tl.load(packed_ptr + src + D + 1, mask=row_ok, other=0).to(tl.int32)
    s2 = tl.load(packed_ptr + src + D + 2, mask=row_ok, other=0).to(tl.int32)
    s3 = tl.load(packed_ptr + src + D + 3, mask=row_ok, other=0).to(tl.int32)
    scale = (s0 | (s1 << 8) | (s2 << 16) | (s3 << 24)).to(tl.float32, bitcast=True)

    if HW_CAST:
        value = byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        value = _e4m3_value(byte.to(tl.int32))
    value = value * scale[:, None]
    dst = ((b * H + g * Hg + h) * S + s) * D
    ptrs = out_ptr + dst[:, None] + cols[None, :]
    if BF16_BITS:
        tl.store(ptrs, _bf16_bits(value).to(tl.int16), mask=mask)
    else:
        tl.store(ptrs, value.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError(
            "cpfx fp8 kernels need Triton; install cpfx[triton] or use the *_reference functions"
        )


def _launch_shape(
    n_rows: int, D: int, device: torch.device, rows_per_program: int | None, cuda_budget: int
) -> tuple[int, int, int]:
    """``(BLOCK, ROWS, n_programs)`` for ``n_rows`` rows of ``D`` elements."""
    if n_rows >= 2**31 - 2**20:
        raise ValueError(f"cpfx fp8 kernels: {n_rows} rows exceed the int32 row index")
    block = triton.next_power_of_2(D)
    if rows_per_program is None:
        on_cuda = device.type == "cuda"
        budget = cuda_budget if on_cuda else _ELEMENTS_PER_PROGRAM_INTERPRETER
        rows_per_program = min(max(1, budget // block), triton.next_power_of_2(max(n_rows, 1)))
    rows = triton.next_power_of_2(rows_per_program)
    return block, rows, triton.cdiv(n_rows, rows)


def _hw_cast_default(device: torch.device, hw_cast: bool | None) -> bool:
    """Use the hardware e4m3 conversions on CUDA sm_89+ (never under the interpreter)."""
    if hw_cast is not None:
        return hw_cast
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_triton(
    x: Tensor,
    groups: int,
    *,
    rows_per_program: int | None = None,
    num_warps: int = 4,
    hw_cast: bool | None = None,
) -> Tensor:
    """Triton ``fp8_quantize`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    ``hw_cast``: round with the GPU's cvt instruction (default on sm_89+) or with the
    integer code path (the only one the interpreter runs right); both give the same bytes.
    """
    _require_triton()
    B, H, S, D = _check_quantize_args(x, groups)
    Hg = H // groups
    out = torch.empty((groups, S, B, Hg, D + SCALE_BYTES), dtype=torch.uint8, device=x.device)
    n_rows = groups * S * B * Hg
    budget = _ELEMENTS_PER_PROGRAM_QUANTIZE
    block, rows, n_programs = _launch_shape(n_rows, D, x.device, rows_per_program, budget)
    if n_programs:
        _fp8_quantize_kernel[(n_programs,)](
            x, out, n_rows, S, B, Hg, D, *x.stride(),
            HW_CAST=_hw_cast_default(x.device, hw_cast), ROWS=rows, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return out


def dequantize_triton(
    packed: Tensor,
    dtype: torch.dtype,
    *,
    rows_per_program: int | None = None,
    num_warps: int = 4,
    hw_cast: bool | None = None,
) -> Tensor:
    """Triton ``fp8_dequantize`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    ``hw_cast`` as in :func:`quantize_triton`; without it, bf16 output is also rounded in
    integer arithmetic (the interpreter's fp32 -> bf16 cast truncates).
    """
    _require_triton()
    G, S, B, Hg, D = _check_dequantize_args(packed, dtype)
    packed = packed.contiguous()
    out = torch.empty((B, G * Hg, S, D), dtype=dtype, device=packed.device)
    hw = _hw_cast_default(packed.device, hw_cast)
    bf16_bits = dtype == torch.bfloat16 and not hw
    target = out.view(torch.int16) if bf16_bits else out
    n_rows = G * S * B * Hg
    budget = _ELEMENTS_PER_PROGRAM_DEQUANTIZE
    block, rows, n_programs = _launch_shape(n_rows, D, packed.device, rows_per_program, budget)
    if n_programs:
        _fp8_dequantize_kernel[(n_programs,)](
            packed, target, n_rows, S, B, Hg, D, G * Hg,
            BF16_BITS=bf16_bits, HW_CAST=hw, ROWS=rows, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------
# Custom ops: one graph node each; CUDA -> Triton, anything else -> reference
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("cpfx::fp8_quantize", mutates_args=())
def fp8_quantize(x: Tensor, groups: int) -> Tensor:
    """``[B, H, S, D]`` -> uint8 ``[groups, S, B, H/groups, D + 4]`` (see module docstring)."""
    return quantize_reference(x, groups)


@fp8_quantize.register_kernel("cuda")
def _fp8_quantize_cuda(x: Tensor, groups: int) -> Tensor:
    if triton is None:
        log.warning("cpfx::fp8_quantize on CUDA without Triton: using the torch reference")
        return quantize_reference(x, groups)
    return quantize_triton(x, groups)


@fp8_quantize.register_fake
def _fp8_quantize_fake(x: Tensor, groups: int) -> Tensor:
    B, H, S, D = _check_quantize_args(x, groups)
    return x.new_empty((groups, S, B, H // groups, D + SCALE_BYTES), dtype=torch.uint8)


@torch.library.custom_op("cpfx::fp8_dequantize", mutates_args=())
def fp8_dequantize(packed: Tensor, dtype: torch.dtype) -> Tensor:
    """uint8 ``[G, S, B, Hg, D + 4]`` -> ``dtype`` ``[B, G*Hg, S, D]`` (see module docstring)."""
    return dequantize_reference(packed, dtype)


@fp8_dequantize.register_kernel("cuda")
def _fp8_dequantize_cuda(packed: Tensor, dtype: torch.dtype) -> Tensor:
    if triton is None:
        log.warning("cpfx::fp8_dequantize on CUDA without Triton: using the torch reference")
        return dequantize_reference(packed, dtype)
    return dequantize_triton(packed, dtype)


@fp8_dequantize.register_fake
def _fp8_dequantize_fake(packed: Tensor, dtype: torch.dtype) -> Tensor:
    G, S, B, Hg, D = _check_dequantize_args(packed, dtype)
    return packed.new_empty((B, G * Hg, S, D), dtype=dtype)
