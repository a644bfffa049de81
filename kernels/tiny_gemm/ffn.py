"""Fused transformer FFN for small-batch decode (M = 1..16 activation rows).

    y = act(x @ w1 + b1) @ w2 + b2                       fused_ffn        (GPT-2, BERT: gelu)
    y = (act(x @ w_gate) * (x @ w_up)) @ w_down          fused_gated_ffn  (Llama SwiGLU: silu)

Dense weights are [in, out] tensors (``x @ w`` layout: ``nn.Linear.weight.t()`` works as it
is, any strides); an ``Int4Weight`` keeps its own [out, in] nn.Linear layout. Activations are
fp16 or bf16 and every GEMM accumulates in fp32.

At decode sizes the FFN reads its weights once and does little else, so what fusion can save
is the launches and the round trip of the [M, F] intermediate h through memory. Which
decomposition wins is a measurement, not an argument, so the alternatives are all kept and
selected by ``fusion``:

* ``"none"``      three steps: GEMM (torch.matmul), a Triton elementwise kernel for bias,
                  activation (and gate * up), GEMM (torch.matmul). The baseline.
* ``"epilogue"``  a Triton GEMM with the bias and activation in its epilogue writes h; for the
                  gated block gate and up are two accumulators of one kernel that share every
                  load of x. A second Triton GEMM (with b2 in its epilogue) reads h.
* ``"full"``      one kernel. Program (f, m) owns the F-block f of the rows of M-tile m: it
                  computes its slice of h like "epilogue" does, keeps it in registers, and
                  multiplies it by w2[f-block, :] one output tile at a time. That is a split-K
                  over F, reduced deterministically with the ticket scheme of w4a16.py
                  (``_reduce_partial``): each program writes an fp32 partial per output tile to
                  its own slot and the last to arrive sums the slots in F order, so the result
                  is bitwise reproducible. The price is the partial traffic: cdiv(F, BLOCK_F)
                  slots of [16, D] fp32 per output written and read once, 2 x 112 x 16 x 4096 x
                  4 B = 59 MB for Llama-3-8B at BLOCK_F = 128, against 352 MB of fp16 weights.
                  The ticket counters are w4a16's (``_tile_locks``, zero at rest), so as for
                  w4a16_matmul, calls on different streams of one device must not overlap.
* ``"auto"``      "none", the fastest by measurement: on an H200 at M = 1..16 (Llama-3-8B
                  SwiGLU, results/nvidia_h200/ffn_fusion.csv) "epilogue" took 1.6x and "full"
                  12x its time. cuBLAS streams the fp16 weights near the copy bandwidth,
                  and neither Triton GEMM here does yet; "full" also reduces its F-split
                  partials through memory.

In every variant h is rounded to the activation dtype before the second GEMM (the dtype the
tensor cores take); "none" also rounds x @ w1 (and x @ w_up) before the activation.

Any weight may be an ``Int4Weight``, dense ones mixed in. Such calls take ``_ffn_int4``, the
three-step pipeline with ``w4a16_matmul`` for the INT4 GEMMs. Gate and up given as the two
parts of one weight (``Int4Weight.cat([w_gate, w_up]).split([F, F])``, done once at load
time) are read by one GEMM of N = 2F, the activation reading its two halves.

The ops ``torch.ops.tiny_gemm.fused_ffn`` and ``torch.ops.tiny_gemm.fused_gated_ffn`` (dense
weights, fusion "auto") are registered on import, for torch.compile and CUDA graphs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as tnf
import triton
import triton.language as tl

from . import w4a16 as _w4a16
from ._checks import BACKENDS, check_out as _check_out, interpreting as _interpreting, use_triton as _use_triton
from .quant import Int4Weight, _require, dequantize_float, joined_rows
from .w4a16 import _reduce_partial, _tile_locks, w4a16_matmul

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
FUSIONS = ("auto", "none", "epilogue", "full")
DTYPES = (torch.float16, torch.bfloat16)

Weight = torch.Tensor | Int4Weight   # a dense [in, out] tensor or an INT4 [out, in] one


# ------------------------------------------------------------------------------------------
# Device code
# ------------------------------------------------------------------------------------------
@triton.jit
def _activate(v, ACT: tl.constexpr):
    """act(v) elementwise in fp32. gelu_tanh uses 0.5 (1 + tanh(u)) = sigmoid(2u), which
    needs only exp: Triton 3.6's tl.math has no tanh."""
    if ACT == "gelu":
        y = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        y = v / (1.0 + tl.exp(-2.0 * u))
    elif ACT == "relu":
        y = tl.maximum(v, 0.0)
    else:   # silu
        y = v / (1.0 + tl.exp(-v))
    return y


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b in fp32. Under INTERPRET the operands are upcast (exactly): the Triton
    interpreter (3.6) multiplies bf16 operands as their raw uint16 bit patterns."""
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def _up_tile(x_ptr, w1_ptr, w3_ptr, b1_ptr, pid_m, pid_f, M, D, F,
             stride_xm, stride_xd, stride_w1d, stride_w1f, stride_w3d, stride_w3f,
             ACT: tl.constexpr, GATED: tl.constexpr, HAS_B1: tl.constexpr, INTERPRET: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[M-tile pid_m, F-block pid_f] in fp32: act(x @ w1 + b1), times x @ w3 when GATED.
    Both GEMMs share every load of x (two accumulators, one pass over D). Columns beyond F
    come out 0 (zero weights and bias, act(0) = 0); rows beyond M are garbage, never stored."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_f = offs_f < F
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xd
    w1_ptrs = w1_ptr + offs_k[:, None] * stride_w1d + offs_f[None, :] * stride_w1f
    w3_ptrs = w3_ptr + offs_k[:, None] * stride_w3d + offs_f[None, :] * stride_w3f
    acc1 = tl.zeros((BLOCK_M, BLOCK_F), tl.float32)
    if GATED:
        acc3 = tl.zeros((BLOCK_M, BLOCK_F), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask_k = offs_k < D - k0
        x = tl.load(x_ptrs + k0 * stride_xd, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_k[:, None] & mask_f[None, :]
        acc1 = _dot(x, tl.load(w1_ptrs + k0 * stride_w1d, mask=w_mask, other=0.0), acc1, INTERPRET)
        if GATED:
            acc3 = _dot(x, tl.load(w3_ptrs + k0 * stride_w3d, mask=w_mask, other=0.0), acc3, INTERPRET)
    if HAS_B1:
        acc1 += tl.load(b1_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
    h = _activate(acc1, ACT)
    if GATED:
        h = h * acc3
    return h


@triton.jit(do_not_specialize=["M"])
def _ffn_up_kernel(
        # pointers (w3_ptr: the up projection when GATED; h_ptr: the [M, F] output)
        x_ptr, w1_ptr, w3_ptr, b1_ptr, h_ptr,
        # sizes
        M, D, F,
        # strides (h is contiguous)
        stride_xm, stride_xd, stride_w1d, stride_w1f, stride_w3d, stride_w3f,
        # meta-parameters
        ACT: tl.constexpr, GATED: tl.constexpr, HAS_B1: tl.constexpr, INTERPRET: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
    """fusion="epilogue", first GEMM: h = act(x @ w1 + b1) (* x @ w3), rounded to x's dtype."""
    pid_f = tl.program_id(0)
    pid_m = tl.program_id(1)
    h = _up_tile(x_ptr, w1_ptr, w3_ptr, b1_ptr, pid_m, pid_f, M, D, F,
                 stride_xm, stride_xd, stride_w1d, stride_w1f, stride_w3d, stride_w3f,
                 ACT, GATED, HAS_B1, INTERPRET, BLOCK_M, BLOCK_F, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    tl.store(h_ptr + offs_m[:, None] * F + offs_f[None, :], h.to(h_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_f[None, :] < F))


@triton.jit(do_not_specialize=["M"])
def _linear_kernel(
        # pointers
        a_ptr, w_ptr, bias_ptr, out_ptr,
        # sizes: out[M, N] = a[M, K] @ w[K, N] + bias[N]
        M, N, K,
        # strides (a is contiguous: it is the h of _ffn_up_kernel)
        stride_wk, stride_wn, stride_om,
        # meta-parameters
        HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fusion="epilogue", second GEMM. Axis 0 runs over N so that the programs that share an
    M-tile of a are launched together; at decode sizes there is one M-tile."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + k0 * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(a, w, acc, INTERPRET)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M"])
def _ffn_full_kernel(
        # pointers (ws_ptr: fp32 partial slots; lock_ptr: int32 ticket counters, zero at rest)
        x_ptr, w1_ptr, w3_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, ws_ptr, lock_ptr,
        # sizes
        M, D, F,
        # strides (out is contiguous)
        stride_xm, stride_xd, stride_w1d, stride_w1f, stride_w3d, stride_w3f,
        stride_w2f, stride_w2n, stride_om,
        # meta-parameters
        ACT: tl.constexpr, GATED: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
        INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """fusion="full": program (f, m) computes h for F-block f and M-tile m, then contributes
    h @ w2[f-block, :] to every output tile of row-tile m as partial f of cdiv(F, BLOCK_F)."""
    pid_f = tl.program_id(0)
    pid_m = tl.program_id(1)
    n_parts = tl.num_programs(0)
    h = _up_tile(x_ptr, w1_ptr, w3_ptr, b1_ptr, pid_m, pid_f, M, D, F,
                 stride_xm, stride_xd, stride_w1d, stride_w1f, stride_w3d, stride_w3f,
                 ACT, GATED, HAS_B1, INTERPRET, BLOCK_M, BLOCK_F, BLOCK_K)
    h = h.to(x_ptr.dtype.element_ty)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    n_tiles = tl.cdiv(D, BLOCK_N)
    for pid_n in range(0, n_tiles):
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < D
        w2 = tl.load(w2_ptr + offs_f[:, None] * stride_w2f + offs_n[None, :] * stride_w2n,
                     mask=mask_f[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(h, w2, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), INTERPRET)
        if HAS_B2:   # added once, by partial 0
            acc += tl.load(b2_ptr + offs_n, mask=mask_n & (pid_f == 0), other=0.0).to(tl.float32)[None, :]
        _reduce_partial(acc, pid_m * n_tiles + pid_n, pid_f, n_parts, pid_m, pid_n, out_ptr,
                        ws_ptr, lock_ptr, M, D, stride_om, n_parts,
                        BLOCK_M, BLOCK_N)


@triton.jit
def _act_kernel(g_ptr, u_ptr, b_ptr, h_ptr, F, stride_g, stride_u, stride_h,
                ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK: tl.constexpr):
    """Three-step path: h = act(g + b) (* u) for row pid(0) of [M, F] buffers with
    unit column stride (h may be g; g and u may be the two halves of one [M, 2F] GEMM output)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        g += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = _activate(g, ACT)
    if GATED:
        h = h * tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * stride_h + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# Host code
# ------------------------------------------------------------------------------------------
def _blocks(M: int, device: torch.device) -> dict:
    """Tile sizes: placeholders until tuned on a GPU. The interpreter pays per program and
    per tile-iteration, so it gets small tiles that still exercise several blocks of
    everything at test sizes."""
    if device.type != "cuda":
        return dict(BLOCK_M=16 if M <= 16 else 32, BLOCK_F=32, BLOCK_K=32, BLOCK_N=32, num_warps=4)
    return dict(BLOCK_M=16 if M <= 16 else 64, BLOCK_F=128, BLOCK_K=64, BLOCK_N=64, num_warps=4)


def _in_features(w: Weight) -> int:
    return w.in_features if isinstance(w, Int4Weight) else w.shape[0]


def _out_features(w: Weight) -> int:
    return w.out_features if isinstance(w, Int4Weight) else w.shape[1]


def _act_launch(g: torch.Tensor, u: torch.Tensor | None, bias: torch.Tensor | None,
                activation: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """h = act(g + bias) (* u) into out (default: in place of g); g, u, out are [M, F] with
    unit column stride."""
    h = g if out is None else out
    u_or_g = u if u is not None else g      # a valid pointer where GATED is off
    M, F = g.shape
    BLOCK = 1024
    _act_kernel[(M, triton.cdiv(F, BLOCK))](
        g, u_or_g, bias if bias is not None else g, h, F, g.stride(0), u_or_g.stride(0), h.stride(0),
        ACT=activation, GATED=u is not None, HAS_BIAS=bias is not None, BLOCK=BLOCK)
    return h


def _matmul(a: torch.Tensor, w: Weight, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out = a @ w (+ bias): torch for a dense [in, out] weight, w4a16_matmul for an Int4Weight."""
    if isinstance(w, Int4Weight):
        w4a16_matmul(a, w, out=out)
        if bias is not None:
            out.add_(bias)
    elif bias is None:
        torch.mm(a, w, out=out)
    else:
        torch.addmm(bias, a, w, out=out)
    return out


def _ffn_three_steps(x2, w1, b1, w3, w2, b2, activation, out2):
    """fusion="none": GEMM(s), the Triton activation kernel, GEMM."""
    M, F = x2.shape[0], _out_features(w1)
    g = _matmul(x2, w1, x2.new_empty(M, F))
    u = _matmul(x2, w3, x2.new_empty(M, F)) if w3 is not None else None
    _matmul(_act_launch(g, u, b1, activation), w2, out2, b2)


def _ffn_int4(x2, w1, b1, w3, w2, b2, activation, out2, join: bool = True):
    """The FFN when any weight is an Int4Weight (dense weights may be mixed in): the
    three-step pipeline, its INT4 GEMMs by w4a16_matmul. When gate and up are the two parts
    of one weight (Int4Weight.cat([w_gate, w_up]).split([F, F])) and join is set (fusion
    "auto"), one GEMM of N = 2F reads both: one launch, and a wider N for the decomposition
    to spread."""
    both = join and isinstance(w1, Int4Weight) and isinstance(w3, Int4Weight)
    gate_up = joined_rows(w1, w3) if both else None
    if gate_up is None:
        _ffn_three_steps(x2, w1, b1, w3, w2, b2, activation, out2)
        return
    M, F = x2.shape[0], w1.out_features
    gu = _matmul(x2, gate_up, x2.new_empty(M, 2 * F))
    h = _act_launch(gu[:, :F], gu[:, F:], b1, activation, out=x2.new_empty(M, F))
    _matmul(h, w2, out2, b2)


def _ffn_epilogue(x2, w1, b1, w3, w2, b2, activation, out2):
    """fusion="epilogue": one Triton GEMM with bias + activation (+ gate * up) in its epilogue
    writes h [M, F]; a second Triton GEMM with b2 in its epilogue writes the output."""
    M, D = x2.shape
    F, N = w2.shape
    bl = _blocks(M, x2.device)
    w3_ = w1 if w3 is None else w3    # w3_, b1_, b2_: placeholders, unread when absent
    b1_ = w1 if b1 is None else b1
    b2_ = w2 if b2 is None else b2
    h = x2.new_empty(M, F)
    _ffn_up_kernel[(triton.cdiv(F, bl["BLOCK_F"]), triton.cdiv(M, bl["BLOCK_M"]))](
        x2, w1, w3_, b1_, h, M, D, F, *x2.stride(), *w1.stride(), *w3_.stride(),
        ACT=activation, GATED=w3 is not None, HAS_B1=b1 is not None, INTERPRET=_interpreting(),
        BLOCK_M=bl["BLOCK_M"], BLOCK_F=bl["BLOCK_F"], BLOCK_K=bl["BLOCK_K"], num_warps=bl["num_warps"])
    _linear_kernel[(triton.cdiv(N, bl["BLOCK_N"]), triton.cdiv(M, bl["BLOCK_M"]))](
        h, w2, b2_, out2, M, N, F, *w2.stride(), out2.stride(0),
        HAS_BIAS=b2 is not None, INTERPRET=_interpreting(),
        BLOCK_M=bl["BLOCK_M"], BLOCK_N=bl["BLOCK_N"], BLOCK_K=bl["BLOCK_K"], num_warps=bl["num_warps"])


def _ffn_full(x2, w1, b1, w3, w2, b2, activation, out2):
    """fusion="full": the whole FFN in one kernel, F split over programs; see the module docstring."""
    M, D = x2.shape
    F = w2.shape[0]
    bl = _blocks(M, x2.device)
    parts = triton.cdiv(F, bl["BLOCK_F"])
    m_tiles = triton.cdiv(M, bl["BLOCK_M"])
    tiles = m_tiles * triton.cdiv(D, bl["BLOCK_N"])
    ws = torch.empty(tiles * parts * bl["BLOCK_M"] * bl["BLOCK_N"], dtype=torch.float32, device=x2.device)
    if _w4a16.POISON_WORKSPACE:   # tests: a slot read before it is written shows as NaN
        ws.fill_(float("nan"))
    w3_ = w1 if w3 is None else w3    # w3_, b1_, b2_: placeholders, unread when absent
    b1_ = w1 if b1 is None else b1
    b2_ = w2 if b2 is None else b2
    _ffn_full_kernel[(parts, m_tiles)](
        x2, w1, w3_, b1_, w2, b2_, out2, ws, _tile_locks(x2.device, tiles),
        M, D, F, *x2.stride(), *w1.stride(), *w3_.stride(), *w2.stride(), out2.stride(0),
        ACT=activation, GATED=w3 is not None, HAS_B1=b1 is not None, HAS_B2=b2 is not None,
        INTERPRET=_interpreting(), BLOCK_M=bl["BLOCK_M"], BLOCK_F=bl["BLOCK_F"],
        BLOCK_K=bl["BLOCK_K"], BLOCK_N=bl["BLOCK_N"], num_warps=bl["num_warps"])


_DENSE_PATHS = {"none": _ffn_three_steps, "epilogue": _ffn_epilogue, "full": _ffn_full}


def _check_weight(w, name: str, x: torch.Tensor) -> None:
    _require(isinstance(w, (torch.Tensor, Int4Weight)), TypeError,
             f"{name} must be a torch.Tensor or a tiny_gemm.Int4Weight, got {type(w).__name__}")
    if isinstance(w, torch.Tensor):
        _require(w.dim() == 2, ValueError, f"{name} must be 2-D [in, out], got shape {list(w.shape)}")
        _require(w.dtype == x.dtype, TypeError, f"{name} has dtype {w.dtype}, x has {x.dtype}")
    _require(w.device == x.device, ValueError, f"{name} is on {w.device} but x is on {x.device}")


def _check_bias(b, name: str, length: int, x: torch.Tensor) -> None:
    if b is None:
        return
    _require(isinstance(b, torch.Tensor), TypeError,
             f"{name} must be a torch.Tensor or None, got {type(b).__name__}")
    _require(b.dim() == 1 and b.shape[0] == length, ValueError,
             f"{name} must have shape [{length}], got {list(b.shape)}")
    _require(b.dtype == x.dtype, TypeError, f"{name} has dtype {b.dtype}, x has {x.dtype}")
    _require(b.device == x.device, ValueError, f"{name} is on {b.device} but x is on {x.device}")


def _ffn(x, w1, b1, w3, w2, b2, activation, backend, fusion, out, names):
    """Validate, then dispatch fused_ffn (w3 None) and fused_gated_ffn (b1, b2 None).
    names: the caller's argument names of (w1, b1, w3, w2, b2)."""
    n_w1, n_b1, n_w3, n_w2, n_b2 = names
    _require(isinstance(x, torch.Tensor), TypeError, f"x must be a torch.Tensor, got {type(x).__name__}")
    _require(x.dtype in DTYPES, TypeError, f"x must be float16 or bfloat16, got {x.dtype}")
    _require(x.dim() >= 1, ValueError, "x must have at least one dimension [..., D]")
    _require(activation in ACTIVATIONS, ValueError,
             f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _require(fusion in FUSIONS, ValueError, f"fusion must be one of {FUSIONS}, got {fusion!r}")
    _require(backend in BACKENDS, ValueError, f"backend must be one of {BACKENDS}, got {backend!r}")
    weights = [(w1, n_w1), (w2, n_w2)] + ([(w3, n_w3)] if w3 is not None else [])
    for w, name in weights:
        _check_weight(w, name, x)
    D = x.shape[-1]
    F = _out_features(w1)
    _require(_in_features(w1) == D, ValueError,
             f"{n_w1} has {_in_features(w1)} input features but x.shape[-1] = {D}")
    if w3 is not None:
        _require((_in_features(w3), _out_features(w3)) == (D, F), ValueError,
                 f"{n_w3} must map {D} -> {F} features like {n_w1}, got "
                 f"{_in_features(w3)} -> {_out_features(w3)}")
    _require(_in_features(w2) == F, ValueError,
             f"{n_w2} has {_in_features(w2)} input features but {n_w1} has {F} output features")
    _require(_out_features(w2) == D, ValueError,
             f"{n_w2} has {_out_features(w2)} output features but x.shape[-1] = {D}")
    _check_bias(b1, n_b1, F, x)
    _check_bias(b2, n_b2, D, x)
    int4 = any(isinstance(w, Int4Weight) for w, _ in weights)
    _require(not int4 or fusion in ("auto", "none"), ValueError,
             f"fusion={fusion!r} needs dense weights; with an Int4Weight use 'auto' or 'none'")
    out = _check_out(out, x.shape, x, "x")
    M = x.numel() // D if D else 0
    if M == 0:
        return out

    if not _use_triton(backend, x.device):
        return out.copy_(_reference(x, w1, b1, w3, w2, b2, activation, torch.float32))
    x2 = x.reshape(M, D)
    out2 = out.view(M, D)
    if int4:
        _ffn_int4(x2, w1, b1, w3, w2, b2, activation, out2, join=fusion == "auto")
    else:
        if fusion == "auto":
            fusion = "none"
        _DENSE_PATHS[fusion](x2, w1, b1, w3, w2, b2, activation, out2)
    return out


def fused_ffn(x: torch.Tensor, w1: Weight, b1: torch.Tensor | None, w2: Weight,
              b2: torch.Tensor | None, activation: str = "gelu", backend: str = "auto", *,
              fusion: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """y = act(x @ w1 + b1) @ w2 + b2 for x [..., D] fp16/bf16 -> [..., D] in x's dtype.

    w1: [D, F] and w2: [F, D] dense tensors in x's dtype ([in, out], any strides), or
        Int4Weight of shape (F, D) and (D, F) (nn.Linear layout; its scales may be in any
        float dtype, as for w4a16_matmul); mixing is allowed.
    b1: [F] or None; b2: [D] or None, in x's dtype.
    activation: "gelu" (exact, erf), "gelu_tanh", "relu" or "silu".
    backend: "auto" (Triton on CUDA tensors or under TRITON_INTERPRET=1, else PyTorch),
        "triton" or "torch" (an fp32 PyTorch computation).
    fusion: "auto", "none", "epilogue" or "full" (see the module docstring); with an
        Int4Weight only "auto" and "none", which take the INT4 path.
    out: result buffer, contiguous, of x's shape and dtype.
    """
    return _ffn(x, w1, b1, None, w2, b2, activation, backend, fusion, out,
                ("w1", "b1", None, "w2", "b2"))


def fused_gated_ffn(x: torch.Tensor, w_gate: Weight, w_up: Weight, w_down: Weight,
                    activation: str = "silu", backend: str = "auto", *, fusion: str = "auto",
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """y = (act(x @ w_gate) * (x @ w_up)) @ w_down, the Llama SwiGLU block with activation="silu".

    w_gate, w_up: [D, F]; w_down: [F, D]; dense [in, out] tensors in x's dtype or Int4Weight
    (nn.Linear layout), mixing allowed. In the fused variants gate and up are two accumulators
    of one kernel that share the loads of x. INT4 gate and up that are the two parts of one
    weight, ``Int4Weight.cat([w_gate, w_up]).split([F, F])``, are read by one GEMM of N = 2F
    under fusion "auto" ("none" keeps two). Other arguments as for fused_ffn.
    """
    return _ffn(x, w_gate, None, w_up, w_down, None, activation, backend, fusion, out,
                ("w_gate", None, "w_up", "w_down", None))


# ------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------
_TORCH_ACT = {
    "gelu": tnf.gelu,
    "gelu_tanh": lambda t: tnf.gelu(t, approximate="tanh"),
    "relu": tnf.relu,
    "silu": tnf.silu,
}


def _dense(w: Weight, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A weight as a dense [in, out] tensor in dtype."""
    if isinstance(w, Int4Weight):
        return dequantize_float(w, dtype).to(device).t()
    return w.to(dtype)


def _reference(x, w1, b1, w3, w2, b2, activation, dtype):
    h = x.to(dtype) @ _dense(w1, dtype, x.device)
    if b1 is not None:
        h = h + b1.to(dtype)
    h = _TORCH_ACT[activation](h)
    if w3 is not None:
        h = h * (x.to(dtype) @ _dense(w3, dtype, x.device))
    y = h @ _dense(w2, dtype, x.device)
    return y + b2.to(dtype) if b2 is not None else y


def ffn_reference(x: torch.Tensor, w1: Weight, b1: torch.Tensor | None, w2: Weight,
                  b2: torch.Tensor | None, activation: str = "gelu",
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """fused_ffn computed in `dtype` (float64 for tests) with PyTorch, Int4Weight dequantized."""
    return _reference(x, w1, b1, None, w2, b2, activation, dtype)


def gated_ffn_reference(x: torch.Tensor, w_gate: Weight, w_up: Weight, w_down: Weight,
                        activation: str = "silu", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """fused_gated_ffn computed in `dtype` (float64 for tests) with PyTorch, Int4Weight dequantized."""
    return _reference(x, w_gate, None, w_up, w_down, None, activation, dtype)


# ------------------------------------------------------------------------------------------
# torch.library ops (dense weights, fusion "auto")
# ------------------------------------------------------------------------------------------
@torch.library.custom_op("tiny_gemm::fused_ffn", mutates_args=())
def _fused_ffn_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                  b2: torch.Tensor | None, activation: str) -> torch.Tensor:
    return fused_ffn(x, w1, b1, w2, b2, activation)


@_fused_ffn_op.register_fake
def _(x, w1, b1, w2, b2, activation):
    torch._check(x.shape[-1] == w1.shape[0], lambda: "x.shape[-1] must equal w1.shape[0]")
    torch._check(w1.shape[1] == w2.shape[0], lambda: "w1.shape[1] must equal w2.shape[0]")
    torch._check(w2.shape[1] == x.shape[-1], lambda: "w2.shape[1] must equal x.shape[-1]")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("tiny_gemm::fused_gated_ffn", mutates_args=())
def _fused_gated_ffn_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                        w_down: torch.Tensor, activation: str) -> torch.Tensor:
    return fused_gated_ffn(x, w_gate, w_up, w_down, activation)


@_fused_gated_ffn_op.register_fake
def _(x, w_gate, w_up, w_down, activation):
    torch._check(x.shape[-1] == w_gate.shape[0], lambda: "x.shape[-1] must equal w_gate.shape[0]")
    torch._check(w_up.shape == w_gate.shape, lambda: "w_up must have w_gate's shape")
    torch._check(w_gate.shape[1] == w_down.shape[0], lambda: "w_gate.shape[1] must equal w_down.shape[0]")
    torch._check(w_down.shape[1] == x.shape[-1], lambda: "w_down.shape[1] must equal x.shape[-1]")
    return torch.empty_like(x, memory_format=torch.contiguous_format)
