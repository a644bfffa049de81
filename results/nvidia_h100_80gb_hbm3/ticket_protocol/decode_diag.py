"""Where decode_attention's time goes, and variants of its split kernel, against the shipped
kernel and SDPA (H 32, Hkv 8, D 128, fp16), interleaved rounds in one process.

Variants (a copy of _decode_split_kernel with switches):
  peel     the first key block of each split is loaded before the sequence length is known
           (masked by S_max, which is always in bounds; keys >= the length are masked after),
           so the length's load is not a round trip ahead of the first K/V bytes
  const    diagnostic: seqlen = S_max, no load (wrong for ragged caches)
  nocomb   diagnostic: splits write their partials and stop (no ticket, no combine: wrong)
  nofence2 the winner of the ticket skips its second fence (the barrier after the acquire
           atomic orders the other threads' loads; diagnostic of that fence's cost)
  empty    diagnostic: every program returns at once
Run: PYTHONPATH=kernels:experiments python decode_diag.py [--quick]"""
import json
import sys
import time
from functools import partial

import torch
import triton
import triton.language as tl

import tiny_gemm.attention as A
from tiny_gemm import timing
from tiny_gemm.attention import _combine_splits, _dot
from tiny_gemm.w4a16 import _last_to_arrive, _tile_locks
from bench_attention import Problem, make_inputs, sdpa


@triton.jit
def _var_kernel(
        q_ptr, k_ptr, v_ptr, seqlens_ptr, part_out_ptr, part_lse_ptr, out_ptr, lock_ptr,
        H, Hkv, kv_group, S_max, num_splits, chunk,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_od,
        qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
        NUM_THREADS: tl.constexpr, INTERPRET: tl.constexpr,
        PEEL: tl.constexpr, CONST: tl.constexpr, NOCOMB: tl.constexpr, FENCE2: tl.constexpr,
        EMPTY: tl.constexpr):
    if EMPTY:
        return
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    hk = pid % Hkv
    lo = split * chunk
    rows = tl.arange(0, BLOCK_H)
    heads = hk * kv_group + rows
    row_ok = rows < kv_group
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    k_ptrs = k_ptr + b64 * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_ptr + b64 * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if CONST:
        seqlen = S_max
    else:
        seqlen_raw = tl.load(seqlens_ptr + b)
    if PEEL:
        cols0 = lo + offs_n
        k0 = tl.load(k_ptrs + lo * stride_kn, mask=cols0[None, :] < S_max, other=0.0)
        v0 = tl.load(v_ptrs + lo * stride_vn, mask=cols0[:, None] < S_max, other=0.0)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    if not CONST:
        seqlen = tl.minimum(seqlen_raw, S_max)
    if lo >= seqlen:
        return
    hi = tl.minimum(lo + chunk, seqlen)

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, HEAD_DIM), tl.float32)
    start = lo
    if PEEL:
        cols0 = lo + offs_n
        qk = _dot(q, k0, tl.zeros((BLOCK_H, BLOCK_N), tl.float32), INTERPRET)
        qk = tl.where(cols0[None, :] < hi, qk, float("-inf"))
        m_i = tl.max(qk, 1) * qk_scale
        p = tl.math.exp2(qk * qk_scale - m_i[:, None])
        l_i = tl.sum(p, 1)
        v0 = tl.where(cols0[:, None] < hi, v0, 0.0)
        acc = _dot(p.to(v0.dtype), v0, acc, INTERPRET)
        start = lo + BLOCK_N
    for start_n in range(start, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_ptrs + start_n * stride_kn, mask=cols[None, :] < hi, other=0.0)
        qk = _dot(q, k, tl.zeros((BLOCK_H, BLOCK_N), tl.float32), INTERPRET)
        qk = tl.where(cols[None, :] < hi, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
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
        if not NOCOMB:
            n_valid = tl.cdiv(seqlen, chunk)
            if FENCE2:
                last = _last_to_arrive(lock_ptr, pid, n_valid, NUM_THREADS, INTERPRET)
            else:
                last = _arrive_nofence2(lock_ptr, pid, n_valid, NUM_THREADS, INTERPRET)
            if last:
                _combine_splits(part_out_ptr, part_lse_ptr, out_ptr, b64, hk * kv_group, kv_group, H,
                                num_splits, n_valid, stride_ob, stride_oh, stride_od,
                                HEAD_DIM, BLOCK_G, BLOCK_S)
                tl.store(lock_ptr + pid, 0)


from tiny_gemm.w4a16 import _fence_gpu  # noqa: E402


@triton.jit
def _arrive_nofence2(lock_ptr, idx, n_parts, NUM_THREADS: tl.constexpr, INTERPRET: tl.constexpr):
    _fence_gpu(NUM_THREADS, INTERPRET)
    tl.debug_barrier()
    ticket = tl.atomic_add(lock_ptr + idx, 1, sem="acq_rel")
    return ticket == n_parts - 1


VARIANTS = {"ship": None,
            "peel": dict(PEEL=True),
            "const": dict(CONST=True),
            "peel+const": dict(PEEL=True, CONST=True),
            "nofence2": dict(FENCE2=False),
            "peel+nofence2": dict(PEEL=True, FENCE2=False),
            "nocomb": dict(NOCOMB=True),
            "empty": dict(EMPTY=True)}
WRONG = {"nocomb", "empty"}


def var_decode(q, k_cache, v_cache, lens, out, splits=None, cfg=None, **flags):
    B, H, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    splits = splits or A.decode_num_splits(B * Hkv, S_max, A._sm_count(q.device))
    block_n, num_warps, num_stages = cfg or A._decode_config(q.device, splits)
    chunk = triton.cdiv(triton.cdiv(S_max, splits), block_n) * block_n
    splits = triton.cdiv(S_max, chunk)
    direct = splits == 1
    part_out = torch.empty(0 if direct else B * H * splits * D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(0 if direct else B * H * splits, dtype=torch.float32, device=q.device)
    kv_group = H // Hkv
    locks = part_lse if direct else _tile_locks(q.device, B * Hkv)
    f = dict(PEEL=False, CONST=False, NOCOMB=False, FENCE2=True, EMPTY=False)
    f.update(flags)
    _var_kernel[(B * Hkv, splits)](
        q, k_cache, v_cache, lens, part_out, part_lse, out, locks,
        H, Hkv, kv_group, S_max, splits, chunk,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        D ** -0.5 * A.LOG2E,
        HEAD_DIM=D, BLOCK_H=max(16, triton.next_power_of_2(kv_group)), BLOCK_N=block_n,
        DIRECT=direct, BLOCK_G=triton.next_power_of_2(kv_group),
        BLOCK_S=min(triton.next_power_of_2(splits), max(1, 8192 // (triton.next_power_of_2(kv_group) * D))),
        NUM_THREADS=num_warps * 32, INTERPRET=A._interpreting(), num_warps=num_warps, num_stages=num_stages, **f)
    return out


def main():
    quick = "--quick" in sys.argv
    gpu = torch.cuda.get_device_name()
    print(gpu, flush=True)
    bw = timing.copy_bandwidth()
    rounds = 3
    rows = []
    grid = [(B, ctx) for B in (1, 4, 16) for ctx in (512, 2048, 8192)]
    for B, ctx in grid:
        p = Problem("decode", B, 32, 8, 1, ctx, 128, torch.float16)
        inp = make_inputs(p)
        floor = timing.floor_us(p.bytes_per_call(), bw)
        q3 = [q.squeeze(2).contiguous() for q in inp.q]
        # ragged check: lengths 1 .. ctx, so variants are checked on empty splits too
        lens_r = torch.randint(1, ctx + 1, (B,), dtype=torch.int32, device="cuda")
        lens_r[0] = 1
        lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        ref = A.decode_attention_reference(q3[0], inp.k[0], inp.v[0], lens, None, torch.float64)
        ref_r = A.decode_attention_reference(q3[0], inp.k[0], inp.v[0], lens_r, None, torch.float64)
        cands = {}
        extra = [(None, None)]
        if B == 1 and ctx == 512:
            extra += [(4, (64, 4, 3)), (8, (64, 4, 2)), (16, (32, 4, 3)), (16, (32, 2, 3)), (32, (16, 2, 2))]
        if B == 16:
            extra += [(1, (64, 4, 5)), (1, (128, 4, 3)), (1, (128, 8, 4))]
        for splits, cfg in extra:
            for name, flags in VARIANTS.items():
                if cfg is not None and name not in ("ship", "peel", "peel+nofence2"):
                    continue
                label = name if cfg is None else f"{name} s{splits} {cfg}"
                if flags is None:
                    if cfg is not None:
                        fn1 = lambda q, k, v, l, out, s=splits, c=cfg: var_decode(q, k, v, l, out, s, c)
                    else:
                        fn1 = lambda q, k, v, l, out: A.decode_attention(q, k, v, l, out=out, check_seqlens=False)
                else:
                    fn1 = partial(var_decode, splits=splits, cfg=cfg, **flags)
                errs = []
                for l, r in ((lens, ref), (lens_r, ref_r)):
                    if name in ("const",) and l is lens_r:
                        continue
                    out = torch.full_like(q3[0], float("nan"))
                    fn1(q3[0], inp.k[0], inp.v[0], l, out)
                    torch.cuda.synchronize()
                    errs.append(((out.double() - r).norm() / r.norm()).item())
                outs = [torch.empty_like(q) for q in q3]
                cands[label] = ([partial(fn1, q, k, v, lens, o) for q, k, v, o in zip(q3, inp.k, inp.v, outs)],
                                max(errs))
        cands["sdpa_default"] = ([partial(sdpa, q, k, v, False, None) for q, k, v in zip(inp.q, inp.k, inp.v)], 0.0)
        times = {k: [] for k in cands}
        for _ in range(rounds):
            for k, (fns, _) in cands.items():
                times[k].append(timing.time_graph(fns, replays=20 if not quick else 5)["median_us"])
        ship = sorted(times["ship"])[rounds // 2]
        line = f"B={B:2d} ctx={ctx:5d} floor {floor:6.2f}"
        print(line, flush=True)
        for k, (_, err) in cands.items():
            t = sorted(times[k])[rounds // 2]
            ok = "WRONG-BY-DESIGN" if k.split()[0] in WRONG else ("ok" if err < 1e-2 else f"BAD {err:.1e}")
            print(f"    {k:32s} {t:8.2f} us  {t / ship:5.3f}x ship  {100 * floor / t:5.1f}% floor  err {err:.1e} {ok}", flush=True)
            rows.append(dict(gpu=gpu, B=B, ctx=ctx, variant=k, time_us=t, rounds=times[k], floor_us=floor,
                             rel_err=err))
        del inp, q3, cands
        torch.cuda.empty_cache()
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    if out:
        prov = timing.provenance({"script": "decode_diag.py", "rounds": rounds})
        with open(out, "w") as f:
            json.dump({"provenance": prov, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
