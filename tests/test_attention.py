"""fused_attention and decode_attention against the float64 references: shapes that straddle
the tiles, causal and not, GQA / MQA, every head dim, both dtypes, strided inputs, ragged KV
caches and every split count, dropout (exact given the mask, keep rate, unbiasedness,
reproducibility), bad input, and the torch.library ops. Outputs are NaN-poisoned before each
call and so is the split-KV workspace. Without a GPU the kernels run under the interpreter with
16 x 16 tiles, so the shapes here are small; the GPU adds long sequences."""
import math

import pytest
import torch
import triton
import triton.language as tl

from tiny_gemm import attention
from tiny_gemm.attention import (DecodeConfig, attention_dropout_mask, attention_reference, decode_attention,
                                 decode_attention_reference, decode_num_splits, fused_attention,
                                 philox4x32, select_decode_config)

from conftest import DEVICE, INTERPRET, TOL, assert_close_to_ref, poisoned, replay_after

DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poisoned_decode_workspace(monkeypatch):
    """NaN-fill the split-KV partial outputs and log-sum-exps before every decode launch."""
    monkeypatch.setattr(attention, "POISON_WORKSPACE", True)


def make_qkv(B, H, Hkv, Nq, Nk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def make_cache(B, H, Hkv, S_max, D, dtype, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S_max, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S_max, D, generator=g).to(dtype)
    lens = torch.tensor(lens, dtype=torch.int32)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), lens.to(DEVICE)


def run_prefill(q, k, v, causal=True, **kw):
    out = poisoned(q.shape, q.dtype)
    assert fused_attention(q, k, v, causal, out=out, **kw) is out
    return out


def check_prefill(q, k, v, causal=True, sm_scale=None, **kw):
    out = run_prefill(q, k, v, causal, sm_scale=sm_scale, **kw)
    assert_close_to_ref(out, attention_reference(q, k, v, causal, sm_scale=sm_scale), q.dtype)
    return out


def check_decode(q, k, v, lens, sm_scale=None, **kw):
    out = poisoned(q.shape, q.dtype)
    assert decode_attention(q, k, v, lens, sm_scale=sm_scale, out=out, **kw) is out
    assert_close_to_ref(out, decode_attention_reference(q, k, v, lens, sm_scale), q.dtype)
    return out


# --- prefill ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Nq, Nk", [(1, 1), (1, 77), (7, 77), (7, 200), (16, 32), (130, 130), (130, 200)])
def test_prefill_shapes(Nq, Nk, causal, dtype):
    """Single query, a query chunk on a longer cache (bottom-right causal mask), more queries
    than one tile, key counts that are no multiple of the tile, exact tile multiples."""
    q, k, v = make_qkv(1, 2, 1, Nq, Nk, 64, dtype, seed=Nq * 1000 + Nk)
    check_prefill(q, k, v, causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("Hkv", [8, 2, 1])
def test_prefill_gqa_and_head_dims(Hkv, D, dtype):
    """H = 8 query heads on 8 (MHA), 2 (GQA, 4 per group) and 1 (MQA) kv heads."""
    q, k, v = make_qkv(2, 8, Hkv, 19, 37, D, dtype, seed=Hkv * D)
    check_prefill(q, k, v, causal=True)


def test_prefill_strided_inputs():
    """[B, N, H, D] storage viewed as [B, H, N, D], a non-unit head-dim stride, and a batch
    dimension of stride 0: the kernel reads through the strides, no copies."""
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 21, 50, 32
    q = torch.randn(B, Nq, H, D, dtype=torch.float16, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, Nk, Hkv, 2 * D, dtype=torch.float16, device=DEVICE).transpose(1, 2)[..., ::2]
    v = torch.randn(1, Hkv, Nk, D, dtype=torch.float16, device=DEVICE).expand(B, -1, -1, -1)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_prefill(q, k, v, causal=True)
    check_prefill(q, k, v, causal=False)


def test_prefill_sm_scale():
    q, k, v = make_qkv(1, 2, 2, 20, 40, 32, torch.bfloat16, seed=3)
    check_prefill(q, k, v, causal=True, sm_scale=0.3)


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_torch_backend(causal):
    q, k, v = make_qkv(2, 4, 1, 9, 30, 32, torch.float16, seed=4)
    check_prefill(q, k, v, causal, backend="torch")


def test_prefill_empty():
    q, k, v = make_qkv(1, 2, 1, 4, 8, 32, torch.float16)
    assert fused_attention(q[:0], k[:0], v[:0]).shape == (0, 2, 4, 32)
    assert fused_attention(q[:, :, :0], k, v).shape == (1, 2, 0, 32)


def test_prefill_is_bitwise_reproducible():
    q, k, v = make_qkv(1, 2, 1, 40, 50, 32, torch.bfloat16, seed=8)
    assert torch.equal(fused_attention(q, k, v), fused_attention(q, k, v))


# --- dropout ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("p", [0.1, 0.6])
def test_dropout_matches_reference_given_mask(p, causal, dtype):
    B, H, Hkv, Nq, Nk, D = 2, 2, 1, 33, 50, 32
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, dtype, seed=int(p * 10))
    seed = 1234 + int(causal)
    out = run_prefill(q, k, v, causal, dropout_p=p, dropout_seed=seed)
    mask = attention_dropout_mask(B, H, Nq, Nk, p, seed, DEVICE)
    assert_close_to_ref(out, attention_reference(q, k, v, causal, p, dropout_mask=mask), dtype)


def test_dropout_torch_backend_uses_the_same_pattern():
    q, k, v = make_qkv(1, 2, 1, 12, 20, 32, torch.float16, seed=5)
    out = run_prefill(q, k, v, True, dropout_p=0.3, dropout_seed=99, backend="torch")
    mask = attention_dropout_mask(1, 2, 12, 20, 0.3, 99, DEVICE)
    assert_close_to_ref(out, attention_reference(q, k, v, True, 0.3, dropout_mask=mask), q.dtype)


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**63 - 1])
def test_dropout_mask_triton_matches_torch_philox(seed):
    """The kernel's generator bit for bit against the pure PyTorch Philox (both key words)."""
    shape = (2, 3, 37, 70)
    a = attention_dropout_mask(*shape, 0.5, seed, DEVICE, backend="triton")
    b = attention_dropout_mask(*shape, 0.5, seed, DEVICE, backend="torch")
    assert a.dtype == torch.bool and a.shape == shape
    assert torch.equal(a, b)


@triton.jit
def _keep_at_kernel(offsets_ptr, keep_ptr, n, seed, keep_threshold, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    offsets = tl.load(offsets_ptr + i, mask=i < n)
    tl.store(keep_ptr + i, attention._dropout_keep(seed, offsets, keep_threshold), mask=i < n)


def test_dropout_counter_high_word():
    """Counters past 2^32 (B*H*Nq*Nk beyond 4G elements) use the second Philox word."""
    offsets = torch.randint(0, 2**62, (1000,), dtype=torch.int64, device=DEVICE)
    keep = torch.empty(1000, dtype=torch.bool, device=DEVICE)
    _keep_at_kernel[(1,)](offsets, keep, 1000, 11, 2**30, BLOCK=1024)
    zero = torch.zeros_like(offsets)
    r, _, _, _ = philox4x32(offsets & 0xFFFFFFFF, offsets >> 32, zero, zero, 11, 0)
    assert torch.equal(keep, (r >> 1) >= 2**30)


def test_philox_known_answers():
    """Philox4x32-10 known-answer vectors of Random123 (kat_vectors)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, expected in cases:
        out = philox4x32(*(torch.tensor([c]) for c in ctr), *key)
        assert tuple(int(o) for o in out) == expected


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(p):
    """The kept fraction is within 5 binomial standard deviations of 1 - p, in every
    (batch, head) and overall."""
    B, H, Nq, Nk = 2, 4, 64, 128
    mask = attention_dropout_mask(B, H, Nq, Nk, p, 2024, DEVICE)
    n = mask.numel()
    assert abs(mask.double().mean().item() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)
    per_head = mask.double().mean(dim=(2, 3))
    assert (per_head - (1 - p)).abs().max().item() <= 5 * math.sqrt(p * (1 - p) / (Nq * Nk))


def test_dropout_is_unbiased():
    """E[dropout output] = output without dropout: the mean over 4 seeds x 24 batch copies
    (independent patterns) is closer to it than one sample by about sqrt(96)."""
    q, k, v = make_qkv(1, 2, 1, 16, 16, 32, torch.float16, seed=6)
    q, k, v = (t.expand(24, -1, -1, -1) for t in (q, k, v))
    ref = attention_reference(q[:1], k[:1], v[:1], False)
    samples = torch.cat([fused_attention(q, k, v, False, 0.5, dropout_seed=s).double() for s in range(4)])
    err_one = ((samples - ref).flatten(1).norm(dim=1) / ref.norm()).mean().item()
    err_mean = ((samples.mean(0, keepdim=True) - ref).norm() / ref.norm()).item()
    assert err_one > 0.2                        # dropout did something
    assert err_mean < 0.3 * err_one             # ~ err_one / sqrt(96) = 0.1 err_one if unbiased


def test_dropout_reproducibility():
    q, k, v = make_qkv(1, 2, 1, 10, 20, 32, torch.bfloat16, seed=7)
    a = fused_attention(q, k, v, True, 0.4, dropout_seed=5)
    assert torch.equal(a, fused_attention(q, k, v, True, 0.4, dropout_seed=5))
    assert not torch.equal(a, fused_attention(q, k, v, True, 0.4, dropout_seed=6))
    torch.manual_seed(0)
    b = fused_attention(q, k, v, True, 0.4)          # seed drawn from torch's generator
    c = fused_attention(q, k, v, True, 0.4)
    torch.manual_seed(0)
    assert torch.equal(b, fused_attention(q, k, v, True, 0.4))
    assert not torch.equal(b, c)


# --- decode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 1, 2, 3, 7, 64])
def test_decode_ragged_and_splits(num_splits, dtype):
    """Lengths 1 and S_max beside ragged ones (S_max = 100 is no multiple of the 16-key block);
    64 splits is more than the 7 blocks of the cache, and short sequences leave most splits
    empty (the NaN workspace shows any that the combine reads)."""
    q, k, v, lens = make_cache(5, 8, 2, 100, 64, dtype, [1, 100, 37, 16, 17], seed=num_splits or 0)
    check_decode(q, k, v, lens, num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("Hkv", [8, 2, 1])
def test_decode_gqa_and_head_dims(Hkv, D, dtype):
    """8 query heads share 1, 4 or 8 per kv head (one program takes the whole group)."""
    q, k, v, lens = make_cache(2, 8, Hkv, 50, D, dtype, [50, 23], seed=Hkv + D)
    check_decode(q, k, v, lens, num_splits=2)


def test_decode_combine_in_tiles():
    """70 splits of 8 heads of 128: the combine reduces them a few at a time (a register
    budget of [heads, splits, D]) with a running max. The keys of the last splits are scaled
    up so that a later group raises the max."""
    q, k, v, lens = make_cache(2, 8, 1, 70 * 16, 128, torch.float16, [70 * 16, 300])
    k[:, :, 64 * 16:] *= 3
    check_decode(q, k, v, lens, num_splits=70)


def test_decode_ticket_counters_are_zero_at_rest():
    """The last split of each (sequence, kv head) resets its counter, also when short
    sequences leave most splits without keys (they take no ticket)."""
    from tiny_gemm import w4a16
    q, k, v, lens = make_cache(4, 4, 2, 100, 32, torch.float16, [1, 100, 37, 16])
    for splits in (3, 7, 64):
        check_decode(q, k, v, lens, num_splits=splits)
    locks = w4a16._LOCKS.get(q.device)
    assert locks is None or int(locks.abs().sum()) == 0


def test_decode_large_group():
    """32 query heads per kv head: a 32-row tile."""
    q, k, v, lens = make_cache(2, 32, 1, 40, 32, torch.float16, [40, 3])
    check_decode(q, k, v, lens, num_splits=3)


def test_decode_strided_inputs():
    """Caches allocated [B, S, Hkv, D] and longer than S_max (a view of the first S_max
    slots), q a view of [B, D, H] storage."""
    B, H, Hkv, S_max, D = 3, 4, 2, 60, 32
    q = torch.randn(B, D, H, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, 80, Hkv, D, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)[:, :, :S_max]
    v = torch.randn(B, 80, Hkv, D, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)[:, :, :S_max]
    lens = torch.tensor([60, 1, 33], dtype=torch.int32, device=DEVICE)
    check_decode(q, k, v, lens, num_splits=2)


def test_decode_sm_scale_and_torch_backend():
    q, k, v, lens = make_cache(2, 4, 1, 30, 64, torch.float16, [30, 9])
    check_decode(q, k, v, lens, sm_scale=0.2)
    check_decode(q, k, v, lens, backend="torch")


def test_decode_matches_prefill_of_one_query():
    """A full cache is prefill with Nq = 1 (the causal mask then hides nothing)."""
    q, k, v, lens = make_cache(2, 4, 2, 48, 32, torch.float16, [48, 48])
    dec = decode_attention(q, k, v, lens, num_splits=3).double()
    pre = fused_attention(q[:, :, None], k, v, causal=True)[:, :, 0].double()
    assert (dec - pre).abs().max().item() <= 2 * TOL[torch.float16]


def test_decode_unchecked_lengths_stay_in_bounds():
    """check_seqlens=False skips the host check; the kernels clamp lengths to S_max."""
    q, k, v, lens = make_cache(2, 4, 2, 40, 32, torch.float16, [40, 12])
    over = torch.tensor([45, 12], dtype=torch.int32, device=DEVICE)
    expected = decode_attention(q, k, v, lens, num_splits=2)
    assert torch.equal(decode_attention(q, k, v, over, num_splits=2, check_seqlens=False), expected)


@pytest.mark.parametrize("cfg", [DecodeConfig(1, 32, 4, 1), DecodeConfig(3, 16, 4, 2),
                                 DecodeConfig(7, 64, 8, 3), DecodeConfig(2, 128, 4, 1),
                                 DecodeConfig(3, 32, 4, 2, prefetch=1)])
def test_decode_explicit_config(cfg):
    """A DecodeConfig sets splits, key step, warps, stages and the L2 prefetch, whatever
    num_splits says (the tuner's candidates); a 128-key step is longer than the 100-key cache.
    The interpreter skips the prefetch; test_gpu_decode_prefetch runs it."""
    q, k, v, lens = make_cache(3, 8, 2, 100, 64, torch.float16, [100, 1, 45], seed=cfg.num_splits)
    check_decode(q, k, v, lens, num_splits=5, config=cfg)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(num_splits=0), ValueError, "config.num_splits"),
    (dict(block_n=48), ValueError, "config.block_n"),
    (dict(block_n=8), ValueError, "config.block_n"),
    (dict(num_warps=3), ValueError, "config.num_warps"),
    (dict(num_stages=0), ValueError, "config.num_stages"),
    (dict(num_splits=2.0), TypeError, "config.num_splits"),
    (dict(block_n=True), TypeError, "config.block_n"),
    (dict(prefetch=2), ValueError, "config.prefetch"),
    (dict(prefetch=True), TypeError, "config.prefetch"),
])
def test_decode_config_rejects_bad_fields(kw, exc, match):
    with pytest.raises(exc, match=match):
        DecodeConfig(**kw)


def test_decode_rejects_a_config_of_another_type():
    q, k, v, lens = make_cache(2, 4, 2, 16, 32, torch.float16, [16, 3])
    with pytest.raises(TypeError, match="config must be a tiny_gemm.DecodeConfig"):
        decode_attention(q, k, v, lens, config={"num_splits": 2})


def test_select_decode_config_reads_the_table_grid(monkeypatch):
    """The entry with the smallest B * Hkv >= the call's, then the smallest S_max >= the
    call's; outside the grid, for another head layout, or with num_splits: the heuristic."""
    grid = {(bkv, s): DecodeConfig(bkv + s // 512, 64, 4, 3) for bkv in (8, 64) for s in (512, 2048)}
    monkeypatch.setattr(attention, "load_decode_table", lambda gpu: {(128, 4): grid})
    monkeypatch.setattr(attention, "_device_info", lambda device: ("NVIDIA Test", 132))
    monkeypatch.setattr(attention, "_sm_count", lambda device: 132)
    gpu = torch.device("cuda")
    pick = lambda bkv, s, **kw: select_decode_config(bkv, s, kw.pop("D", 128), kw.pop("group", 4), gpu, **kw)  # noqa: E731
    assert pick(8, 512) == grid[(8, 512)]
    assert pick(5, 600) == grid[(8, 2048)]
    assert pick(9, 100) == grid[(64, 512)]
    assert pick(64, 2048) == grid[(64, 2048)]
    heuristic = attention.heuristic_decode_config
    assert pick(65, 512) == heuristic(65, 512, gpu)            # past the batch axis
    assert pick(8, 4096) == heuristic(8, 4096, gpu)            # past the context axis
    assert pick(8, 512, D=64) == heuristic(8, 512, gpu)        # no entries for this head dim
    assert pick(8, 512, group=8) == heuristic(8, 512, gpu)
    assert pick(8, 512, num_splits=3) == heuristic(8, 512, gpu, 3) == DecodeConfig(3, 64, 4, 3, prefetch=1)
    assert heuristic(8, 512, gpu, 8) == DecodeConfig(8, 64, 4, 3, prefetch=0)   # 64 keys per split
    # off the GPU (the interpreter) there is no table
    assert select_decode_config(8, 512, 128, 4, torch.device("cpu")) == heuristic(8, 512, torch.device("cpu"))


def test_shipped_decode_tables_are_complete_grids():
    """Every shipped table parses, each (D, kv_group) holds the full product of its batch and
    context axes (select_decode_config's rule needs it), and each entry records its check."""
    import json
    for path in sorted(attention.DECODE_CONFIG_DIR.glob("*.json")):
        table = json.loads(path.read_text())
        assert table["provenance"]["gpu"] == table["gpu"], path
        by_layout = {}
        for e in table["entries"]:
            DecodeConfig(**e["best"])
            DecodeConfig(**e["fallback"]["config"])
            assert e["rel_err"] <= 1e-2 and e["fallback"]["rel_err"] <= 1e-2, (path, e)
            assert e["batch_kv_heads"] == e["B"] * e["Hkv"] and e["kv_group"] == e["H"] // e["Hkv"]
            by_layout.setdefault((e["D"], e["kv_group"]), set()).add((e["batch_kv_heads"], e["S_max"]))
        for keys in by_layout.values():
            assert keys == {(b, s) for b, _ in keys for _, s in keys}, path


def test_decode_empty_batch():
    q, k, v, lens = make_cache(1, 4, 2, 16, 32, torch.float16, [3])
    assert decode_attention(q[:0], k[:0], v[:0], lens[:0]).shape == (0, 4, 32)


@pytest.mark.parametrize("bkv, s_max, sms, expected", [
    (128, 8192, 132, 1),      # B = 16, Hkv = 8: 128 programs fill the GPU already
    (32, 8192, 132, 4),       # B = 4: 128 programs
    (8, 8192, 132, 16),       # B = 1
    (8, 512, 132, 8),         # B = 1, a short cache: capped by the 64-key minimum split
    (1024, 8192, 132, 1),     # more programs than SMs
    (8, 50, 132, 1),          # a cache shorter than one split
])
def test_decode_num_splits_heuristic(bkv, s_max, sms, expected):
    assert decode_num_splits(bkv, s_max, sms) == expected


# --- bad input -------------------------------------------------------------------------------
def _prefill_inputs(**kw):
    q, k, v = make_qkv(1, 4, 2, 8, 16, 32, torch.float16)
    return dict(dict(q=q, k=k, v=v), **kw)


@pytest.mark.parametrize("change, exc, match", [
    (lambda a: dict(q=a["q"].float()), TypeError, "q must be float16 or bfloat16"),
    (lambda a: dict(k=a["k"].bfloat16()), TypeError, "k has dtype"),
    (lambda a: dict(v=a["v"].bfloat16()), TypeError, "v has dtype"),
    (lambda a: dict(q=a["q"][0]), ValueError, "q must have 4 dimensions"),
    (lambda a: dict(k="k"), TypeError, "k must be a torch.Tensor"),
    (lambda a: dict(q=a["q"][:, :3]), ValueError, "multiple of the number of kv heads"),
    (lambda a: dict(q=torch.randn(1, 4, 8, 48, dtype=torch.float16, device=DEVICE),
                    k=torch.randn(1, 2, 16, 48, dtype=torch.float16, device=DEVICE),
                    v=torch.randn(1, 2, 16, 48, dtype=torch.float16, device=DEVICE)), ValueError, "head dim 48"),
    (lambda a: dict(k=torch.randn(1, 2, 16, 64, dtype=torch.float16, device=DEVICE)), ValueError, "head dims differ"),
    (lambda a: dict(v=a["v"][:, :, :15]), ValueError, "v must have k's shape"),
    (lambda a: dict(k=a["k"][:, :, :7], v=a["v"][:, :, :7]), ValueError, "Nq <= Nk"),
    (lambda a: dict(k=a["k"].expand(2, -1, -1, -1), v=a["v"].expand(2, -1, -1, -1)), ValueError, "batch size"),
    (lambda a: dict(k=a["k"].to("meta"), v=a["v"].to("meta")), ValueError, "device"),
    (lambda a: dict(causal=1), TypeError, "causal must be a bool"),
    (lambda a: dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (lambda a: dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (lambda a: dict(dropout_p="0.1"), TypeError, "dropout_p"),
    (lambda a: dict(dropout_p=0.1, dropout_seed=-1), ValueError, "dropout_seed"),
    (lambda a: dict(dropout_p=0.1, dropout_seed=1.5), TypeError, "dropout_seed"),
    (lambda a: dict(sm_scale=0.0), ValueError, "sm_scale"),
    (lambda a: dict(sm_scale="1"), TypeError, "sm_scale"),
    (lambda a: dict(backend="cuda"), ValueError, "backend"),
    (lambda a: dict(out=torch.empty(1, 4, 8, 31, dtype=torch.float16, device=DEVICE)), ValueError, "out must have shape"),
    (lambda a: dict(out=torch.empty(1, 4, 8, 32, dtype=torch.float32, device=DEVICE)), TypeError, "out must have q's dtype"),
    (lambda a: dict(out=torch.empty(1, 4, 32, 8, dtype=torch.float16, device=DEVICE).transpose(2, 3)),
     ValueError, "out must be contiguous"),
])
def test_prefill_bad_input(change, exc, match):
    args = _prefill_inputs()
    args.update(change(args))
    with pytest.raises(exc, match=match):
        fused_attention(**args)


def _decode_inputs():
    q, k, v, lens = make_cache(2, 4, 2, 16, 32, torch.float16, [16, 3])
    return dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lens)


@pytest.mark.parametrize("change, exc, match", [
    (lambda a: dict(cache_seqlens=a["cache_seqlens"].long()), TypeError, "cache_seqlens must be int32"),
    (lambda a: dict(cache_seqlens=[16, 3]), TypeError, "cache_seqlens must be a torch.Tensor"),
    (lambda a: dict(cache_seqlens=a["cache_seqlens"] + 1), ValueError, r"cache_seqlens must lie in \[1, S_max = 16\]"),
    (lambda a: dict(cache_seqlens=a["cache_seqlens"] * 0), ValueError, "cache_seqlens must lie"),
    (lambda a: dict(cache_seqlens=a["cache_seqlens"][:1]), ValueError, "cache_seqlens must have shape"),
    (lambda a: dict(cache_seqlens=a["cache_seqlens"].to("meta")), ValueError, "cache_seqlens is on"),
    (lambda a: dict(q=a["q"][:, None]), ValueError, "q must have 3 dimensions"),
    (lambda a: dict(q=a["q"][:, :3]), ValueError, "multiple of the number of kv heads"),
    (lambda a: dict(q=a["q"].bfloat16()), TypeError, "k_cache has dtype"),
    (lambda a: dict(v_cache=a["v_cache"][..., :16]), ValueError, "head dims differ"),
    (lambda a: dict(v_cache=a["v_cache"].to("meta")), ValueError, "device"),
    (lambda a: dict(num_splits=0), ValueError, "num_splits"),
    (lambda a: dict(num_splits=2.0), TypeError, "num_splits"),
    (lambda a: dict(sm_scale=-1.0), ValueError, "sm_scale"),
    (lambda a: dict(check_seqlens=None), TypeError, "check_seqlens"),
    (lambda a: dict(out=torch.empty(2, 4, 16, dtype=torch.float16, device=DEVICE)), ValueError, "out must have shape"),
])
def test_decode_bad_input(change, exc, match):
    args = _decode_inputs()
    args.update(change(args))
    with pytest.raises(exc, match=match):
        decode_attention(**args)


def test_dropout_mask_bad_input():
    with pytest.raises(ValueError, match="dropout_seed must be given"):
        attention_dropout_mask(1, 1, 4, 4, 0.5, None, DEVICE)
    with pytest.raises(ValueError, match="Nk"):
        attention_dropout_mask(1, 1, 4, -1, 0.5, 3, DEVICE)


def test_triton_backend_needs_cuda_or_interpreter():
    q, k, v = make_qkv(1, 2, 1, 4, 8, 32, torch.float16)
    if q.is_cuda or INTERPRET:
        check_prefill(q, k, v, backend="triton")
    else:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            fused_attention(q, k, v, backend="triton")


# --- torch.library ops -----------------------------------------------------------------------
def test_opcheck_fused_attention():
    q, k, v = make_qkv(1, 4, 2, 5, 20, 32, torch.float16)
    torch.library.opcheck(torch.ops.tiny_gemm.fused_attention.default, (q, k, v, True, 0.0, 0.0, -1))
    torch.library.opcheck(torch.ops.tiny_gemm.fused_attention.default, (q, k, v, False, 0.25, 0.2, 17))


def test_opcheck_decode_attention():
    q, k, v, lens = make_cache(2, 4, 2, 40, 32, torch.bfloat16, [40, 5])
    torch.library.opcheck(torch.ops.tiny_gemm.decode_attention.default, (q, k, v, lens, 0, 0.0))
    torch.library.opcheck(torch.ops.tiny_gemm.decode_attention.default, (q, k, v, lens, 3, 0.1))


def test_op_dropout_needs_a_seed():
    q, k, v = make_qkv(1, 2, 1, 4, 8, 32, torch.float16)
    with pytest.raises(ValueError, match="dropout_seed"):
        torch.ops.tiny_gemm.fused_attention(q, k, v, True, 0.5, 0.0, -1)
    out = torch.ops.tiny_gemm.fused_attention(q, k, v, True, 0.5, 0.0, 3)
    assert torch.equal(out, fused_attention(q, k, v, True, 0.5, dropout_seed=3))


def test_torch_compile_fullgraph():
    q, k, v = make_qkv(1, 4, 2, 6, 20, 32, torch.float16, seed=1)
    qd, kc, vc, lens = make_cache(2, 4, 1, 24, 32, torch.float16, [24, 7], seed=2)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def layer(q, k, v, qd, kc, vc, lens):
        o = torch.ops.tiny_gemm.fused_attention(q, k, v, True, 0.0, 0.0, -1)
        d = torch.ops.tiny_gemm.decode_attention(qd, kc, vc, lens, 0, 0.0)
        return 2 * o, d + 1

    o, d = layer(q, k, v, qd, kc, vc, lens)
    assert_close_to_ref(o, 2 * attention_reference(q, k, v, True), q.dtype)
    assert_close_to_ref(d, decode_attention_reference(qd, kc, vc, lens) + 1, q.dtype)


# --- GPU only --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_prefill_long(D, causal, dtype):
    q, k, v = make_qkv(1, 16, 4, 2048, 2048, D, dtype, seed=D)
    check_prefill(q, k, v, causal)


@pytest.mark.gpu
def test_gpu_prefill_chunk_on_cache():
    q, k, v = make_qkv(2, 32, 8, 333, 4000, 128, torch.bfloat16)
    check_prefill(q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_dropout_long(causal):
    B, H, N = 1, 8, 1024
    q, k, v = make_qkv(B, H, 2, N, N, 128, torch.float16)
    out = run_prefill(q, k, v, causal, dropout_p=0.2, dropout_seed=77)
    mask = attention_dropout_mask(B, H, N, N, 0.2, 77, DEVICE)
    assert torch.equal(mask, attention_dropout_mask(B, H, N, N, 0.2, 77, DEVICE, backend="torch"))
    assert_close_to_ref(out, attention_reference(q, k, v, causal, 0.2, dropout_mask=mask), q.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 1, 16, 200])
def test_gpu_decode_long(num_splits, dtype):
    g = torch.Generator().manual_seed(0)
    lens = [1, 8192, 4097, 63] + torch.randint(1, 8193, (12,), generator=g).tolist()
    q, k, v, lens = make_cache(16, 32, 8, 8192, 128, dtype, lens)
    check_decode(q, k, v, lens, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("cfg", [DecodeConfig(1, 64, 4, 3, prefetch=1), DecodeConfig(16, 64, 4, 3, prefetch=1),
                                 DecodeConfig(3, 128, 8, 4, prefetch=1), DecodeConfig(64, 32, 4, 2, prefetch=1)])
def test_gpu_decode_prefetch(cfg, D):
    """The L2 prefetch of each split's first block changes nothing: ragged lengths (splits
    past a sequence's end prefetch and return), a first block that passes S_max = 47 * 64 + 1
    (64 splits of 32-key steps: the last split starts at key 3008; the prefetch addresses are
    clamped), strided caches."""
    lens = [1, 3008, 2049, 64, 777, 3009]
    q, k, v, lens = make_cache(6, 16, 4, 3009, D, torch.float16, lens, seed=D + cfg.num_splits)
    check_decode(q, k, v, lens, config=cfg)
    ks = torch.randn(6, 3009, 4, D, dtype=torch.float16, device=DEVICE).transpose(1, 2)   # [B, Hkv, S, D], strided
    vs = torch.randn(6, 3009, 4, D, dtype=torch.float16, device=DEVICE).transpose(1, 2)
    check_decode(q, ks, vs, lens, config=cfg)


@pytest.mark.gpu
def test_gpu_decode_cuda_graph():
    """Captured once, replayed with new queries and lengths (no host check during capture)."""
    q, k, v, lens = make_cache(8, 32, 8, 4096, 128, torch.float16, [4096] * 8)
    decode_attention(q, k, v, lens)                      # compile outside the capture

    def refill():
        q.copy_(torch.randn_like(q))
        lens.copy_(torch.tensor([1, 4096, 100, 2000, 3, 4095, 17, 256], dtype=torch.int32))

    out = replay_after(lambda: decode_attention(q, k, v, lens), refill)
    assert_close_to_ref(out, decode_attention_reference(q, k, v, lens), q.dtype)
