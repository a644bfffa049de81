"""The FFN activations in device code, shared by the FFN kernels (ffn.py) and the W4A16 GEMM,
whose gated input computes h = act(g) * u as it loads the down projection's activations."""
from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


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
