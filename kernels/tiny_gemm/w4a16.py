"""W4A16 GEMM: y[M, N] = x[M, K] @ dequantize(qw).T with packed INT4 weights.

One tile body (``_mac_tile``: load x and packed codes, unpack, multiply-accumulate, group
scaling; tensor-core dots, or FMAs for a single activation row) serves three work decompositions, which differ only in which (tile, K-range) a program owns
and in how partial tiles are reduced:

* ``dp``      one program per output tile, full K (Triton tutorial 03 grid, grouped swizzle);
* ``splitk``  grid (tiles, S): program (t, s) owns the s-th K-range of tile t (Hoque et al. 2024);
* ``streamk`` P persistent programs split the flattened (tile, K-iteration) space into P
              contiguous, near-equal ranges (Osama et al. 2023).

Reduction of partial tiles (``_reduce_partial``), the same for SplitK and StreamK: each
contributor writes its fp32 partial to its own slot and, after a CTA barrier, takes a ticket
from a per-tile counter with one release-acquire atomic (``_last_to_arrive``); the one that
draws the last ticket sums the slots in K order (loading a few slots at once, so their L2
round trips overlap), writes the tile and resets the counter.
Nobody waits on anybody, so it also runs under TRITON_INTERPRET=1, where programs run one
after the other, and the sum has one order, so every decomposition is bitwise reproducible
on a given GPU and configuration. (The SplitK paper's fp32 atomic adds into one accumulator
gave wrong rows at M = 16 on an H200 in our first version and were removed; the ordered sum
moves tiles x splits x BLOCK_M x BLOCK_N x 8 bytes, a few hundred KB at decode sizes.)

The counters are zero at rest (the last contributor resets its tile's), so they are cached
per device and need no memset per call. Calls that run concurrently on different streams of
one device must not share them: run them on one stream.

Dequantization without int->float conversions (I2F runs at a quarter of the FP32 rate): for
codes q in 0..15 the 16-bit pattern ``q | 0x6400`` is the fp16 number 1024 + q and
``q | 0x4300`` the bf16 number 128 + q, both exact. The tensor-core path builds these
operands (``_unpack_asm``) and removes the offset with the zero point, by the zeros' dtype:

* int8 zeros (round-to-nearest, GPTQ): (OFFSET + q) - (OFFSET + z) = q - z in the operand
  itself, one packed subtraction per two codes, exact in fp16 and bf16; y += s * (x @ (q - z)).
* float zeros (fractional, HQQ): y += s * (x @ (OFFSET + q) - (z + OFFSET) * sum_k x_k), which
  needs a row sum of x per tile (a cross-warp reduction). On an H200 the int8 form ran
  1.07-1.3x faster at M = 1 and 16 with the tuned tiles (K 4096..14336, N 4096..28672;
  results/nvidia_h200/scratch/exp3_zero_point_epilogues.txt).

The M = 1 path (block_m = 1, no tensor cores) uses the fp32 pattern 1 + q / 16 instead; see
``_mac_tile``.
Tiles never straddle a group (BLOCK_K divides the group size), so scales are applied once per
tile on [BLOCK_M, BLOCK_N] instead of once per weight, nor a 128-code K-block of the packed
layout (quant.py), so the weight bytes of one tile and K-step are one contiguous run.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
import triton
import triton.language as tl

from ._checks import BACKENDS, check_out as _check_out, interpreting as _interpreting, use_triton as _use_triton
from .quant import BLOCK_BYTES, K_BLOCK, Int4Weight, _require, dequantize_float

DECOMPOSITIONS = ("dp", "splitk", "streamk")
CONFIG_DIR = Path(__file__).parent / "configs"

# (magic bit pattern, the number it adds) per activation dtype
_MAGIC = {torch.float16: (0x6400, 1024.0), torch.bfloat16: (0x4300, 128.0)}


# ------------------------------------------------------------------------------------------
# Device code
# ------------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering of output tiles (Triton tutorial 03): GROUP_M row-tiles share weights."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def _unpack_ptx(magic_byte: int) -> str:
    """PTX for _unpack_asm: four bytes in, (magic_byte << 8 | low nibble) and (magic_byte << 8 |
    high nibble) of each byte out, as two pairs of 16-bit values."""
    return f"""{{
        .reg .b32 m, h, c;
        mov.b32 c, 0x{magic_byte * 0x01010101:08X};
        and.b32 m, $4, 0x0F0F0F0F;
        shr.u32 h, $4, 4;
        and.b32 h, h, 0x0F0F0F0F;
        prmt.b32 $0, m, c, 0x5140;
        prmt.b32 $1, m, c, 0x7362;
        prmt.b32 $2, h, c, 0x5140;
        prmt.b32 $3, h, c, 0x7362;
        }}"""


_UNPACK_PTX_FP16 = tl.constexpr(_unpack_ptx(0x64))   # 0x6400 | q = fp16 1024 + q
_UNPACK_PTX_BF16 = tl.constexpr(_unpack_ptx(0x43))   # 0x4300 | q = bf16 128 + q


@triton.jit
def _unpack_asm(p, MAGIC: tl.constexpr):
    """(MAGIC | low nibble, MAGIC | high nibble) of each byte of p, as 16-bit patterns.

    What the INTERPRET branch of _mac_tile computes with 16-bit integer ops, done on four
    bytes at a time in 32-bit registers: two masks, a shift and four byte permutes (PRMT
    picks each code byte and the MAGIC byte above it) per eight codes. Elementwise, so its
    result does not depend on which four elements a thread packs together."""
    if MAGIC == 0x6400:
        asm: tl.constexpr = _UNPACK_PTX_FP16
    else:
        asm: tl.constexpr = _UNPACK_PTX_BF16
    return tl.inline_asm_elementwise(asm=asm, constraints="=r,=r,=r,=r,r", args=[p],
                                     dtype=(tl.int16, tl.int16), is_pure=True, pack=4)


@triton.jit
def _w_offset(it, stride_wb, HALF_K: tl.constexpr, W_BLOCK: tl.constexpr):
    """Offset of K-iteration it's first packed byte in column 0 of the K-blocked layout: its
    block's start plus its place in the block (written with the iteration index, so that
    Triton sees a multiple of HALF_K and vectorizes the loads)."""
    PER: tl.constexpr = W_BLOCK // HALF_K
    return (it // PER) * stride_wb + (it % PER) * HALF_K


@triton.jit
def _mac_tile(acc, x_ptr, w_ptr, s_ptr, z_ptr, pid_m, pid_n, it_lo, it_hi,
              M, N, K, group_size, stride_xm, stride_wb, W_BLOCK: tl.constexpr,
              MAGIC: tl.constexpr, MAGIC_OFFSET: tl.constexpr, ZERO_INT: tl.constexpr,
              ABLATE_DEQUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              INTERPRET: tl.constexpr):
    """acc += x[tile rows, K-iterations it_lo..it_hi) @ W[same K, tile cols], fp32.

    The tile is read as p[r, n] = packed[k0 // 128, n, k0 % 128 / 2 + r], BLOCK_K / 2 bytes
    along K for each of BLOCK_N columns, one contiguous run of BLOCK_N * 64 bytes when
    BLOCK_K = 128: byte r holds k = k0 + 2r (low nibble) and k0 + 2r + 1 (high nibble), so
    x @ W = x[:, even k] @ W_lo + x[:, odd k] @ W_hi: two dots and no interleaving of the
    unpacked codes (a join/permute/reshape interleave ran 2x slower on an H200).

    Tensor-core path (BLOCK_M >= 16): the packed tile goes global -> shared memory by
    Triton's pipeliner (cp.async) and is read back straight into the dot-operand layout
    (four bytes along K per thread, one 32-bit load), where _unpack_asm turns it into the
    two fp16/bf16 operands in registers. No unpacked value goes through shared memory.

    BLOCK_M == 1 (one activation row, M = 1 decode) uses no tensor cores: each weight is
    dequantized by one FMA and multiplied by another, into a [BLOCK_K / 2, BLOCK_N]
    accumulator reduced once at the end. The code becomes a float without an int->float
    conversion: (q << 19) | 0x3F800000 is the fp32 number 1 + q / 16, exactly.

    Under INTERPRET the unpack uses plain integer ops instead of inline PTX, and the dot
    operands are upcast (exactly): the Triton interpreter (3.6 to 3.9) multiplies bf16
    operands as their raw uint16 bit patterns."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, HALF_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # packed is [ceil(K / 2 / W_BLOCK), N, W_BLOCK], stride_wb bytes between K-blocks and zero-padded
    # along K, so a tile's bytes of one K-step are one contiguous run and need no K mask
    # (x is masked, so the padded codes add nothing)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * W_BLOCK + offs_r[:, None]
    # Loads that do not feed tl.dot are not pipelined by Triton, so the next iteration's are
    # issued before this one's math by hand: its group's scales and zeros (a DRAM latency per
    # iteration otherwise: ~20% of the time at M = 1, K 8192, N 28672 on an H200, see
    # results/nvidia_h200/scratch/exp2_run_length_and_groups.txt) and, for
    # the FMA path, which has no dot, its weights and x as well.
    g0 = (it_lo * BLOCK_K) // group_size
    s_next = tl.load(s_ptr + g0 * N + offs_n, mask=mask_n & (it_lo < it_hi), other=0.0)
    z_next = tl.load(z_ptr + g0 * N + offs_n, mask=mask_n & (it_lo < it_hi), other=0)
    if BLOCK_M == 1:
        acc2 = tl.zeros((HALF_K, BLOCK_N), tl.float32)
        p_next = tl.load(w_ptrs + _w_offset(it_lo, stride_wb, HALF_K, W_BLOCK),
                         mask=mask_n[None, :] & (it_lo < it_hi), other=0)
        x_next = tl.load(x_ptrs + it_lo * BLOCK_K, mask=mask_m[:, None] & (offs_k[None, :] < K - it_lo * BLOCK_K)
                         & (it_lo < it_hi), other=0.0)
    for it in range(it_lo, it_hi):
        k0 = it * BLOCK_K
        more = it + 1 < it_hi
        s = s_next.to(tl.float32)
        z = z_next.to(tl.float32)
        g1 = (k0 + BLOCK_K) // group_size
        s_next = tl.load(s_ptr + g1 * N + offs_n, mask=mask_n & more, other=0.0)
        z_next = tl.load(z_ptr + g1 * N + offs_n, mask=mask_n & more, other=0)
        if BLOCK_M == 1:
            p = p_next
            x = x_next
            p_next = tl.load(w_ptrs + _w_offset(it + 1, stride_wb, HALF_K, W_BLOCK), mask=mask_n[None, :] & more,
                             other=0)
            x_next = tl.load(x_ptrs + k0 + BLOCK_K,
                             mask=mask_m[:, None] & (offs_k[None, :] < K - k0 - BLOCK_K) & more, other=0.0)
        else:
            p = tl.load(w_ptrs + _w_offset(it, stride_wb, HALF_K, W_BLOCK), mask=mask_n[None, :], other=0)
            # one contiguous load of x, split into even and odd k in registers
            x = tl.load(x_ptrs + k0, mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0.0)
        xe, xo = tl.split(tl.reshape(x, (BLOCK_M, HALF_K, 2)))
        if BLOCK_M == 1:
            p32 = p.to(tl.int32)
            f_lo = (((p32 << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            f_hi = (((p32 << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            # (q - z) * s = f * 16s - (1 + z / 16) * 16s
            s16 = 16.0 * s
            c = -(1.0 + z / 16.0) * s16
            xe1 = tl.reshape(xe, (HALF_K,)).to(tl.float32)
            xo1 = tl.reshape(xo, (HALF_K,)).to(tl.float32)
            acc2 += xe1[:, None] * (f_lo * s16[None, :] + c[None, :])
            acc2 += xo1[:, None] * (f_hi * s16[None, :] + c[None, :])
        else:
            if INTERPRET:
                p16 = p.to(tl.int16)
                lo = ((p16 & 0xF) | MAGIC).to(x.dtype, bitcast=True).to(tl.float32)   # OFFSET + q, k = 2r
                hi = ((p16 >> 4) | MAGIC).to(x.dtype, bitcast=True).to(tl.float32)    # OFFSET + q, k = 2r + 1
                xe = xe.to(tl.float32)
                xo = xo.to(tl.float32)
            elif ABLATE_DEQUANT:
                # the dequant_breakdown experiment's kernel: the bytes, zero-extended, are the
                # operands; no unpack, no zero point (wrong results, on purpose)
                lo = p.to(tl.int16).to(x.dtype, bitcast=True)
                hi = lo
            else:
                lo, hi = _unpack_asm(p, MAGIC)
                lo = lo.to(x.dtype, bitcast=True)
                hi = hi.to(x.dtype, bitcast=True)
            if ABLATE_DEQUANT:
                acc += s[None, :] * tl.dot(xo, hi, tl.dot(xe, lo))
            elif ZERO_INT:
                # (OFFSET + q) - (OFFSET + z) = q - z, exact in fp16 and bf16 for int8 z
                zo = (z + MAGIC_OFFSET).to(lo.dtype)
                acc += s[None, :] * tl.dot(xo, hi - zo[None, :], tl.dot(xe, lo - zo[None, :]))
            else:
                x_sum = tl.sum(x.to(tl.float32), axis=1)
                dot = tl.dot(xo, hi, tl.dot(xe, lo))
                acc += s[None, :] * (dot - x_sum[:, None] * (z + MAGIC_OFFSET)[None, :])
    if BLOCK_M == 1:
        acc += tl.sum(acc2, axis=0)[None, :]
    return acc


@triton.jit
def _store_tile(out_ptr, acc, pid_m, pid_n, M, N, stride_om,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _last_to_arrive(lock_ptr, idx, n_parts):
    """The ticket protocol of every in-kernel reduction (w4a16's partial tiles, decode
    attention's splits): called by each of n_parts contributors right after it stored its
    partial; true for the one that draws the last ticket of counter idx, which must then read
    the partials with .cg loads and reset the counter to 0 once done.

    CUTLASS's Barrier (arrive_inc, wait_eq) pattern: a CTA barrier, then one thread's atomic.
    Triton runs a scalar atomic in one thread; with sem="acq_rel" it is fence.acq_rel.gpu +
    atom, and PTX fences are cumulative: the release also covers the other threads' partial
    stores ordered before it by the barrier. The acquire half orders that thread's later
    reads, and the barrier through which Triton hands the ticket to every thread orders
    theirs. An earlier version also fenced every thread before the barrier and again in the
    winner; without those fences decode attention at batch 1, context 512 took 5.63 instead
    of 6.28 us on an H100, and the SplitK / StreamK entries of the tuned tables 0.955x (H100)
    and 0.970x (H200) the time at the median, same bits (results/*/ticket_protocol/)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(lock_ptr + idx, 1, sem="acq_rel")
    return ticket == n_parts - 1


@triton.jit
def _reduce_partial(acc, tile_id, j, n_parts, pid_m, pid_n, out_ptr, ws_ptr, lock_ptr,
                    M, N, stride_om, SLOTS,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr = 4):
    """Contributor j of n_parts to tile tile_id writes its slot; the last to arrive sums the
    slots in K order, UNROLL at a time, and writes the tile (the W4A16 kernels pass
    _reduce_unroll's choice; fused_ffn's full-fusion path keeps the default).

    Only the tile's rows below M move through the workspace: at M = 1 with 16-row tensor-core
    tiles the other 15 rows are padding, and writing them made the partials 16x larger (3.7 MB
    at K 4096, N 14336, split 4, about an eighth of the packed weights' bytes)."""
    TILE: tl.constexpr = BLOCK_M * BLOCK_N
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] < M
    tl.store(ws_ptr + (tile_id * SLOTS + j) * TILE + offs, acc, mask=rows)
    if _last_to_arrive(lock_ptr, tile_id, n_parts):
        total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        # K order, whatever the arrival order; UNROLL slots are loaded before they are added,
        # so their L2 round trips overlap (one slot at a time, n_parts round trips ended the tile)
        for i0 in range(0, n_parts, UNROLL):
            for u in tl.static_range(UNROLL):
                total += tl.load(ws_ptr + (tile_id * SLOTS + i0 + u) * TILE + offs,
                                 mask=rows & (i0 + u < n_parts), other=0.0, cache_modifier=".cg")
        _store_tile(out_ptr, total, pid_m, pid_n, M, N, stride_om, BLOCK_M, BLOCK_N)
        tl.store(lock_ptr + tile_id, 0)


@triton.jit(do_not_specialize=["M"])
def _w4a16_dp_kernel(
        # pointers
        x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
        # sizes
        M, N, K, group_size,
        # strides (packed is [ceil(K/2/W_BLOCK), N, W_BLOCK], stride_wb between its K-blocks;
        # scales, zeros [K/G, N])
        stride_xm, stride_wb, stride_om,
        # meta-parameters
        MAGIC: tl.constexpr, MAGIC_OFFSET: tl.constexpr, ZERO_INT: tl.constexpr,
        ABLATE_DEQUANT: tl.constexpr, INTERPRET: tl.constexpr, W_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = _mac_tile(acc, x_ptr, w_ptr, s_ptr, z_ptr, pid_m, pid_n, 0, tl.cdiv(K, BLOCK_K),
                    M, N, K, group_size, stride_xm, stride_wb, W_BLOCK, MAGIC, MAGIC_OFFSET, ZERO_INT, ABLATE_DEQUANT, BLOCK_M, BLOCK_N, BLOCK_K,
                    INTERPRET)
    _store_tile(out_ptr, acc, pid_m, pid_n, M, N, stride_om, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["M", "iters_per_split", "n_splits"])
def _w4a16_splitk_kernel(
        # pointers
        x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
        # sizes
        M, N, K, group_size,
        # strides
        stride_xm, stride_wb, stride_om,
        # decomposition: each of the n_splits programs of a tile owns iters_per_split K-iterations
        iters_per_split, n_splits,
        # meta-parameters
        MAGIC: tl.constexpr, MAGIC_OFFSET: tl.constexpr, ZERO_INT: tl.constexpr,
        ABLATE_DEQUANT: tl.constexpr, INTERPRET: tl.constexpr, W_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        REDUCE_UNROLL: tl.constexpr):
    tile_id = tl.program_id(0)
    split = tl.program_id(1)
    pid_m, pid_n = _tile_coords(tile_id, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    it_lo = split * iters_per_split
    it_hi = min(it_lo + iters_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = _mac_tile(acc, x_ptr, w_ptr, s_ptr, z_ptr, pid_m, pid_n, it_lo, it_hi,
                    M, N, K, group_size, stride_xm, stride_wb, W_BLOCK, MAGIC, MAGIC_OFFSET, ZERO_INT, ABLATE_DEQUANT, BLOCK_M, BLOCK_N, BLOCK_K,
                    INTERPRET)
    _reduce_partial(acc, tile_id, split, n_splits, pid_m, pid_n, out_ptr, ws_ptr, lock_ptr,
                    M, N, stride_om, n_splits, BLOCK_M, BLOCK_N, REDUCE_UNROLL)


@triton.jit
def _streamk_owner(it, q, r):
    """The program whose range holds flattened iteration it (ranges: r of q + 1, then q)."""
    boundary = (q + 1) * r
    return tl.where(it < boundary, it // (q + 1), r + (it - boundary) // q)


@triton.jit(do_not_specialize=["M", "q", "r", "slots"])
def _w4a16_streamk_kernel(
        # pointers
        x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
        # sizes
        M, N, K, group_size,
        # strides
        stride_xm, stride_wb, stride_om,
        # decomposition: total = q * P + r iterations; program p owns q (+1 if p < r) of them
        q, r, slots,
        # meta-parameters
        MAGIC: tl.constexpr, MAGIC_OFFSET: tl.constexpr, ZERO_INT: tl.constexpr,
        ABLATE_DEQUANT: tl.constexpr, INTERPRET: tl.constexpr, W_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        REDUCE_UNROLL: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_iters = tl.cdiv(K, BLOCK_K)
    it = pid * q + min(pid, r)
    end = it + q + (pid < r).to(tl.int32)
    while it < end:
        tile_id = it // k_iters
        k_lo = it - tile_id * k_iters
        k_hi = min(k_iters, k_lo + (end - it))
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc = _mac_tile(acc, x_ptr, w_ptr, s_ptr, z_ptr, pid_m, pid_n, k_lo, k_hi,
                        M, N, K, group_size, stride_xm, stride_wb, W_BLOCK, MAGIC, MAGIC_OFFSET, ZERO_INT, ABLATE_DEQUANT, BLOCK_M, BLOCK_N, BLOCK_K,
                        INTERPRET)
        if (k_lo == 0) & (k_hi == k_iters):
            _store_tile(out_ptr, acc, pid_m, pid_n, M, N, stride_om, BLOCK_M, BLOCK_N)
        else:
            first = _streamk_owner(tile_id * k_iters, q, r)
            last = _streamk_owner(tile_id * k_iters + k_iters - 1, q, r)
            _reduce_partial(acc, tile_id, pid - first, last - first + 1, pid_m, pid_n,
                            out_ptr, ws_ptr, lock_ptr, M, N, stride_om, slots,
                            BLOCK_M, BLOCK_N, REDUCE_UNROLL)
        it += k_hi - k_lo


# ------------------------------------------------------------------------------------------
# Configurations
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class W4A16Config:
    """Launch configuration. block_m = 1 selects the FMA path (one activation row per
    program, no tensor cores); ``split_k`` is read by splitk, ``programs`` by streamk
    (0: one per SM); block_k is clamped to the group size and to the packed layout's
    K-block of 128."""

    decomposition: str = "dp"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    programs: int = 0
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        _require(self.decomposition in DECOMPOSITIONS, ValueError,
                 f"config.decomposition must be one of {DECOMPOSITIONS}, got {self.decomposition!r}")
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            _require((v >= 16 or (name == "block_m" and v == 1)) and v & (v - 1) == 0, ValueError,
                     f"config.{name} must be a power of two >= 16 (block_m may be 1), got {v}")
        _require(self.split_k >= 1, ValueError, f"config.split_k must be >= 1, got {self.split_k}")
        _require(self.programs >= 0, ValueError, f"config.programs must be >= 0, got {self.programs}")

    def to_dict(self) -> dict:
        return asdict(self)


def gpu_slug(name: str) -> str:
    """File-name form of a GPU name: 'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@lru_cache(maxsize=None)
def _device_info(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.name, props.multi_processor_count
    return "cpu", 4   # the interpreter: a few programs exercise the same code paths


@lru_cache(maxsize=None)
def load_config_table(gpu_name: str) -> dict:
    """The tuned table of a GPU: {(K, N, group_size): {M: entry}}; empty if none is shipped."""
    path = CONFIG_DIR / f"{gpu_slug(gpu_name)}.json"
    if not path.exists():
        return {}
    table: dict = {}
    for e in json.loads(path.read_text())["entries"]:
        table.setdefault((e["K"], e["N"], e["group_size"]), {})[e["M"]] = e
    return table


def heuristic_config(M: int, N: int, K: int, group_size: int, sm_count: int) -> W4A16Config:
    """Fallback when the table of this GPU has no entry for the shape.

    For decode (M <= 16) it follows the pattern of the tuned H100 and H200 tables: 16-row
    tensor-core tiles (1-row FMA tiles at M = 1 on weights of at most 4096 x 4096), block_n
    growing with N, and SplitK with the largest power-of-two split (at most 16) that keeps
    the launch within about four programs per SM and every split at least two K-steps long.
    tune_w4a16.py times this fallback beside each tuned entry ("fallback" in the table)."""
    if M > 16:
        bm = 64 if M <= 64 else 128
        return W4A16Config("dp", block_m=bm, block_n=128, block_k=64, num_warps=8 if bm == 128 else 4)
    bm = 1 if M == 1 and K * N <= 4096 * 4096 else 16
    bn = 32 if N <= 1024 and bm == 16 else 64 if N <= 4096 else 128
    bk = 128
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    k_iters = triton.cdiv(K, min(bk, group_size))
    split = 1
    while split < 16 and tiles * split * 2 <= 4 * sm_count and k_iters // (split * 2) >= 2:
        split *= 2
    warps = 4 if bm == 1 else 2
    if split == 1:
        return W4A16Config("dp", block_m=bm, block_n=bn, block_k=bk, num_warps=warps)
    return W4A16Config("splitk", block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps)


def select_config(M: int, N: int, K: int, group_size: int, device: torch.device,
                  decomposition: str = "auto", split_k: int | None = None) -> W4A16Config:
    """The configuration w4a16_matmul uses: the tuned table of this GPU, else the heuristic."""
    gpu, sms = _device_info(device)
    cfg = None
    entries = load_config_table(gpu).get((K, N, group_size)) if M <= 16 else None
    if entries:
        bucket = min((m for m in entries if m >= M), default=max(entries))
        e = entries[bucket]
        name = e["auto"] if decomposition == "auto" else decomposition
        if decomposition == "auto" and split_k is not None:
            name = "splitk"
        if name in e["best"]:
            cfg = W4A16Config(**e["best"][name])
    if cfg is None:
        cfg = heuristic_config(M, N, K, group_size, sms)
        if device.type != "cuda":   # the interpreter pays per tile-iteration: few, wide tiles
            cfg = replace(cfg, block_n=128)
        if split_k is not None:
            cfg = replace(cfg, decomposition="splitk")
        elif decomposition != "auto" and decomposition != cfg.decomposition:
            cfg = replace(cfg, decomposition=decomposition,
                          split_k=max(cfg.split_k, 4) if decomposition == "splitk" else cfg.split_k)
    if split_k is not None:
        cfg = replace(cfg, split_k=split_k)
    return cfg


# ------------------------------------------------------------------------------------------
# Reduction scratch
# ------------------------------------------------------------------------------------------
_LOCKS: dict[torch.device, torch.Tensor] = {}
# Tests set this: the partial-tile workspace is then NaN-filled before each launch, so a
# reduction that read a slot nobody wrote would show in the output.
POISON_WORKSPACE = False


def _tile_locks(device: torch.device, tiles: int) -> torch.Tensor:
    """int32 ticket counters, one per output tile, zero at rest: the last contributor of a tile
    resets its counter. Cached per device outside CUDA graph capture; a capture that finds the
    cache too small gets its own (captured) zeros."""
    buf = _LOCKS.get(device)
    if buf is not None and buf.numel() >= tiles:
        return buf[:tiles]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    buf = torch.zeros(max(tiles, 2 * (buf.numel() if buf is not None else 0), 1024),
                      dtype=torch.int32, device=device)
    _LOCKS[device] = buf
    return buf[:tiles]


# ------------------------------------------------------------------------------------------
# Host entry points
# ------------------------------------------------------------------------------------------
def w4a16_reference(x: torch.Tensor, qw: Int4Weight, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """x @ dequantize(qw).T computed in `dtype` (float64 for tests), shape [..., N]."""
    w = dequantize_float(qw, dtype).to(x.device)
    return (x.to(dtype) @ w.t())


def _reduce_unroll(decomposition: str, block_m: int, block_n: int, num_warps: int) -> int:
    """Partial slots the last contributor of a tile loads at once. Measured on an H200
    against one at a time (results/nvidia_h200/scratch/reduce_ab.txt, 1, 2, 4 and 8 slots on
    every tuned config): SplitK ran fastest with 8 (up to 11% less time, K 11008, N 4096), or
    4 where a slot is 32 fp32 values per thread (8 was then up to 5% slower than 1); the
    1-row FMA tiles were 1-3% faster still with 4 than with 8. StreamK, whose tiles have two
    or three contributors, gained only with 8 (2 and 4 were up to 8% slower than 1 on its
    256-wide tiles)."""
    if decomposition == "streamk":
        return 8
    per_thread = max(1, block_m * block_n // (32 * num_warps))
    return max(1, min(8, 128 // per_thread))


def _kernel_meta(cfg: W4A16Config, act_dtype: torch.dtype, zero_int: bool, block_k: int,
                 ablate_dequant: bool = False, interpret: bool = False) -> dict:
    """The constexpr arguments of cfg's kernel for activations of act_dtype, with block_k
    already clamped (_launch); inspect_w4a16.py compiles the kernels offline from the same."""
    magic, offset = _MAGIC[act_dtype]
    meta = dict(MAGIC=magic, MAGIC_OFFSET=offset, ZERO_INT=zero_int, ABLATE_DEQUANT=ablate_dequant,
                INTERPRET=interpret, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
                GROUP_M=cfg.group_m, W_BLOCK=BLOCK_BYTES)
    if cfg.decomposition != "dp":   # the reduction of partial tiles
        meta.update(REDUCE_UNROLL=_reduce_unroll(cfg.decomposition, cfg.block_m, cfg.block_n,
                                                 cfg.num_warps))
    return meta


def _launch(x2: torch.Tensor, qw: Int4Weight, out2: torch.Tensor, cfg: W4A16Config,
            ablate_dequant: bool = False):
    """Launch one kernel; returns Triton's handle of the compiled kernel (for inspection).
    ablate_dequant (tensor-core path only, experiments/dequant_breakdown): the same kernel
    with its unpacking and zero point removed, to measure what they cost. Wrong results."""
    M, K = x2.shape
    N = qw.out_features
    G = qw.group_size
    # a tile never straddles a group nor a K-block of the packed layout
    bk = min(cfg.block_k, K_BLOCK) if G >= K else min(cfg.block_k, G, K_BLOCK)
    bm, bn = cfg.block_m, cfg.block_n
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    k_iters = triton.cdiv(K, bk)
    common = dict(_kernel_meta(cfg, x2.dtype, qw.zeros.dtype == torch.int8, bk, ablate_dequant,
                               _interpreting()),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (x2, qw.packed, qw.scales, qw.zeros, out2)
    # packed [ceil(K / 128), N, 64]: 64 bytes of a column per K-block, stride(0) between
    # blocks (the whole weight's N * 64 for the parts of Int4Weight.split)
    sizes = (M, N, K, G, x2.stride(0), qw.packed.stride(0), out2.stride(0))
    if cfg.decomposition == "dp":
        return _w4a16_dp_kernel[(tiles,)](*args, *sizes, **common)

    if cfg.decomposition == "splitk":
        per = triton.cdiv(k_iters, min(cfg.split_k, k_iters))
        parts = triton.cdiv(k_iters, per)          # no empty splits
        grid = (tiles, parts)
        slots = parts
    else:
        programs = cfg.programs or _device_info(x2.device)[1]
        total = tiles * k_iters
        programs = min(programs, total)
        q, r = divmod(total, programs)
        grid = (programs,)
        slots = triton.cdiv(k_iters, q) + 1        # most programs that can share one tile
    locks = _tile_locks(x2.device, tiles)
    ws = torch.empty(tiles * slots * bm * bn, dtype=torch.float32, device=x2.device)
    if POISON_WORKSPACE:
        ws.fill_(float("nan"))
    if cfg.decomposition == "splitk":
        return _w4a16_splitk_kernel[grid](*args, ws, locks, *sizes, per, parts, **common)
    return _w4a16_streamk_kernel[grid](*args, ws, locks, *sizes, q, r, slots, **common)


def w4a16_matmul(x: torch.Tensor, qw: Int4Weight, decomposition: str = "auto",
                 split_k: int | None = None, deterministic: bool = False, backend: str = "auto",
                 *, config: W4A16Config | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(qw).T for x [..., K] fp16/bf16 -> [..., N] in x's dtype (fp32 accumulation).

    decomposition: "auto" (tuned table of this GPU, else a heuristic), "dp", "splitk", "streamk".
    split_k: number of K-splits (splitk; with "auto" it selects splitk).
    deterministic: ask for bitwise-reproducible results. Every decomposition currently reduces
        partial tiles in a fixed order, so results are reproducible either way; the flag is
        kept so that a faster non-deterministic reduction can be added behind it.
    backend: "auto" (Triton on CUDA tensors or under TRITON_INTERPRET=1, else PyTorch),
             "triton" or "torch".
    config: an explicit W4A16Config (overrides decomposition and split_k); out: result buffer.
    """
    _require(isinstance(qw, Int4Weight), TypeError, f"qw must be a tiny_gemm.Int4Weight, got {type(qw).__name__}")
    _require(isinstance(x, torch.Tensor), TypeError, f"x must be a torch.Tensor, got {type(x).__name__}")
    _require(x.dtype in _MAGIC, TypeError, f"x must be float16 or bfloat16, got {x.dtype}")
    _require(x.dim() >= 1, ValueError, "x must have at least one dimension [..., K]")
    N, K = qw.shape
    _require(x.shape[-1] == K, ValueError,
             f"x.shape[-1] = {x.shape[-1]} does not match qw's in_features K = {K}")
    _require(x.device == qw.device, ValueError,
             f"x is on {x.device} but qw is on {qw.device}; move them to one device")
    _require(decomposition in ("auto",) + DECOMPOSITIONS, ValueError,
             f"decomposition must be one of {('auto',) + DECOMPOSITIONS}, got {decomposition!r}")
    _require(backend in BACKENDS, ValueError, f"backend must be one of {BACKENDS}, got {backend!r}")
    _require(isinstance(deterministic, bool), TypeError, "deterministic must be a bool")
    if split_k is not None:
        _require(isinstance(split_k, int) and not isinstance(split_k, bool), TypeError,
                 f"split_k must be an int or None, got {type(split_k).__name__}")
        _require(split_k >= 1, ValueError, f"split_k must be >= 1, got {split_k}")
        _require(decomposition in ("auto", "splitk"), ValueError,
                 f"split_k applies to decomposition='splitk', not {decomposition!r}")
    _require(config is None or isinstance(config, W4A16Config), TypeError,
             "config must be a tiny_gemm.W4A16Config or None")

    lead = x.shape[:-1]
    M = x.numel() // K
    out = _check_out(out, (*lead, N), x, "x")
    if M == 0:
        return out

    if not _use_triton(backend, x.device):
        out.copy_(w4a16_reference(x, qw, torch.float32).to(x.dtype))
        return out

    # the kernels address the weight and the activations with 32-bit offsets
    span = (qw.packed.shape[0] - 1) * qw.packed.stride(0) + qw.packed.shape[1] * qw.packed.stride(1)
    _require(span < 2**31, ValueError,
             f"qw's packed codes span {span} bytes; the Triton kernels address at most 2^31 - 1 "
             "(quantize it as several weights of fewer rows)")
    _require(M * K < 2**31 and M * N < 2**31, ValueError,
             f"x [{M}, {K}] or the output [{M}, {N}] has 2^31 or more elements; split the batch")
    x2 = x.reshape(M, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    cfg = config or select_config(M, N, K, qw.group_size, x.device, decomposition, split_k)
    _launch(x2, qw, out.view(M, N), cfg)
    return out
