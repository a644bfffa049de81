"""dequantize_triton: bit-identical to quant.dequantize for every zero kind, scale dtype and
group size (odd K and one group per row included), every element written; bad arguments."""
import pytest
import torch

from tiny_gemm import Int4Weight, dequantize, quantize
from tiny_gemm.quant import pack_codes
from tiny_gemm.dequant import dequantize_triton

from conftest import DEVICE, poisoned

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
_INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}

# (N, K, group_size): one to three groups per row, odd N, odd K, K = 1, group sizes that are
# not powers of two (48; 6, the smallest tile) and one group per row of a K that is not one
SHAPES = [(3, 64, 32), (37, 96, 32), (200, 128, 64), (9, 128, 128), (6, 512, 256),
          (4, 96, 48), (5, 12, 6), (130, 96, None), (5, 33, None), (17, 7, None), (11, 1, None)]


def make(N: int, K: int, group_size: int | None, dtype: torch.dtype, float_zeros: bool,
         seed: int = 0) -> Int4Weight:
    """A quantized random weight; float_zeros replaces its zero points by fractional ones."""
    torch.manual_seed(seed)
    G = group_size or K
    w = torch.randn(N, K, device=DEVICE).to(dtype)
    if G == K or G in (32, 64, 128, 256):
        qw = quantize(w, group_size)
    else:   # a group size quantize does not take: random codes, scales and zeros
        codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=DEVICE)
        scales = (torch.rand(K // G, N, device=DEVICE) + 0.01).to(dtype)
        zeros = torch.randint(0, 16, (K // G, N), dtype=torch.int8, device=DEVICE)
        qw = Int4Weight(pack_codes(codes), scales, zeros, G, (N, K))
    if float_zeros:
        z = (qw.zeros.float() + torch.rand(qw.zeros.shape, device=DEVICE) - 0.5).to(dtype)
        qw = Int4Weight(qw.packed, qw.scales, z, qw.group_size, qw.shape)
    return qw


def assert_same_bits(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert not out.isnan().any(), f"{int(out.isnan().sum())} elements unwritten"
    int_dtype = _INT_OF[out.dtype]
    differ = out.view(int_dtype) != expected.to(out.device).view(int_dtype)
    assert not differ.any(), f"{int(differ.sum())} of {out.numel()} elements differ in their bits"


@pytest.mark.parametrize("float_zeros", [False, True], ids=["int8_zeros", "float_zeros"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K, group_size", SHAPES)
def test_bitwise_equal_to_dequantize(N, K, group_size, dtype, float_zeros):
    qw = make(N, K, group_size, dtype, float_zeros, seed=N + K)
    expected = dequantize(qw)
    out = poisoned((N, K), dtype)
    assert dequantize_triton(qw, out) is out
    assert_same_bits(out, expected)
    assert_same_bits(dequantize_triton(qw), expected)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_rounding_overflow_and_subnormals():
    """Products that round in fp16, overflow to inf or become subnormal do as in torch."""
    N, K, G = 16, 64, 32
    codes = torch.arange(N * K, device=DEVICE).remainder(16).to(torch.uint8).reshape(N, K)
    scales = torch.tensor([65504.0, 6e-8, 1.0009765625, -3.0], device=DEVICE).repeat(N // 2)
    scales = scales.reshape(N, K // G).half()
    zeros = (torch.rand(N, K // G, device=DEVICE) * 15).half()
    qw = Int4Weight.from_codes(codes, scales, zeros, G)
    out = poisoned((N, K), torch.float16)
    dequantize_triton(qw, out)
    expected = dequantize(qw)
    finite = expected[expected.isfinite()].abs()
    assert expected.isinf().any() and ((finite > 0) & (finite < 2.0**-14)).any()
    assert_same_bits(out, expected)


def test_empty_weight():
    qw = Int4Weight(torch.empty(1, 0, 64, dtype=torch.uint8, device=DEVICE),
                    torch.empty(2, 0, dtype=torch.float16, device=DEVICE),
                    torch.empty(2, 0, dtype=torch.int8, device=DEVICE), 32, (0, 64))
    assert dequantize_triton(qw).shape == (0, 64)


def test_bad_arguments():
    qw = make(8, 64, 32, torch.float16, False)
    with pytest.raises(TypeError, match="qw must be a tiny_gemm.Int4Weight"):
        dequantize_triton(torch.randn(8, 64, device=DEVICE))
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        dequantize_triton(qw, out=[[0.0] * 64] * 8)
    with pytest.raises(TypeError, match="out must have the scales' dtype"):
        dequantize_triton(qw, out=torch.empty(8, 64, dtype=torch.float32, device=DEVICE))
    with pytest.raises(ValueError, match="out must have shape"):
        dequantize_triton(qw, out=torch.empty(8, 63, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="out must be contiguous"):
        dequantize_triton(qw, out=torch.empty(64, 8, dtype=torch.float16, device=DEVICE).t())
    # groups of 3 begin inside a byte (k = 3 is the high nibble of byte 1)
    odd = Int4Weight(torch.zeros(1, 8, 64, dtype=torch.uint8, device=DEVICE),
                     torch.ones(2, 8, dtype=torch.float16, device=DEVICE),
                     torch.zeros(2, 8, dtype=torch.int8, device=DEVICE), 3, (8, 6))
    with pytest.raises(ValueError, match="group_size = 3 is odd"):
        dequantize_triton(odd)


@pytest.mark.skipif(DEVICE != "cpu", reason="a CPU weight")
def test_cpu_needs_the_interpreter(monkeypatch):
    qw = make(8, 64, 32, torch.float16, False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        dequantize_triton(qw)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs tensors on two devices")
def test_out_on_another_device():
    qw = make(8, 64, 32, torch.float16, False)
    with pytest.raises(ValueError, match="out is on"):
        dequantize_triton(qw, out=torch.empty(8, 64, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("group_size", [32, 128, None])
@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_shapes(K, N, group_size, dtype):
    for float_zeros in (False, True):
        qw = make(N, K, group_size, dtype, float_zeros, seed=K + N)
        assert_same_bits(dequantize_triton(qw, poisoned((N, K), dtype)), dequantize(qw))
