"""fused_ffn and fused_gated_ffn against float64 references: every fusion variant, activation
and dtype, odd shapes beside powers of two, biases present and absent, INT4 and mixed weights,
poisoned outputs, bad input, the torch.library ops (opcheck, torch.compile). Without a GPU the
Triton kernels run under the interpreter, so the shapes are small; the GPU adds Llama-3-8B.

Tolerance: a multiple of conftest's GEMM tolerance TOL[dtype], which covers one rounding (of
the output). The FFN also rounds h to the activation dtype before the second GEMM (every
variant does: tensor cores take fp16/bf16), and the three-step path rounds x @ w1 (and x @
w_up) before the activation: 2 x TOL for dense weights. The INT4 path is three-step with
w4a16_matmul, whose bf16 outputs, like every fp32 -> bf16 conversion of the Triton 3.6
interpreter, are truncated rather than rounded to nearest: twice the error and biased toward
zero, so the roundings of g, u, h and y add up coherently: 3 x TOL there. Worst normwise errors
measured under the interpreter: dense 4.9e-4 (fp16, bound 2e-3) and 7e-3 (bf16, bound 1.6e-2);
INT4 bf16 1.4e-2 (bound 2.4e-2).
"""
from unittest.mock import patch

import pytest
import torch

from tiny_gemm import Int4Weight, quantize
from tiny_gemm.ffn import (ACTIVATIONS, ffn_reference, fused_ffn, fused_gated_ffn,
                           gated_ffn_reference)

from conftest import DEVICE, INTERPRET, TOL, assert_close_to_ref, poisoned, replay_after

DTYPES = [torch.float16, torch.bfloat16]
FUSIONS = ["none", "epilogue", "full"]
DENSE_TOL, INT4_TOL = 2, 3   # multiples of TOL[dtype]; see the module docstring


def check(out, ref, dtype, tol=DENSE_TOL):
    """assert_close_to_ref (every element written, normwise and elementwise error) at tol x TOL."""
    with patch.dict(TOL, {dt: tol * t for dt, t in TOL.items()}):
        assert_close_to_ref(out, ref, dtype)


def weight(fan_in, fan_out, dtype, g):
    """A dense [in, out] weight scaled by 1/sqrt(fan_in), so activations stay O(1)."""
    return (torch.randn(fan_in, fan_out, generator=g) / fan_in ** 0.5).to(dtype).to(DEVICE)


def int4(w):
    """The dense [in, out] weight w as an Int4Weight of shape (out, in)."""
    return quantize(w.t(), group_size=32)


def vector(n, dtype, g):
    return torch.randn(n, generator=g).to(dtype).to(DEVICE)


def make_ffn(M, D, F, dtype, seed=0, bias=(True, True), lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, D, generator=g).to(dtype).to(DEVICE)
    return (x, weight(D, F, dtype, g), vector(F, dtype, g) if bias[0] else None,
            weight(F, D, dtype, g), vector(D, dtype, g) if bias[1] else None)


def make_gated(M, D, F, dtype, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, D, generator=g).to(dtype).to(DEVICE)
    return x, weight(D, F, dtype, g), weight(D, F, dtype, g), weight(F, D, dtype, g)


def run_ffn(x, w1, b1, w2, b2, activation="gelu", tol=DENSE_TOL, **kw):
    out = poisoned(x.shape, x.dtype)
    assert fused_ffn(x, w1, b1, w2, b2, activation, out=out, **kw) is out
    check(out, ffn_reference(x, w1, b1, w2, b2, activation), x.dtype, tol)
    return out


def run_gated(x, w_gate, w_up, w_down, activation="silu", tol=DENSE_TOL, **kw):
    out = poisoned(x.shape, x.dtype)
    assert fused_gated_ffn(x, w_gate, w_up, w_down, activation, out=out, **kw) is out
    check(out, gated_ffn_reference(x, w_gate, w_up, w_down, activation), x.dtype, tol)
    return out


# --- dense weights: every variant -----------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_ffn_activations(fusion, dtype, activation):
    run_ffn(*make_ffn(3, 96, 200, dtype, seed=1), activation, fusion=fusion)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_gated_ffn_activations(fusion, dtype, activation):
    run_gated(*make_gated(3, 200, 96, dtype, seed=2), activation, fusion=fusion)


@pytest.mark.parametrize("D, F", [(64, 128), (200, 96)])
@pytest.mark.parametrize("M", [1, 3, 16, 33])
@pytest.mark.parametrize("fusion", ["auto"] + FUSIONS)
def test_shapes(fusion, M, D, F):
    """M = 33 is more than one M-tile."""
    run_gated(*make_gated(M, D, F, torch.float16, seed=M + D), fusion=fusion)


@pytest.mark.parametrize("bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_biases_absent(fusion, bias):
    run_ffn(*make_ffn(16, 64, 96, torch.bfloat16, seed=3, bias=bias), "relu", fusion=fusion)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_leading_dims_and_strided_weights(fusion):
    """nn.Linear weights transposed in place of [in, out] copies, x with a leading batch dim
    and a non-unit stride along D."""
    g = torch.Generator().manual_seed(4)
    D, F = 96, 64
    x = torch.randn(2, 3, 2 * D, generator=g).to(torch.float16).to(DEVICE)[..., ::2]
    linears = [weight(F, D, torch.float16, g), weight(F, D, torch.float16, g), weight(D, F, torch.float16, g)]
    w_gate, w_up, w_down = (w.t() for w in linears)
    assert not w_gate.is_contiguous() and not x.is_contiguous()
    assert run_gated(x, w_gate, w_up, w_down, fusion=fusion).shape == (2, 3, D)


@pytest.mark.parametrize("fusion", ["auto"] + FUSIONS)
def test_empty_batch(fusion):
    x, w1, b1, w2, b2 = make_ffn(1, 64, 96, torch.float16)
    assert fused_ffn(x[:0], w1, b1, w2, b2, fusion=fusion).shape == (0, 64)
    x3 = torch.empty(2, 0, 64, dtype=torch.float16, device=DEVICE)
    assert fused_gated_ffn(x3, w1, w1, w2, fusion=fusion).shape == (2, 0, 64)


def test_full_is_bitwise_reproducible():
    """The F-split partials are summed in F order, whatever order the programs finish in."""
    args = make_gated(5, 64, 256, torch.bfloat16, seed=5)
    first = run_gated(*args, fusion="full")
    for _ in range(2):
        assert torch.equal(first, fused_gated_ffn(*args, fusion="full"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends(backend):
    if backend == "triton" and not (DEVICE == "cuda" or INTERPRET):
        pytest.skip("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1")
    run_ffn(*make_ffn(3, 64, 96, torch.bfloat16, seed=6), "gelu_tanh", backend=backend)
    run_gated(*make_gated(3, 64, 96, torch.float16, seed=6), backend=backend)


# --- INT4 weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["all", "first", "second"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_ffn(dtype, which):
    """which: the weights that are INT4 (the others dense)."""
    x, w1, b1, w2, b2 = make_ffn(3, 96, 160, dtype, seed=7)
    w1 = int4(w1) if which in ("all", "first") else w1
    w2 = int4(w2) if which in ("all", "second") else w2
    run_ffn(x, w1, b1, w2, b2, "gelu", tol=INT4_TOL)


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_gated_ffn(dtype, mixed, M):
    """mixed: w_up stays dense."""
    x, w_gate, w_up, w_down = make_gated(M, 96, 160, dtype, seed=8 + M)
    run_gated(x, int4(w_gate), w_up if mixed else int4(w_up), int4(w_down), tol=INT4_TOL,
              fusion="none")


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_gated_ffn_joined_gate_up(dtype, M, activation):
    """Gate and up as the parts of one weight: one GEMM of N = 2F reads both (F = 160, no
    multiple of the tile width); fusion="none" keeps two GEMMs, with the same result."""
    from tiny_gemm import ffn
    x, w_gate, w_up, w_down = make_gated(M, 96, 160, dtype, seed=20 + M)
    gate, up = Int4Weight.cat([int4(w_gate), int4(w_up)]).split([160, 160])
    down = int4(w_down)
    launched, real = [], ffn.w4a16_matmul

    def spy(a, w, *args, **kw):
        launched.append(w.out_features)
        return real(a, w, *args, **kw)
    triton_path = ffn._use_triton("auto", x.device)
    with patch.object(ffn, "w4a16_matmul", spy):
        joined = run_gated(x, gate, up, down, activation, tol=INT4_TOL)
        assert launched == ([320, 96] if triton_path else [])
        launched.clear()
        apart = run_gated(x, gate, up, down, activation, tol=INT4_TOL, fusion="none")
        assert launched == ([160, 160, 96] if triton_path else [])
    # the same GEMMs over the same codes: the two paths agree to rounding of h
    check(joined, apart.double(), dtype, INT4_TOL)


# --- bad input ------------------------------------------------------------------------------
BAD_FFN = [   # (argument, its replacement from the good arguments, exception, message)
    ("activation", lambda a: "swish", ValueError, "activation must be one of"),
    ("fusion", lambda a: "blocked", ValueError, "fusion must be one of"),
    ("backend", lambda a: "cuda", ValueError, "backend must be one of"),
    ("x", lambda a: a["x"].float(), TypeError, "x must be float16 or bfloat16"),
    ("w1", lambda a: a["w1"].tolist(), TypeError, "w1 must be a torch.Tensor or"),
    ("w1", lambda a: a["w1"].bfloat16(), TypeError, "w1 has dtype"),
    ("w1", lambda a: a["w1"][None], ValueError, "w1 must be 2-D"),
    ("w1", lambda a: a["w1"][:-1], ValueError, "w1 has 63 input features"),
    ("w1", lambda a: a["w1"].to("meta"), ValueError, "w1 is on meta"),
    ("w2", lambda a: a["w2"][:-1], ValueError, "w2 has 95 input features"),
    ("w2", lambda a: a["w2"][:, :-1], ValueError, "w2 has 63 output features"),
    ("b1", lambda a: a["b1"][:-1], ValueError, r"b1 must have shape \[96\]"),
    ("b1", lambda a: a["b1"].to("meta"), ValueError, "b1 is on meta"),
    ("b2", lambda a: a["b2"].bfloat16(), TypeError, "b2 has dtype"),
    ("b2", lambda a: a["b2"][None], ValueError, r"b2 must have shape \[64\]"),
    ("out", lambda a: a["x"].new_empty(3, 65), ValueError, "out must have shape"),
    ("out", lambda a: a["x"].float(), TypeError, "out must have x's dtype"),
]


@pytest.mark.parametrize("arg, replace, exc, match", BAD_FFN,
                         ids=[f"{arg}-{match}" for arg, _, _, match in BAD_FFN])
def test_bad_ffn_arguments(arg, replace, exc, match):
    x, w1, b1, w2, b2 = make_ffn(3, 64, 96, torch.float16)
    args = dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    args[arg] = replace(args)
    with pytest.raises(exc, match=match):
        fused_ffn(**args)


def test_bad_gated_arguments():
    x, w_gate, w_up, w_down = make_gated(3, 64, 96, torch.float16)
    with pytest.raises(ValueError, match="w_up must map 64 -> 96"):
        fused_gated_ffn(x, w_gate, w_up[:, :-1], w_down)
    with pytest.raises(ValueError, match="w_down has 95 input features but w_gate has 96"):
        fused_gated_ffn(x, w_gate, w_up, w_down[:-1])
    with pytest.raises(TypeError, match="w_gate has dtype"):
        fused_gated_ffn(x, w_gate.bfloat16(), w_up, w_down)
    with pytest.raises(ValueError, match="w_down is on meta"):
        fused_gated_ffn(x, w_gate, w_up, w_down.to("meta"))
    with pytest.raises(ValueError, match="fusion='epilogue' needs dense weights"):
        fused_gated_ffn(x, int4(w_gate), w_up, w_down, fusion="epilogue")


# --- torch.library ops ----------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_fused_ffn(bias):
    x, w1, b1, w2, b2 = make_ffn(2, 64, 96, torch.float16, bias=(bias, bias))
    torch.library.opcheck(torch.ops.tiny_gemm.fused_ffn.default, (x, w1, b1, w2, b2, "gelu"))


def test_opcheck_fused_gated_ffn():
    x, w_gate, w_up, w_down = make_gated(2, 64, 96, torch.bfloat16)
    torch.library.opcheck(torch.ops.tiny_gemm.fused_gated_ffn.default, (x, w_gate, w_up, w_down, "silu"))


def test_ops_match_reference():
    x, w1, b1, w2, b2 = make_ffn(3, 64, 96, torch.bfloat16, seed=9)
    check(torch.ops.tiny_gemm.fused_ffn(x, w1, b1, w2, None, "gelu_tanh"),
          ffn_reference(x, w1, b1, w2, None, "gelu_tanh"), x.dtype)
    x, w_gate, w_up, w_down = make_gated(3, 64, 96, torch.float16, seed=9)
    check(torch.ops.tiny_gemm.fused_gated_ffn(x, w_gate, w_up, w_down, "silu"),
          gated_ffn_reference(x, w_gate, w_up, w_down), x.dtype)


def test_torch_compile_fullgraph():
    x, w_gate, w_up, w_down = make_gated(2, 64, 96, torch.float16, seed=10)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def block(x, w_gate, w_up, w_down):   # residual around the FFN
        return x + torch.ops.tiny_gemm.fused_gated_ffn(x, w_gate, w_up, w_down, "silu")

    out = block(x, w_gate, w_up, w_down)
    check(out, x.double() + gated_ffn_reference(x, w_gate, w_up, w_down), x.dtype)


# --- GPU only: Llama-3-8B -------------------------------------------------------------------
LLAMA3_8B = (4096, 14336)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fusion", ["auto"] + FUSIONS)
@pytest.mark.parametrize("M", [1, 16])
def test_llama3_8b(M, fusion, dtype):
    run_gated(*make_gated(M, *LLAMA3_8B, dtype, seed=M), fusion=fusion)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16])
def test_llama3_8b_int4(M):
    x, w_gate, w_up, w_down = make_gated(M, *LLAMA3_8B, torch.float16, seed=M)
    run_gated(x, *(quantize(w.t(), group_size=128) for w in (w_gate, w_up, w_down)), tol=INT4_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16])
def test_llama3_8b_int4_joined_gate_up(M):
    x, w_gate, w_up, w_down = make_gated(M, *LLAMA3_8B, torch.float16, seed=M)
    F = LLAMA3_8B[1]
    gate, up = Int4Weight.cat([quantize(w.t(), group_size=128) for w in (w_gate, w_up)]).split([F, F])
    run_gated(x, gate, up, quantize(w_down.t(), group_size=128), tol=INT4_TOL)


@pytest.mark.gpu
def test_llama3_8b_full_reproducible_many_runs():
    args = make_gated(16, *LLAMA3_8B, torch.bfloat16, seed=3)
    first = run_gated(*args, fusion="full")
    for _ in range(20):
        assert torch.equal(first, fused_gated_ffn(*args, fusion="full"))


@pytest.mark.gpu
def test_compiled_op_captures_in_cuda_graph():
    x, w_gate, w_up, w_down = make_gated(4, *LLAMA3_8B, torch.float16)
    f = torch.compile(lambda x: torch.ops.tiny_gemm.fused_gated_ffn(x, w_gate, w_up, w_down, "silu"),
                      fullgraph=True)
    f(x)
    out = replay_after(lambda: f(x), lambda: x.copy_(torch.randn_like(x)))
    check(out, gated_ffn_reference(x, w_gate, w_up, w_down), x.dtype)
