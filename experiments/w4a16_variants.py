"""Which tile body? Times alternative ways to unpack and multiply one INT4 tile, on one GPU, in
one run, with the same grid (SplitK, fp32 atomics into a zeroed buffer) for all of them, and
reports each compiled kernel's SASS instruction mix. The package's kernel uses the winner.

Variants (BLOCK_K / 2 byte rows of BLOCK_N packed codes per tile):
  join        unpack lo/hi nibbles, interleave them with join/permute/reshape, one dot
  dual_magic  x split into even and odd k; two dots on (OFFSET + q) built with 16-bit ORs
  dual_i2f    the same with int->float conversions of the codes
  fma         no tensor cores (M = 1): dequantize each weight (int->float), fp32 FMAs, reduce at the end
  fma_magic   the same, the code made a float by (q << 19) | 0x3F800000 = 1 + q/16 (no I2F)

    python experiments/w4a16_variants.py [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from tiny_gemm import quantize, w4a16_reference
from tiny_gemm.quant import pack_rows
from tiny_gemm.timing import copy_bandwidth, floor_us, provenance, rotations, time_graph, w4a16_bytes

# inspect_w4a16.py sits beside this file; share its SASS parser rather than copy it
sys.path.insert(0, str(Path(__file__).resolve().parent))
from inspect_w4a16 import sass_mix  # noqa: E402

VARIANTS = {"join": 0, "dual_magic": 1, "dual_i2f": 2, "fma": 3, "fma_magic": 4}


@triton.jit
def _variant_kernel(x_ptr, w_ptr, s_ptr, z_ptr, acc_ptr, M, N, K, group_size, iters_per_split,
                    VARIANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    HALF: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, HALF)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc2 = tl.zeros((HALF, BLOCK_N), tl.float32)
    it_lo = split * iters_per_split
    for it in range(it_lo, it_lo + iters_per_split):
        k0 = it * BLOCK_K
        p = tl.load(w_ptr + offs_n[None, :] * (K // 2) + (k0 // 2 + offs_r)[:, None], mask=mask_n[None, :], other=0)
        g = k0 // group_size
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if VARIANT >= 3:
            xe = tl.load(x_ptr + k0 + 2 * offs_r).to(tl.float32)
            xo = tl.load(x_ptr + k0 + 2 * offs_r + 1).to(tl.float32)
            if VARIANT == 3:
                wl = ((p & 0xF).to(tl.float32) - z[None, :]) * s[None, :]
                wh = ((p >> 4).to(tl.float32) - z[None, :]) * s[None, :]
            else:
                p32 = p.to(tl.int32)
                s16 = 16.0 * s
                c = -(1.0 + z / 16.0) * s16
                wl = (((p32 << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True) * s16[None, :] + c[None, :]
                wh = (((p32 << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True) * s16[None, :] + c[None, :]
            acc2 += xe[:, None] * wl + xo[:, None] * wh
        else:
            if VARIANT == 0:
                x = tl.load(x_ptr + offs_m[:, None] * K + k0 + offs_k[None, :], mask=mask_m[:, None], other=0.0)
                p16 = p.to(tl.int16)
                lo = ((p16 & 0xF) | 0x6400).to(tl.float16, bitcast=True)
                hi = ((p16 >> 4) | 0x6400).to(tl.float16, bitcast=True)
                w = tl.join(lo, hi).permute(0, 2, 1).reshape(BLOCK_K, BLOCK_N)
                dot = tl.dot(x, w)
                xs = tl.sum(x.to(tl.float32), axis=1)
                zz = z + 1024.0
            else:
                xe = tl.load(x_ptr + offs_m[:, None] * K + k0 + 2 * offs_r[None, :], mask=mask_m[:, None], other=0.0)
                xo = tl.load(x_ptr + offs_m[:, None] * K + k0 + 2 * offs_r[None, :] + 1, mask=mask_m[:, None], other=0.0)
                if VARIANT == 1:
                    p16 = p.to(tl.int16)
                    lo = ((p16 & 0xF) | 0x6400).to(tl.float16, bitcast=True)
                    hi = ((p16 >> 4) | 0x6400).to(tl.float16, bitcast=True)
                    zz = z + 1024.0
                else:
                    lo = (p & 0xF).to(tl.float16)
                    hi = (p >> 4).to(tl.float16)
                    zz = z
                dot = tl.dot(xe, lo) + tl.dot(xo, hi)
                xs = tl.sum(xe.to(tl.float32), axis=1) + tl.sum(xo.to(tl.float32), axis=1)
            acc += s[None, :] * (dot - xs[:, None] * zz[None, :])
    if VARIANT >= 3:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32) + tl.sum(acc2, axis=0)[None, :]
    tl.atomic_add(acc_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                  mask=mask_m[:, None] & mask_n[None, :], sem="relaxed")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU")
        return
    bw = copy_bandwidth()
    rows = []
    for K, N in ((4096, 14336), (8192, 28672)):
        qw = quantize(torch.randn(N, K, dtype=torch.float16, device="cuda"), 128)
        nrot = rotations(qw.nbytes)
        row_major = pack_rows(qw.codes())   # these kernels read the row-major [N, K/2] bytes
        copies = [(row_major.clone(), qw.scales.clone(), qw.zeros.clone()) for _ in range(nrot)]
        for M in (1, 16):
            x = torch.randn(M, K, dtype=torch.float16, device="cuda")
            ref = w4a16_reference(x, qw)
            floor = floor_us(w4a16_bytes(M, N, K, 128), bw)
            for name, v in VARIANTS.items():
                if v >= 3 and M != 1:
                    continue
                for bn, bk, warps, stages, split in ((64, 128, 4, 3, 4), (128, 128, 4, 3, 4), (64, 128, 4, 4, 8),
                                                     (128, 128, 8, 3, 2), (256, 128, 8, 3, 2), (32, 128, 4, 3, 8)):
                    k_iters = K // bk
                    per = k_iters // split
                    bm = 1 if v >= 3 else 16
                    accs = [torch.zeros(M, N, dtype=torch.float32, device="cuda") for _ in range(nrot)]
                    grid = (triton.cdiv(N, bn), split)

                    def call(i, grid=grid, bm=bm, bn=bn, bk=bk, per=per, warps=warps, stages=stages, v=v):
                        p, s, z = copies[i]
                        return _variant_kernel[grid](x, p, s, z, accs[i], M, N, K, 128, per, VARIANT=v,
                                                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                     num_warps=warps, num_stages=stages)
                    kern = call(0)
                    torch.cuda.synchronize()
                    err = ((accs[0].double() - ref).norm() / ref.norm()).item()
                    # timing: the buffers keep accumulating, which does not change the work
                    t = time_graph([lambda i=i: call(i) for i in range(nrot)], replays=10)
                    row = dict(variant=name, M=M, K=K, N=N, block_n=bn, block_k=bk, num_warps=warps,
                               num_stages=stages, split_k=split, time_us=t["median_us"], floor_us=floor,
                               pct_floor=100 * floor / t["median_us"], rel_err=err, n_regs=kern.n_regs,
                               n_spills=kern.n_spills, **sass_mix(kern))
                    rows.append(row)
                    print(f"{name:11s} M={M:2d} K={K} N={N} bn={bn:3d} w{warps} s{stages} k{split}: "
                          f"{row['time_us']:8.2f} us {row['pct_floor']:5.1f}%  err {err:.1e}  regs {kern.n_regs} "
                          f"spills {kern.n_spills}  " + " ".join(f"{k}={row.get(k)}" for k in ("HMMA", "I2F", "LOP3", "PRMT", "LDS", "STS", "BAR", "total")),
                          flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "w4a16_variants.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    (out / "w4a16_variants.json").write_text(json.dumps(provenance({"bandwidth": bw}), indent=1))
    best = {}
    for r in rows:
        key = (r["variant"], r["M"], r["K"], r["N"])
        if r["rel_err"] < 1e-2 and (key not in best or r["time_us"] < best[key]["time_us"]):
            best[key] = r
    print("\nbest per variant")
    for (v, M, K, N), r in sorted(best.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[1]["time_us"])):
        print(f"{v:11s} M={M:2d} K={K:5d} N={N:5d}  {r['time_us']:8.2f} us  {r['pct_floor']:5.1f}% of floor  "
              f"(bn {r['block_n']} w{r['num_warps']} s{r['num_stages']} k{r['split_k']})")


if __name__ == "__main__":
    main()
