"""Quantization, the packed format, and the HQQ / GPTQ conversions (pure PyTorch, any device)."""
import math

import pytest
import torch

import tiny_gemm
from tiny_gemm import Int4Weight, dequantize, quantization_error, quantize
from tiny_gemm.quant import dequantize_float

from conftest import DEVICE

GROUPS = [32, 64, 128, 256, None]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", GROUPS)
def test_quantize_format(dtype, group_size):
    N, K = 48, 512
    w = torch.randn(N, K, device=DEVICE).to(dtype)
    qw = quantize(w, group_size)
    G = group_size or K
    assert qw.shape == (N, K) and qw.group_size == G and qw.dtype == dtype
    assert qw.packed.dtype == torch.uint8 and qw.packed.shape == (K // 128, N, 64)
    assert qw.scales.shape == qw.zeros.shape == (K // G, N)
    codes = qw.codes()
    assert codes.shape == (N, K) and int(codes.max()) <= 15
    assert qw.zeros.dtype == torch.int8
    z = qw.zeros.float()
    assert z.min() >= 0 and z.max() <= 15
    # the codes are the nearest ones for the stored scales and zeros
    w_hat = dequantize(qw)
    assert w_hat.dtype == dtype and w_hat.shape == (N, K)
    step = qw.scales.double().t().repeat_interleave(G, dim=1)
    # half a step, plus the rounding of the stored scale over the 15 steps of the range
    slack = 15 * torch.finfo(dtype).eps
    assert ((w.double() - dequantize_float(qw)).abs() <= (0.5 + slack) * step).all()


@pytest.mark.parametrize("group_size", GROUPS)
def test_quantization_error_gaussian(group_size):
    """RTN error is uniform in +-scale/2: its rms is rms(scale) / sqrt(12). For N(0, 1) weights
    the range of a group of G samples is about 2 * 2.5 sigma, so the error is about 10%."""
    torch.manual_seed(1)
    w = torch.randn(256, 1024, dtype=torch.float32, device=DEVICE)
    qw = quantize(w, group_size)
    err = quantization_error(w, qw)
    predicted = (qw.scales.double().pow(2).mean().sqrt() / math.sqrt(12)).item() / w.double().pow(2).mean().sqrt().item()
    assert err <= 1.05 * predicted
    bound = {32: 0.085, 64: 0.095, 128: 0.105, 256: 0.115, None: 0.14}[group_size]
    assert err <= bound, f"relative Frobenius error {err:.4f} > {bound} at group_size {group_size}"


def test_constant_and_zero_groups_are_exact():
    """Zero groups always; constant groups when value / 15 is exact in the scale's dtype."""
    w = torch.zeros(4, 256, device=DEVICE)
    w[1] = 15 * 0.125
    w[2] = -15 * 0.25
    qw = quantize(w, 128)
    assert torch.equal(dequantize(qw), w)


@pytest.mark.parametrize("K", [96, 128, 300])
def test_packed_layout_by_hand(K):
    """packed[b, n, j] holds k = 128 b + 2 j (low nibble) and k + 1 (high nibble); zeros past K."""
    from tiny_gemm.quant import pack_codes, unpack_codes
    N = 3
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=torch.Generator().manual_seed(K))
    packed = pack_codes(codes)
    assert packed.shape == (-(-K // 128), N, 64)
    for n in range(N):
        for k in range(0, K, 7):
            byte = int(packed[k // 128, n, (k % 128) // 2])
            assert (byte >> 4 * (k % 2)) & 0xF == codes[n, k]
    assert not packed.view(-1, N, 128 // 2).permute(1, 0, 2).reshape(N, -1)[:, (K + 1) // 2:].any()
    assert torch.equal(unpack_codes(packed, K), codes)


def test_odd_k_single_group():
    w = torch.randn(5, 99, device=DEVICE)
    qw = quantize(w, None)
    assert qw.packed.shape == (1, 5, 64) and qw.group_size == 99
    assert not qw.packed[:, :, 50:].any()     # past K: zero padding
    assert quantization_error(w, qw) < 0.2


def test_from_codes_roundtrip():
    N, K, G = 40, 256, 64
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=DEVICE)
    scales = torch.rand(N, K // G, device=DEVICE).half() + 0.01
    zeros = (torch.rand(N, K // G, device=DEVICE) * 15).half()      # fractional, HQQ style
    qw = Int4Weight.from_codes(codes, scales, zeros, G)
    assert torch.equal(qw.codes(), codes)
    expected = (codes.double() - zeros.double().repeat_interleave(G, 1)) * scales.double().repeat_interleave(G, 1)
    assert torch.allclose(dequantize_float(qw), expected, rtol=0, atol=0)


def _hand_pack_gptq(codes_kn, zeros_gn):
    """AutoGPTQ packing written out with Python ints, one value at a time."""
    K, N = codes_kn.shape
    to_i32 = lambda v: v - (1 << 32) if v >= 1 << 31 else v
    qweight = torch.tensor([[to_i32(sum(int(codes_kn[8 * r + j, n]) << (4 * j) for j in range(8)))
                             for n in range(N)] for r in range(K // 8)], dtype=torch.int32)
    ng = zeros_gn.shape[0]
    qzeros = torch.tensor([[to_i32(sum((int(zeros_gn[g, 8 * c + j]) - 1) << (4 * j) for j in range(8)))
                            for c in range(N // 8)] for g in range(ng)], dtype=torch.int32)
    return qweight, qzeros


def test_from_gptq_matches_hand_packed_matrix():
    K, N, G = 64, 16, 32
    torch.manual_seed(3)
    codes = torch.randint(0, 16, (K, N), dtype=torch.uint8)
    codes[0, 0], codes[7, 0] = 15, 15                     # set the int32 sign bit
    zeros = torch.randint(1, 17, (K // G, N))
    scales = torch.rand(K // G, N).half() + 0.01
    qweight, qzeros = _hand_pack_gptq(codes, zeros)
    qw = Int4Weight.from_gptq(qweight, qzeros, scales, G)
    assert torch.equal(qw.codes(), codes.t())
    assert qw.zeros.dtype == torch.int8 and torch.equal(qw.zeros, zeros.to(torch.int8))
    back_w, back_z, back_s = qw.to_gptq()
    assert torch.equal(back_w, qweight) and torch.equal(back_z, qzeros) and torch.equal(back_s, scales)


@pytest.mark.parametrize("group_size", [32, 128, None])
def test_gptq_roundtrip_from_quantize(group_size):
    w = torch.randn(64, 256, device=DEVICE)
    qw = quantize(w, group_size)
    qw.zeros.clamp_(min=1)          # GPTQ stores zero - 1 in four bits: zeros must be 1..16
    qweight, qzeros, scales = qw.to_gptq()
    assert qweight.shape == (32, 64) and qzeros.shape == (256 // qw.group_size, 8)
    qw2 = Int4Weight.from_gptq(qweight, qzeros, scales, group_size)
    assert torch.equal(qw2.packed, qw.packed) and torch.equal(qw2.zeros, qw.zeros)
    assert torch.equal(dequantize(qw2), dequantize(qw))


def test_to_gptq_rejects_unrepresentable_zeros():
    qw = quantize(torch.randn(8, 64), 32)
    qw.zeros[0, 0] = 0
    with pytest.raises(ValueError, match="zeros"):
        qw.to_gptq()


@pytest.mark.parametrize("call, exc, match", [
    (lambda: quantize(torch.randn(8, 100), 32), ValueError, "multiple of group_size"),
    (lambda: quantize(torch.randn(8, 128), 48), ValueError, "group_size"),
    (lambda: quantize(torch.randn(2, 8, 128), 32), ValueError, "2-D"),
    (lambda: quantize(torch.randn(8)), ValueError, "2-D"),
    (lambda: quantize(torch.randint(0, 3, (8, 128))), TypeError, "w must be one of"),
    (lambda: quantize([[1.0]]), TypeError, "torch.Tensor"),
    (lambda: quantize(torch.randn(0, 128), 32), ValueError, "non-empty"),
    (lambda: dequantize(torch.randn(4, 4)), TypeError, "Int4Weight"),
    (lambda: Int4Weight.from_codes(torch.full((4, 64), 16, dtype=torch.uint8),
                                   torch.ones(4, 2), torch.ones(4, 2), 32), ValueError, "0..15"),
    (lambda: Int4Weight.from_codes(torch.zeros(4, 64, dtype=torch.uint8),
                                   torch.ones(2, 4), torch.ones(2, 4), 32), ValueError, "scales"),
    (lambda: Int4Weight.from_gptq(torch.zeros(8, 16, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int32),
                                  torch.ones(2, 16), 32), TypeError, "qweight"),
    (lambda: Int4Weight.from_gptq(torch.zeros(8, 16, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int32),
                                  torch.ones(2, 16), 32), ValueError, "qzeros"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_public_api():
    for name in ("quantize", "dequantize", "Int4Weight", "w4a16_matmul", "quantization_error"):
        assert hasattr(tiny_gemm, name)


def test_cat_and_split_rows():
    """cat joins row blocks (a copy); split gives them back, codes as views of the whole,
    and joined_rows finds the whole again only from all of its parts in order."""
    from tiny_gemm.quant import joined_rows
    g = torch.Generator().manual_seed(3)
    a = quantize(torch.randn(10, 256, generator=g), 64)
    b = quantize(torch.randn(7, 256, generator=g), 64)
    whole = Int4Weight.cat([a, b])
    assert whole.shape == (17, 256)
    assert torch.equal(dequantize(whole), torch.cat([dequantize(a), dequantize(b)]))
    pa, pb = whole.split([10, 7])
    assert torch.equal(dequantize(pa), dequantize(a)) and torch.equal(dequantize(pb), dequantize(b))
    assert pa.packed.data_ptr() == whole.packed.data_ptr()
    assert pb.packed.data_ptr() == whole.packed.data_ptr() + 10 * 64 and not pb.packed.is_contiguous()
    assert joined_rows(pa, pb) is whole
    assert joined_rows(pb, pa) is None and joined_rows(a, b) is None and joined_rows(pa) is None
    p1, p2, p3 = whole.split([5, 5, 7])
    assert joined_rows(p1, p2, p3) is whole and joined_rows(p1, p3) is None


@pytest.mark.parametrize("bad, exc, match", [
    (lambda a, b: Int4Weight.cat([]), TypeError, "non-empty list"),
    (lambda a, b: Int4Weight.cat([a, quantize(torch.randn(4, 128), 64)]), ValueError, r"weights\[1\] has K 128"),
    (lambda a, b: Int4Weight.cat([a, quantize(torch.randn(4, 256), 128)]), ValueError, "group_size"),
    (lambda a, b: Int4Weight.cat([a, quantize(torch.randn(4, 256).half(), 64)]), TypeError, "scales/zeros"),
    (lambda a, b: a.split([3, 3]), ValueError, "summing to N = 10"),
    (lambda a, b: a.split([10, 0]), ValueError, "positive ints"),
])
def test_cat_and_split_bad_input(bad, exc, match):
    a = quantize(torch.randn(10, 256), 64)
    with pytest.raises(exc, match=match):
        bad(a, None)
