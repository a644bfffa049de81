"""Fused attention: FlashAttention-2 prefill and split-KV (Flash-Decoding) decode, in Triton.

Shapes follow ``torch.nn.functional.scaled_dot_product_attention``: q [B, H, Nq, D], k and v
[B, Hkv, Nk, D]. Grouped-query attention (GQA, MQA) needs no copies: query head h reads kv
head h // (H // Hkv). Head dims 32, 64 and 128, fp16 and bf16, fp32 accumulation.

``fused_attention`` (prefill, or a chunk of new tokens against a KV cache)
    One program per (BLOCK_M query rows, batch x head), grid (cdiv(Nq, BLOCK_M), B * H). The
    program keeps its Q tile in registers and streams K and V in BLOCK_N-key blocks through an
    online softmax (FlashAttention-2): fp32 running row max m and row sum l, the output
    accumulator rescaled by exp2(m_old - m_new) when the max grows, one division by l at the
    end. log2(e) is folded into the softmax scale so the exponentials are exp2 (one MUFU op).
    No [Nq, Nk] tensor exists in memory. The causal mask is aligned bottom-right (query i sees
    keys j <= i + Nk - Nq, as a query chunk appended to a KV cache does), so every query row
    sees at least one key and no row is empty. Key blocks are visited in two stages: blocks
    every row of the tile sees in full, loaded and used without masks, then the few diagonal
    blocks (and the ragged last block) with masks; causal programs skip the key blocks above the
    diagonal altogether.

``decode_attention`` (one new token per sequence against a ragged KV cache)
    One kernel, grid (B * Hkv, num_splits): a program takes all H // Hkv query heads that
    share one kv head (padded to at least 16 rows so that tl.dot runs on tensor cores) over
    one chunk of the cache, so each K/V byte is read once per kv head, not once per query
    head. With one split it writes the output. Otherwise it writes the normalized partial
    output (fp32) and its log-sum-exp (fp32, base 2) to a workspace and takes a ticket from a
    per-(sequence, kv head) counter (zero at rest, shared with w4a16's reduction); the split
    that draws the last ticket combines: out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s -
    max). Splits that start at or after a sequence's length write nothing and take no ticket,
    and the combine reads only the cdiv(len, chunk) splits that hold keys, so empty splits
    cannot leak NaN (the tests fill the workspace with NaN to check). As with w4a16, calls
    that run concurrently on different streams of one device must not share the counters.
    Split count, keys per step, warps, stages and whether each split first asks L2 for its
    first key block (before the length load it would otherwise wait on):
    ``select_decode_config`` (this GPU's tuned table in configs/decode/, written by
    experiments/tune_decode.py, else a heuristic).

Dropout (``fused_attention``, dropout_p > 0), as in FlashAttention: the normalizer uses the
softmax before dropout, kept probabilities are scaled by 1 / (1 - p) (folded into the final
division by l). The keep decision comes from Triton's counter-based Philox4x32-10
(``tl.randint``): the counter of element (b, h, i, j) is its index ((b*H + h)*Nq + i)*Nk + j
in a contiguous [B, H, Nq, Nk] tensor, as an int64 split into two 32-bit counter words (unique
for any B*H*Nq*Nk < 2^63); the 64-bit seed is the key. An element is kept iff
(philox >> 1) >= round(p * 2^31), so it is kept with probability 1 - p to within 2^-32. The
pattern depends on the seed and the shapes only, never on block sizes or the GPU, and
``attention_dropout_mask`` returns it (same @triton.jit helper; a pure PyTorch Philox gives the
same bits where Triton cannot run).

Layouts: inputs are read through their strides (a transposed [B, N, H, D] view needs no copy;
Triton specializes a unit stride on the head dim, so the usual layout gets vector loads).
Outputs are contiguous.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ._checks import check_out as _check_out, interpreting as _interpreting, use_triton as _use_triton
from .quant import _require
from .w4a16 import CONFIG_DIR, _device_info, _last_to_arrive, _tile_locks, gpu_slug

HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
# Flash-Decoding splits hold at least this many keys (one block of the split kernel).
MIN_KEYS_PER_SPLIT = 64
# Tests set this: the decode workspace is then NaN-filled before each launch, so a combine
# that read a split nobody wrote would show in the output.
POISON_WORKSPACE = False


# ------------------------------------------------------------------------------------------
# Device code
# ------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b on tensor cores. Under INTERPRET the operands are upcast (exactly): the
    Triton interpreter (3.6) multiplies bf16 operands as their raw uint16 bit patterns."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _dropout_keep(seed, offsets, keep_threshold):
    """Keep-mask for the elements with int64 Philox counters `offsets`: kept iff the top 31
    bits of the first Philox4x32-10 word are >= keep_threshold = round(p * 2^31)."""
    r = tl.randint(seed, offsets)
    return (r >> 1).to(tl.int32) >= keep_threshold


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                    lo, hi, offs_m, offs_n, Nk, causal_shift, qk_scale,
                    seed, rng_rows, keep_threshold,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                    BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """Online softmax over the key blocks [lo, hi). MASKED: mask keys >= Nk and, if CAUSAL,
    keys j > i + causal_shift; otherwise every key of [lo, hi) is visible to every row."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=cols[None, :] < Nk, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn)
        qk = _dot(q, k, tl.zeros((q.shape[0], BLOCK_N), tl.float32), INTERPRET)
        if MASKED:
            visible = cols[None, :] < Nk
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_shift)
            qk = tl.where(visible, qk, float("-inf"))
        # the first block of every row holds a visible key, so m_ij is finite from there on
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)          # the normalizer sees the un-dropped softmax
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, rng_rows + cols[None, :], keep_threshold), p, 0.0)
        if MASKED:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=cols[:, None] < Nk, other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn)
        acc = _dot(p.to(v.dtype), v, acc, INTERPRET)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed", "keep_threshold"])
def _attn_fwd_kernel(
        # pointers
        q_ptr, k_ptr, v_ptr, out_ptr,
        # sizes; query head h reads kv head h // kv_group
        H, Nq, Nk, kv_group,
        # strides, in elements
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        # softmax scale times log2(e); dropout: Philox key, keep threshold, 1 / (1 - p)
        qk_scale, seed, keep_threshold, dropout_scale,
        # meta-parameters
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, INTERPRET: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // kv_group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < Nq, other=0.0)
    # K is read as a [HEAD_DIM, BLOCK_N] tile (K^T), V as [BLOCK_N, HEAD_DIM]
    k_ptrs = k_ptr + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_ptr + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    rng_rows = (bh.to(tl.int64) * Nq + offs_m[:, None]) * Nk   # Philox counter of (b, h, i, 0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    causal_shift = Nk - Nq
    if CAUSAL:
        # keys 0 .. start_m * BLOCK_M + shift are visible to every row of the tile (and < Nk);
        # keys from start_m * BLOCK_M + BLOCK_M + shift on to none
        n_full = (start_m * BLOCK_M + causal_shift + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(Nk, start_m * BLOCK_M + BLOCK_M + causal_shift)
    else:
        n_full = Nk // BLOCK_N * BLOCK_N
        hi = Nk
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                    0, n_full, offs_m, offs_n, Nk, causal_shift, qk_scale,
                                    seed, rng_rows, keep_threshold,
                                    False, CAUSAL, DROPOUT, BLOCK_N, INTERPRET)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                    n_full, hi, offs_m, offs_n, Nk, causal_shift, qk_scale,
                                    seed, rng_rows, keep_threshold,
                                    True, CAUSAL, DROPOUT, BLOCK_N, INTERPRET)
    if DROPOUT:
        acc = acc * (dropout_scale / l_i)[:, None]
    else:
        acc = acc / l_i[:, None]
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=offs_m[:, None] < Nq)


@triton.jit(do_not_specialize=["seed", "keep_threshold"])
def _dropout_mask_kernel(mask_ptr, Nq, Nk, seed, keep_threshold,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask [B, H, Nq, Nk] that _attn_fwd_kernel applies, grid (m, n, B * H)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets = (tl.program_id(2).to(tl.int64) * Nq + rows[:, None]) * Nk + cols[None, :]
    keep = _dropout_keep(seed, offsets, keep_threshold)
    tl.store(mask_ptr + offsets, keep, mask=(rows[:, None] < Nq) & (cols[None, :] < Nk))


@triton.jit
def _decode_split_kernel(
        # pointers; the workspace holds [B, H, num_splits, HEAD_DIM] outputs and [B, H, num_splits] lse
        q_ptr, k_ptr, v_ptr, seqlens_ptr, part_out_ptr, part_lse_ptr, out_ptr, lock_ptr,
        # sizes; kv head hk serves query heads hk * kv_group .. hk * kv_group + kv_group - 1
        H, Hkv, kv_group, S_max, num_splits, chunk,
        # strides, in elements
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_od,
        # softmax scale times log2(e)
        qk_scale,
        # meta-parameters
        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
        PREFETCH: tl.constexpr, INTERPRET: tl.constexpr):
    """Split `split` of kv head hk of sequence b. With DIRECT (one split) it writes the
    normalized output to out. Otherwise it writes its partial output and log-sum-exp to the
    workspace and takes a ticket; the last split of (b, hk) to arrive combines them all
    (_combine_splits). A second, combine kernel cost 0.4-0.7 us more at B 1..4 on an H200
    (results/nvidia_h200/scratch/decode_ab.txt): its launch is on the critical path.
    PREFETCH: first ask L2 for the split's first key block of K and V, whose addresses do not
    depend on the sequence length, so that their DRAM latency overlaps the length's load (the
    loop's loads wait for it). It has no effect on the result; the interpreter skips it."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    hk = pid % Hkv
    lo = split * chunk
    b64 = b.to(tl.int64)
    if PREFETCH and not INTERPRET:
        LINES: tl.constexpr = (HEAD_DIM * 2 + 127) // 128         # 128-byte lines per 16-bit key
        idx = tl.arange(0, BLOCK_N * LINES)
        key = tl.minimum(lo + idx // LINES, S_max - 1)           # in bounds: chunk may pass S_max
        d = (idx % LINES) * 64
        _prefetch_l2(k_ptr + b64 * stride_kb + hk.to(tl.int64) * stride_kh + key * stride_kn + d * stride_kd)
        _prefetch_l2(v_ptr + b64 * stride_vb + hk.to(tl.int64) * stride_vh + key * stride_vn + d * stride_vd)
    seqlen = tl.minimum(tl.load(seqlens_ptr + b), S_max)    # unchecked lengths stay in bounds
    if lo >= seqlen:        # past the end of this sequence; the combine does not read it
        return
    hi = tl.minimum(lo + chunk, seqlen)

    rows = tl.arange(0, BLOCK_H)
    heads = hk * kv_group + rows
    row_ok = rows < kv_group
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    k_ptrs = k_ptr + b64 * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_ptr + b64 * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, HEAD_DIM), tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_ptrs + start_n * stride_kn, mask=cols[None, :] < hi, other=0.0)
        qk = _dot(q, k, tl.zeros((BLOCK_H, BLOCK_N), tl.float32), INTERPRET)
        qk = tl.where(cols[None, :] < hi, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)     # finite: key lo is in the first block
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=cols[:, None] < hi, other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], INTERPRET)
        m_i = m_ij

    if DIRECT:
        tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        slot = (b64 * H + heads) * num_splits + split
        tl.store(part_out_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], acc / l_i[:, None],
                 mask=row_ok[:, None])
        tl.store(part_lse_ptr + slot, m_i + tl.math.log2(l_i), mask=row_ok)
        # the splits that hold keys take a ticket each (the others returned above); the last
        # one combines (w4a16's ticket protocol)
        n_valid = tl.cdiv(seqlen, chunk)
        if _last_to_arrive(lock_ptr, pid, n_valid):
            _combine_splits(part_out_ptr, part_lse_ptr, out_ptr, b64, hk * kv_group, kv_group, H,
                            num_splits, n_valid, stride_ob, stride_oh, stride_od,
                            HEAD_DIM, BLOCK_G, BLOCK_S)
            tl.store(lock_ptr + pid, 0)


@triton.jit
def _prefetch_l2(ptrs):
    """prefetch.global.L2 of each address (no value; the dummy result is not used)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.b32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _combine_splits(part_out_ptr, part_lse_ptr, out_ptr, b64, h0, n_heads, H, num_splits, n_valid,
                    stride_ob, stride_oh, stride_od,
                    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[b, h0 .. h0 + n_heads) = sum over the n_valid splits of 2^lse_s o_s / sum 2^lse_s,
    BLOCK_S splits of BLOCK_G heads at a time, with a running max."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < n_heads
    base = (b64 * H + h0 + offs_g) * num_splits                              # [G]
    m = tl.full((BLOCK_G,), -1.0e30, tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    for s0 in range(0, n_valid, BLOCK_S):
        s = s0 + offs_s
        ok = g_ok[:, None] & (s[None, :] < n_valid)                          # [G, S]
        slot = base[:, None] + s[None, :]
        lse = tl.load(part_lse_ptr + slot, mask=ok, other=-1.0e30, cache_modifier=".cg")
        o = tl.load(part_out_ptr + slot[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=ok[:, :, None], other=0.0, cache_modifier=".cg")     # [G, S, D]
        m_new = tl.maximum(m, tl.max(lse, 1))
        alpha = tl.math.exp2(m - m_new)
        w = tl.where(ok, tl.math.exp2(lse - m_new[:, None]), 0.0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
        l = l * alpha + tl.sum(w, 1)
        m = m_new
    l = tl.where(g_ok, l, 1.0)
    tl.store(out_ptr + b64 * stride_ob + (h0 + offs_g)[:, None] * stride_oh + offs_d[None, :] * stride_od,
             (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


# ------------------------------------------------------------------------------------------
# Pure PyTorch: references and the Philox generator
# ------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * b) >> 32 and (a * b) mod 2^32 of 32-bit a and b (b held in int64), in 16-bit halves
    so that no int64 product overflows."""
    t_lo = a * (b & 0xFFFF)
    t_hi = a * (b >> 16)
    return (t_hi + (t_lo >> 16)) >> 16, (t_lo + ((t_hi & 0xFFFF) << 16)) & _M32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 (Salmon et al. 2011) on int64 tensors holding 32-bit words, round for round
    as ``tl.philox`` computes it; returns the four output words."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo32(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def _keep_threshold(dropout_p: float) -> int:
    return min(round(dropout_p * 2**31), 2**31 - 1)


def _dropout_mask_torch(B, H, Nq, Nk, dropout_p, seed, device) -> torch.Tensor:
    offsets = torch.arange(B * H * Nq * Nk, dtype=torch.int64, device=device)
    zero = torch.zeros_like(offsets)
    r, _, _, _ = philox4x32(offsets & _M32, offsets >> 32, zero, zero, seed & _M32, seed >> 32)
    return ((r >> 1) >= _keep_threshold(dropout_p)).view(B, H, Nq, Nk)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        dropout_p: float = 0.0, sm_scale: float | None = None,
                        dropout_mask: torch.Tensor | None = None,
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """softmax(q k^T * sm_scale, bottom-right causal mask) with dropout, @ v, computed in
    `dtype` (float64 for tests). dropout_mask: the boolean keep-mask [B, H, Nq, Nk], required
    when dropout_p > 0 (``attention_dropout_mask`` gives the kernel's)."""
    H, Nq, D = q.shape[1], q.shape[2], q.shape[3]
    Nk = k.shape[2]
    group = H // k.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    k = k.to(dtype).repeat_interleave(group, dim=1)
    v = v.to(dtype).repeat_interleave(group, dim=1)
    s = (q.to(dtype) @ k.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(Nq, device=q.device)[:, None]
        j = torch.arange(Nk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (Nk - Nq), float("-inf"))
    p = torch.softmax(s, dim=-1)
    if dropout_p > 0:
        _require(dropout_mask is not None, ValueError, "dropout_mask is required when dropout_p > 0")
        p = p * dropout_mask.to(p.device) / (1.0 - dropout_p)
    return p @ v


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               cache_seqlens: torch.Tensor, sm_scale: float | None = None,
                               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Attention of q [B, H, D] over the first cache_seqlens[b] keys of each sequence, in
    `dtype` (float64 for tests), [B, H, D]."""
    D = q.shape[-1]
    group = q.shape[1] // k_cache.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    k = k_cache.to(dtype).repeat_interleave(group, dim=1)
    v = v_cache.to(dtype).repeat_interleave(group, dim=1)
    s = (k @ q.to(dtype).unsqueeze(-1)).squeeze(-1) * scale                  # [B, H, S_max]
    past_end = torch.arange(k.shape[2], device=q.device)[None, :] >= cache_seqlens.to(q.device)[:, None]
    s = s.masked_fill(past_end[:, None, :], float("-inf"))
    return (torch.softmax(s, dim=-1).unsqueeze(-2) @ v).squeeze(-2)


# ------------------------------------------------------------------------------------------
# Host side: checks, configurations, launchers
# ------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    _require(isinstance(t, torch.Tensor), TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _require(t.dim() == ndim, ValueError, f"{name} must have {ndim} dimensions {layout}, got shape {list(t.shape)}")
    _require(t.dtype in DTYPES, TypeError, f"{name} must be float16 or bfloat16, got {t.dtype}")


def _check_qkv(q, k, v, names: tuple[str, str, str], q_layout: str, kv_layout: str) -> None:
    """Checks shared by prefill and decode: ranks, dtypes, devices, head dims, GQA grouping.
    q has one dimension per comma of q_layout ("[B, H, Nq, D]": 4); k and v have 4."""
    nq, nk, nv = names
    _check_tensor(nq, q, q_layout.count(",") + 1, q_layout)
    _check_tensor(nk, k, 4, kv_layout)
    _check_tensor(nv, v, 4, kv_layout)
    for name, t in ((nk, k), (nv, v)):
        _require(t.dtype == q.dtype, TypeError, f"{name} has dtype {t.dtype} but {nq} has {q.dtype}")
        _require(t.device == q.device, ValueError,
                 f"{name} is on {t.device} but {nq} is on {q.device}; move them to one device")
        _require(t.shape[0] == q.shape[0], ValueError,
                 f"{name} has batch size {t.shape[0]} but {nq} has {q.shape[0]}")
        _require(t.shape[-1] == q.shape[-1], ValueError,
                 f"head dims differ: {nq} has {q.shape[-1]}, {name} has {t.shape[-1]}")
    _require(tuple(v.shape) == tuple(k.shape), ValueError,
             f"{nv} must have {nk}'s shape {list(k.shape)}, got {list(v.shape)}")
    _require(q.shape[-1] in HEAD_DIMS, ValueError,
             f"head dim {q.shape[-1]} of {nq} is not supported; supported: {HEAD_DIMS}")
    H, Hkv = q.shape[1], k.shape[1]
    _require(Hkv >= 1 and H % Hkv == 0, ValueError,
             f"the number of query heads H = {H} ({nq}.shape[1]) must be a multiple of the number "
             f"of kv heads Hkv = {Hkv} ({nk}.shape[1])")


def _check_sm_scale(sm_scale) -> None:
    if sm_scale is not None:
        _require(isinstance(sm_scale, (int, float)) and not isinstance(sm_scale, bool), TypeError,
                 f"sm_scale must be a float or None, got {type(sm_scale).__name__}")
        _require(math.isfinite(sm_scale) and sm_scale > 0, ValueError,
                 f"sm_scale must be a positive finite number, got {sm_scale}")


def _check_dropout(dropout_p, dropout_seed) -> None:
    _require(isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool), TypeError,
             f"dropout_p must be a float, got {type(dropout_p).__name__}")
    _require(0.0 <= dropout_p < 1.0, ValueError, f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_seed is not None:
        _require(isinstance(dropout_seed, int) and not isinstance(dropout_seed, bool), TypeError,
                 f"dropout_seed must be an int or None, got {type(dropout_seed).__name__}")
        _require(0 <= dropout_seed < 2**63, ValueError, f"dropout_seed must be in [0, 2^63), got {dropout_seed}")


def _draw_seed() -> int:
    """A dropout seed from torch's default generator (reproducible under torch.manual_seed)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def _prefill_config(Nq: int, D: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). The GPU values are FlashAttention-2 Triton
    starting points (128 x 64 tiles, 8 warps for D = 128), to be tuned per GPU. The
    interpreter pays per block-iteration and tl.dot accepts 16 x 16: small tiles there
    exercise several query tiles, key blocks and the diagonal at test sizes."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    block_m = 128 if Nq > 64 else 64
    return block_m, 64, 8 if D == 128 and block_m == 128 else 4, 3


def _decode_config(device: torch.device, keys_per_split: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, num_warps, num_stages, prefetch) of the split kernel. The L2 prefetch of the
    first block: tune_decode at f23e03b chose it at every point of its grid with 128 keys per
    split or more on an H100 and at all but one on an H200 (B 16, context 2048, where its
    pick without it was 1% faster than the heuristic), and at none with 64 (batch 1 and 2 at
    context 512, batch 1 at 1024), on both GPUs (results/*/tune_decode_f23e03b.txt). On an
    H200 (H 32, Hkv 8, D 128, B 1..16, context 512..8192; results/nvidia_h200/scratch/decode_sweep.txt) 64-key blocks
    and 4 warps were best or within 2% everywhere. A fourth stage: at 4096 keys and more per
    program it was 3-4% faster on an H200 (B 16 at context 8192, B 8 at 8192 in two splits);
    below that the GPUs disagree (3 stages 1-2% faster at 512..2048 keys on an H100 and at 512
    on an H200, 4 stages 0.8% and 2.4% faster at 1024 and 2048 on an H200), and the rule
    follows the H100 (results/*/ticket_protocol/decode_pf.txt)."""
    if device.type != "cuda":
        return 16, 4, 1, 0
    return 64, 4, 4 if keys_per_split >= 4096 else 3, int(keys_per_split >= 128)


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def decode_num_splits(batch_kv_heads: int, max_seqlen: int, sm_count: int) -> int:
    """Flash-Decoding split count: about one program per SM in all (B * Hkv alone rarely
    fills a GPU at decode batch sizes), but no split shorter than MIN_KEYS_PER_SPLIT. On an
    H200 one wave beat three (the earlier rule) at every point of the decode grid, by up to
    1.24x at B 16 (one split, no combine), and B 1 at context 512 ran fastest with 8 to 16
    splits of 32 to 64 keys (results/nvidia_h200/scratch/decode_sweep.txt)."""
    want = max(1, sm_count // max(batch_kv_heads, 1))
    return max(1, min(want, triton.cdiv(max_seqlen, MIN_KEYS_PER_SPLIT)))


DECODE_CONFIG_DIR = CONFIG_DIR / "decode"


@dataclass(frozen=True)
class DecodeConfig:
    """Launch configuration of ``decode_attention``: num_splits chunks of the cache per
    (sequence, kv head), block_n keys per step of the split kernel, its num_warps and
    num_stages. Splits are whole block_n-key blocks, so the count is reduced to what S_max
    fills. prefetch 1: each split first asks L2 for its first block of keys and values, before
    it reads the sequence length (on a ragged cache, splits past a sequence's end then read a
    block they do not use); 0: it does not."""

    num_splits: int = 1
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    prefetch: int = 0

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            _require(isinstance(v, int) and not isinstance(v, bool), TypeError,
                     f"config.{name} must be an int, got {type(v).__name__}")
        _require(self.num_splits >= 1, ValueError, f"config.num_splits must be >= 1, got {self.num_splits}")
        _require(self.block_n >= 16 and self.block_n & (self.block_n - 1) == 0, ValueError,
                 f"config.block_n must be a power of two >= 16, got {self.block_n}")
        _require(self.num_warps in (1, 2, 4, 8, 16), ValueError,
                 f"config.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        _require(self.num_stages >= 1, ValueError, f"config.num_stages must be >= 1, got {self.num_stages}")
        _require(self.prefetch in (0, 1), ValueError, f"config.prefetch must be 0 or 1, got {self.prefetch}")

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=None)
def load_decode_table(gpu_name: str) -> dict:
    """The tuned decode table of a GPU (configs/decode/<gpu slug>.json, written by
    experiments/tune_decode.py): {(D, kv_group): {(batch_kv_heads, S_max): DecodeConfig}};
    empty if none is shipped."""
    path = DECODE_CONFIG_DIR / f"{gpu_slug(gpu_name)}.json"
    if not path.exists():
        return {}
    table: dict = {}
    for e in json.loads(path.read_text())["entries"]:
        table.setdefault((e["D"], e["kv_group"]), {})[(e["batch_kv_heads"], e["S_max"])] = \
            DecodeConfig(**e["best"])
    return table


def heuristic_decode_config(batch_kv_heads: int, S_max: int, device: torch.device,
                            num_splits: int | None = None) -> DecodeConfig:
    """Fallback where the tuned table has no entry: decode_num_splits (unless num_splits is
    given), then _decode_config for that split length."""
    splits = num_splits or decode_num_splits(batch_kv_heads, S_max, _sm_count(device))
    return DecodeConfig(splits, *_decode_config(device, triton.cdiv(S_max, splits)))


def select_decode_config(batch_kv_heads: int, S_max: int, D: int, kv_group: int,
                         device: torch.device, num_splits: int | None = None) -> DecodeConfig:
    """The configuration decode_attention uses. Without num_splits: the tuned table of this
    GPU, from its entry of the same head dim and query heads per kv head with the smallest
    batch_kv_heads (B * Hkv) >= the call's and, among those, the smallest S_max >= the
    call's (the table is a grid over both). A call outside the grid, or on a GPU without a
    table, gets heuristic_decode_config; so does an explicit num_splits."""
    tuned = tuned_decode_config(batch_kv_heads, S_max, D, kv_group, device) if num_splits is None else None
    return tuned or heuristic_decode_config(batch_kv_heads, S_max, device, num_splits)


def tuned_decode_config(batch_kv_heads: int, S_max: int, D: int, kv_group: int,
                        device: torch.device) -> DecodeConfig | None:
    """The tuned table's config for a call (see select_decode_config), or None."""
    if device.type != "cuda":
        return None
    entries = load_decode_table(_device_info(device)[0]).get((D, kv_group), {})
    fits = [key for key in entries if key[0] >= batch_kv_heads and key[1] >= S_max]
    return entries[min(fits)] if fits else None


# ------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------
def attention_dropout_mask(B: int, H: int, Nq: int, Nk: int, dropout_p: float, dropout_seed: int,
                           device: torch.device | str, backend: str = "auto") -> torch.Tensor:
    """The boolean keep-mask [B, H, Nq, Nk] that ``fused_attention`` applies for dropout_p and
    dropout_seed (True: kept and scaled by 1 / (1 - p)). backend: "auto" (the Triton kernel on
    CUDA or under TRITON_INTERPRET=1, else PyTorch), "triton", "torch"; all give the same bits."""
    for name, n in (("B", B), ("H", H), ("Nq", Nq), ("Nk", Nk)):
        _require(isinstance(n, int) and n >= 0, ValueError, f"{name} must be an int >= 0, got {n!r}")
    _check_dropout(dropout_p, dropout_seed)
    _require(dropout_seed is not None, ValueError, "dropout_seed must be given")
    device = torch.device(device)
    if not _use_triton(backend, device):
        return _dropout_mask_torch(B, H, Nq, Nk, dropout_p, dropout_seed, device)
    mask = torch.empty(B, H, Nq, Nk, dtype=torch.bool, device=device)
    if mask.numel() == 0:
        return mask
    grid = (triton.cdiv(Nq, 64), triton.cdiv(Nk, 64), B * H)
    _dropout_mask_kernel[grid](mask, Nq, Nk, dropout_seed, _keep_threshold(dropout_p),
                               BLOCK_M=64, BLOCK_N=64)
    return mask


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    dropout_p: float = 0.0, sm_scale: float | None = None,
                    dropout_seed: int | None = None, backend: str = "auto", *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * sm_scale) v, FlashAttention-2 style, -> [B, H, Nq, D] in q's dtype.

    q: [B, H, Nq, D]; k, v: [B, Hkv, Nk, D] with H a multiple of Hkv (GQA / MQA) and Nq <= Nk;
        fp16 or bf16; D in (32, 64, 128); any strides.
    causal: mask aligned bottom-right: query i sees keys j <= i + Nk - Nq.
    dropout_p: attention dropout in [0, 1), applied to the softmax before the product with v.
    sm_scale: softmax scale, default 1 / sqrt(D).
    dropout_seed: Philox key of the dropout pattern (see ``attention_dropout_mask``); None
        draws one from torch's default generator.
    backend: "auto" (Triton on CUDA tensors or under TRITON_INTERPRET=1, else PyTorch in
        fp32), "triton" or "torch".
    out: contiguous result buffer.
    """
    _check_qkv(q, k, v, ("q", "k", "v"), "[B, H, Nq, D]", "[B, Hkv, Nk, D]")
    _require(q.shape[2] <= k.shape[2], ValueError,
             f"q has Nq = {q.shape[2]} queries but k has Nk = {k.shape[2]} keys; need Nq <= Nk")
    _require(isinstance(causal, bool), TypeError, f"causal must be a bool, got {type(causal).__name__}")
    _check_dropout(dropout_p, dropout_seed)
    _check_sm_scale(sm_scale)
    use_triton = _use_triton(backend, q.device)
    out = _check_out(out, q.shape, q, "q")
    if out.numel() == 0:
        return out
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    dropout = dropout_p > 0
    if dropout and dropout_seed is None:
        dropout_seed = _draw_seed()

    if not use_triton:
        mask = attention_dropout_mask(B, H, Nq, Nk, dropout_p, dropout_seed, q.device) if dropout else None
        out.copy_(attention_reference(q, k, v, causal, dropout_p, sm_scale, mask, torch.float32))
        return out

    block_m, block_n, num_warps, num_stages = _prefill_config(Nq, D, q.device)
    grid = (triton.cdiv(Nq, block_m), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, out, H, Nq, Nk, H // Hkv,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        sm_scale * LOG2E, dropout_seed if dropout else 0,
        _keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, DROPOUT=dropout,
        INTERPRET=_interpreting(), num_warps=num_warps, num_stages=num_stages)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor, num_splits: int | None = None,
                     sm_scale: float | None = None, backend: str = "auto", *,
                     out: torch.Tensor | None = None, check_seqlens: bool = True,
                     config: DecodeConfig | None = None) -> torch.Tensor:
    """One query token per sequence over a KV cache, split-KV (Flash-Decoding), -> [B, H, D].

    q: [B, H, D]; k_cache, v_cache: [B, Hkv, S_max, D] with H a multiple of Hkv; fp16 or
        bf16; D in (32, 64, 128); any strides.
    cache_seqlens: int32 [B], the number of valid keys of each sequence, 1 <= len <= S_max.
        Checked on the host, which costs a device sync, unless check_seqlens is False or a
        CUDA graph is being captured. Unchecked lengths are clamped to S_max in the kernels
        (no out-of-bounds reads); a length < 1 then gives NaN.
    num_splits: chunks of the cache per (sequence, kv head); None: the tuned table of this
        GPU, else ``decode_num_splits`` (see ``select_decode_config``). Splits are whole
        BLOCK_N-key blocks, so the count is reduced to what S_max fills.
    sm_scale: softmax scale, default 1 / sqrt(D).
    backend: "auto" (Triton on CUDA tensors or under TRITON_INTERPRET=1, else PyTorch in
        fp32), "triton" or "torch".
    out: contiguous result buffer.
    check_seqlens: False skips the host check of cache_seqlens and its sync (decode loops,
        benchmarks).
    config: an explicit DecodeConfig (overrides num_splits and the tuned table).
    """
    _check_qkv(q, k_cache, v_cache, ("q", "k_cache", "v_cache"), "[B, H, D]", "[B, Hkv, S_max, D]")
    _require(isinstance(cache_seqlens, torch.Tensor), TypeError,
             f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    _require(cache_seqlens.dtype == torch.int32, TypeError,
             f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    B = q.shape[0]
    _require(tuple(cache_seqlens.shape) == (B,), ValueError,
             f"cache_seqlens must have shape [B] = [{B}], got {list(cache_seqlens.shape)}")
    _require(cache_seqlens.device == q.device, ValueError,
             f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    if num_splits is not None:
        _require(isinstance(num_splits, int) and not isinstance(num_splits, bool), TypeError,
                 f"num_splits must be an int or None, got {type(num_splits).__name__}")
        _require(num_splits >= 1, ValueError, f"num_splits must be >= 1, got {num_splits}")
    _check_sm_scale(sm_scale)
    _require(isinstance(check_seqlens, bool), TypeError, "check_seqlens must be a bool")
    _require(config is None or isinstance(config, DecodeConfig), TypeError,
             f"config must be a tiny_gemm.DecodeConfig or None, got {type(config).__name__}")
    use_triton = _use_triton(backend, q.device)
    out = _check_out(out, q.shape, q, "q")
    H, D = q.shape[1], q.shape[2]
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    if check_seqlens and B > 0 and not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
        _require(lo >= 1 and hi <= S_max, ValueError,
                 f"cache_seqlens must lie in [1, S_max = {S_max}], got values in [{lo}, {hi}]")
    if out.numel() == 0:
        return out
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)

    if not use_triton:
        out.copy_(decode_attention_reference(q, k_cache, v_cache, cache_seqlens, sm_scale, torch.float32))
        return out

    kv_group = H // Hkv
    cfg = config or select_decode_config(B * Hkv, S_max, D, kv_group, q.device, num_splits)
    block_n = cfg.block_n
    chunk = triton.cdiv(triton.cdiv(S_max, cfg.num_splits), block_n) * block_n
    splits = triton.cdiv(S_max, chunk)        # after rounding to whole blocks, none is empty at S_max
    direct = splits == 1       # one split per head: the split kernel writes out itself
    part_out = torch.empty(0 if direct else B * H * splits * D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(0 if direct else B * H * splits, dtype=torch.float32, device=q.device)
    if POISON_WORKSPACE:
        part_out.fill_(float("nan"))
        part_lse.fill_(float("nan"))
    locks = part_lse if direct else _tile_locks(q.device, B * Hkv)   # zero at rest
    _decode_split_kernel[(B * Hkv, splits)](
        q, k_cache, v_cache, cache_seqlens, part_out, part_lse, out, locks,
        H, Hkv, kv_group, S_max, splits, chunk,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        sm_scale * LOG2E,
        HEAD_DIM=D, BLOCK_H=max(16, triton.next_power_of_2(kv_group)), BLOCK_N=block_n,
        DIRECT=direct, BLOCK_G=triton.next_power_of_2(kv_group), PREFETCH=cfg.prefetch,
        BLOCK_S=min(triton.next_power_of_2(splits), max(1, 8192 // (triton.next_power_of_2(kv_group) * D))),
        INTERPRET=_interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


# ------------------------------------------------------------------------------------------
# torch.library ops (torch.compile, CUDA graphs)
# ------------------------------------------------------------------------------------------
@torch.library.custom_op("tiny_gemm::fused_attention", mutates_args=())
def _fused_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        dropout_p: float = 0.0, sm_scale: float = 0.0,
                        dropout_seed: int = -1) -> torch.Tensor:
    """fused_attention as a pure function: sm_scale = 0.0 means 1 / sqrt(D); dropout_p > 0
    needs an explicit dropout_seed >= 0 (-1: none)."""
    _require(dropout_p == 0 or dropout_seed >= 0, ValueError,
             "torch.ops.tiny_gemm.fused_attention with dropout_p > 0 needs dropout_seed >= 0 "
             "(the op is a pure function; fused_attention draws one from torch's generator)")
    return fused_attention(q, k, v, causal, dropout_p, sm_scale or None,
                           dropout_seed if dropout_seed >= 0 else None)


@_fused_attention_op.register_fake
def _(q, k, v, causal=True, dropout_p=0.0, sm_scale=0.0, dropout_seed=-1):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "q and k must be [B, H, N, D]")
    torch._check(q.shape[-1] == k.shape[-1], lambda: "q and k head dims differ")
    return q.new_empty(q.shape)


@torch.library.custom_op("tiny_gemm::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_seqlens: torch.Tensor, num_splits: int = 0,
                         sm_scale: float = 0.0) -> torch.Tensor:
    """decode_attention; num_splits = 0 means the heuristic, sm_scale = 0.0 means 1 / sqrt(D)."""
    return decode_attention(q, k_cache, v_cache, cache_seqlens, num_splits or None, sm_scale or None)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, num_splits=0, sm_scale=0.0):
    torch._check(q.dim() == 3 and k_cache.dim() == 4, lambda: "q must be [B, H, D], k_cache [B, Hkv, S_max, D]")
    torch._check(q.shape[-1] == k_cache.shape[-1], lambda: "q and k_cache head dims differ")
    return q.new_empty(q.shape)
