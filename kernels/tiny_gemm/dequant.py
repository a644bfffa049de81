"""Standalone INT4 dequantization: Int4Weight -> the [N, K] weight in the scales' dtype.

The first half of a two-step pipeline (dequantize, then an FP16 GEMM), and the kernel the
dequant_breakdown experiment times against the fused W4A16 GEMM. Its result is bit-identical
to ``quant.dequantize``: ``(q - z) * s`` computed in fp32 and rounded once (round to nearest
even) to the scales' dtype.

A program owns a tile of BLOCK_N rows by BLOCK_K values of k (BLOCK_K / 2 packed bytes per
row, inside one 128-code K-block of the packed layout, loaded contiguously along K, so the
loads vectorize), inside one quantization group: its scales and zeros are one [BLOCK_N]
vector each. The low and high nibbles give the values of
the even and odd k; ``tl.join`` interleaves them, so the store is contiguous along K too. For
odd K the high nibble of a row's last byte is padding and is masked off the store, as are
the codes past K of the last K-block.

Codes become floats without an int->float conversion: ``q | 0x4B000000`` is the fp32 number
2^23 + q, exactly, and subtracting 2^23 leaves q, exactly.

Under TRITON_INTERPRET=1 the rounding to bf16 is done with integer ops: the interpreter
(Triton 3.6) truncates fp32 -> bf16 instead of rounding to nearest even. Compiled, the cast
is one cvt.rn.bf16.f32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import interpreting as _interpreting
from .quant import BLOCK_BYTES, K_BLOCK, Int4Weight, _require
from .w4a16 import _w_offset

# values of k per tile (at most; a tile never straddles a group nor a K-block) and outputs per program
_MAX_BLOCK_K = K_BLOCK
_TILE_ELEMENTS = 8192
_MAX_BLOCK_N = 256


@triton.jit
def _round_to(w, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 w rounded to nearest even in dtype (NaN to the canonical 0x7FC0, as torch does)."""
    if INTERPRET and dtype == tl.bfloat16:
        b = w.to(tl.int32, bitcast=True)
        b = tl.where(w != w, 0x7FC00000, b + 0x7FFF + ((b >> 16) & 1))
        return (b >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return w.to(dtype)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wb, group_size,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_BLOCK: tl.constexpr,
                    INTERPRET: tl.constexpr):
    """out[n, k] = (q[n, k] - z[k // G, n]) * s[k // G, n], fp32 math, one rounding."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    base = _w_offset(pid_k.to(tl.int64), stride_wb, HALF_K, W_BLOCK)   # the GEMM's addressing
    p = tl.load(w_ptr + base + rows[:, None] * W_BLOCK + tl.arange(0, HALF_K)[None, :],
                mask=mask_n[:, None], other=0)
    g = (pid_k * BLOCK_K) // group_size                      # the tile's group
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
    p32 = p.to(tl.int32)
    q_lo = ((p32 & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0   # k = 2r
    q_hi = ((p32 >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0    # k = 2r + 1
    w_lo = (q_lo - z[:, None]) * s[:, None]
    w_hi = (q_hi - z[:, None]) * s[:, None]
    w = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))   # k = 2r, 2r + 1 side by side
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + offs_k[None, :], _round_to(w, out_ptr.dtype.element_ty, INTERPRET),
             mask=mask_n[:, None] & (offs_k[None, :] < K))


def _block_k(K: int, group_size: int) -> int:
    """Values of k per tile: a power of two that divides the group size (any, for one group
    per row), at most _MAX_BLOCK_K; ValueError for an odd group size short of K, whose
    groups begin inside a byte."""
    if group_size >= K:
        return _MAX_BLOCK_K
    _require(group_size % 2 == 0, ValueError,
             f"qw.group_size = {group_size} is odd and less than K = {K}: groups would start "
             "inside a byte, which dequantize_triton does not handle")
    return min(_MAX_BLOCK_K, group_size & -group_size)


def dequantize_triton(qw: Int4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The [N, K] weight of qw in its scales' dtype, bit-identical to ``quant.dequantize``.

    out: an optional contiguous [N, K] result buffer of that dtype on qw's device. Runs on
    CUDA tensors, or on any device under TRITON_INTERPRET=1."""
    _require(isinstance(qw, Int4Weight), TypeError,
             f"qw must be a tiny_gemm.Int4Weight, got {type(qw).__name__}")
    _require(qw.device.type == "cuda" or _interpreting(), ValueError,
             f"qw is on {qw.device}: dequantize_triton needs CUDA tensors or TRITON_INTERPRET=1")
    N, K = qw.shape
    block_k = _block_k(K, qw.group_size)
    if out is None:
        out = torch.empty(N, K, dtype=qw.dtype, device=qw.device)
    else:
        _require(isinstance(out, torch.Tensor), TypeError,
                 f"out must be a torch.Tensor, got {type(out).__name__}")
        _require(out.dtype == qw.dtype, TypeError,
                 f"out must have the scales' dtype {qw.dtype}, got {out.dtype}")
        _require(tuple(out.shape) == (N, K), ValueError,
                 f"out must have shape {[N, K]}, got {list(out.shape)}")
        _require(out.device == qw.device, ValueError, f"out is on {out.device}, qw on {qw.device}")
        _require(out.is_contiguous(), ValueError, "out must be contiguous")
    if out.numel() == 0:
        return out
    block_n = min(_MAX_BLOCK_N, _TILE_ELEMENTS // block_k, triton.next_power_of_2(N))
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _dequant_kernel[grid](qw.packed, qw.scales, qw.zeros, out, N, K, qw.packed.stride(0),
                          qw.group_size, BLOCK_N=block_n, BLOCK_K=block_k, W_BLOCK=BLOCK_BYTES,
                          INTERPRET=_interpreting(), num_warps=4)
    return out
