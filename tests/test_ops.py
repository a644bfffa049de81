"""torch.ops.tiny_gemm.w4a16_mm: schema and fake implementation (opcheck), torch.compile with
fullgraph=True, and (GPU) capture of the compiled call in a CUDA graph."""
import pytest
import torch

import tiny_gemm  # noqa: F401  (registers the ops)
from tiny_gemm import quantize, w4a16_reference

from conftest import DEVICE, assert_close_to_ref, replay_after


def _inputs(M=3, N=64, K=256, G=64, dtype=torch.float16):
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    qw = quantize(torch.randn(N, K, dtype=dtype), G).to(DEVICE)
    return x, qw


def _args(x, qw, *rest):
    return (x, qw.packed, qw.scales, qw.zeros, qw.group_size, qw.in_features, *rest)


@pytest.mark.parametrize("decomposition", ["auto", "splitk"])
def test_opcheck(decomposition):
    x, qw = _inputs()
    torch.library.opcheck(torch.ops.tiny_gemm.w4a16_mm.default, _args(x, qw, decomposition, 0, True))


def test_op_matches_reference():
    x, qw = _inputs(dtype=torch.bfloat16)
    out = torch.ops.tiny_gemm.w4a16_mm(*_args(x, qw))
    assert_close_to_ref(out, w4a16_reference(x, qw), x.dtype)


def test_torch_compile_fullgraph():
    x, qw = _inputs(M=2)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def layer(x, packed, scales, zeros):
        y = torch.ops.tiny_gemm.w4a16_mm(x, packed, scales, zeros, 64, 256)
        return torch.nn.functional.silu(y)

    out = layer(x, qw.packed, qw.scales, qw.zeros)
    ref = torch.nn.functional.silu(w4a16_reference(x, qw))
    assert_close_to_ref(out, ref, x.dtype)


@pytest.mark.gpu
def test_compiled_call_captures_in_cuda_graph():
    x, qw = _inputs(M=4, N=4096, K=4096, G=128)
    f = torch.compile(lambda x: torch.ops.tiny_gemm.w4a16_mm(*_args(x, qw)), fullgraph=True)
    f(x)
    out = replay_after(lambda: f(x), lambda: x.copy_(torch.randn_like(x)))
    assert_close_to_ref(out, w4a16_reference(x, qw), x.dtype)
