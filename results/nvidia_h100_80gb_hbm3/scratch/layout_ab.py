"""Scratch: the packed weight in its row-major layout [N, K/2] against a K-blocked one
[K/2/64, N, 64] (one K-iteration of a tile = one contiguous run of BLOCK_N * 64 bytes), same
kernel and configs, rounds interleaved; tinygemm and a torch read-only reduction (sum of the
same bytes as float32) as yardsticks of the machine and of what a plain read stream reaches.
Ran at 1b9b13a, when Int4Weight.packed was row-major [N, K/2] and the kernel took either
layout (a 3-D packed tensor selected the blocked one); it does not run on later code.
Run: PYTHONPATH=kernels:experiments python layout_ab.py"""
import statistics
import sys
from dataclasses import replace
from functools import partial

import torch

from tiny_gemm import timing
from tiny_gemm.quant import quantize
from tiny_gemm.w4a16 import W4A16Config, _launch, select_config, w4a16_reference
from bench_w4a16 import GROUP_SIZE, clone_int4, tinygemm_weight

WB = 64


class Blocked:
    def __init__(self, qw):
        N, K = qw.shape
        kb = -(-qw.packed.shape[1] // WB)
        p = torch.zeros(N, kb * WB, dtype=torch.uint8, device=qw.device)
        p[:, :qw.packed.shape[1]] = qw.packed
        self.packed = p.view(N, kb, WB).permute(1, 0, 2).contiguous()
        self.scales, self.zeros = qw.scales, qw.zeros
        self.out_features, self.group_size, self.shape = N, qw.group_size, qw.shape

    def clone(self):
        b = object.__new__(Blocked)
        b.__dict__.update(self.__dict__)
        b.packed, b.scales, b.zeros = self.packed.clone(), self.scales.clone(), self.zeros.clone()
        return b


def call(x, w, cfg, out):
    _launch(x, w, out, cfg)


bw = timing.copy_bandwidth()
print(torch.cuda.get_device_name(), f"copy {bw / 1e12:.2f} TB/s", flush=True)
ROUNDS = 3
for K, N in ((14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672), (4096, 4096)):
    qw = quantize(torch.randn(N, K, device="cuda").half(), GROUP_SIZE)
    R = timing.rotations(qw.nbytes)
    qws = [qw] + [clone_int4(q) for q in [qw] * (R - 1)]
    bls = [Blocked(q) for q in qws]
    tg = [tinygemm_weight(q) for q in qws]
    flt = [q.packed.view(torch.float32) for q in qws]
    for M in (1, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        ref = w4a16_reference(x, qw)
        floor = timing.floor_us(timing.w4a16_bytes(M, N, K, GROUP_SIZE), bw)
        base = select_config(M, N, K, GROUP_SIZE, x.device)
        cands = [base]
        for bn in (64, 128, 256):
            for sk in (4, 8, 16):
                for w in ((2, 4) if bn == 128 else (2,) if bn == 64 else (4,)):
                    c = W4A16Config("splitk", block_m=16, block_n=bn, block_k=128, split_k=sk, num_warps=w)
                    if c not in cands:
                        cands.append(c)
        if M == 1:
            cands += [W4A16Config("splitk", block_m=1, block_n=bn, block_k=128, split_k=sk, num_warps=4)
                      for bn in (64, 128) for sk in (4, 8)]
        fns = {}
        outs = torch.empty(M, N, device="cuda", dtype=torch.float16)
        for c in cands:
            for tag, ws in (("row", qws), ("blk", bls)):
                outs.fill_(float("nan"))
                _launch(x, ws[0], outs, c)
                err = ((outs.double() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (c, tag, err)
                fns[(c, tag)] = [partial(call, x, w, c, outs) for w in ws]
        xb = x.to(torch.bfloat16)
        fns["tinygemm"] = [partial(torch.ops.aten._weight_int4pack_mm, xb, w, GROUP_SIZE, sz) for w, sz in tg]
        fns["sum_f32"] = [partial(torch.sum, f) for f in flt]
        times = {k: [] for k in fns}
        for _ in range(ROUNDS):
            for k, f in fns.items():
                times[k].append(timing.time_graph(f, replays=15)["median_us"])
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"== M={M} K={K} N={N} floor {floor:.2f} us | tinygemm {med['tinygemm']:.2f} | "
              f"sum_f32 of the packed bytes {med['sum_f32']:.2f} ({floor / med['sum_f32'] * 100:.0f}% floor)", flush=True)
        rows = sorted(((med[(c, 'row')], med[(c, 'blk')], c) for c in cands), key=lambda r: min(r[:2]))
        for r, b, c in rows[:8] + ([] if base in [x[2] for x in rows[:8]] else [x for x in rows if x[2] == base]):
            star = "*" if c == base else " "
            print(f"  {star} m{c.block_m:<2} n{c.block_n:<3} s{c.split_k:<2} w{c.num_warps}  row {r:7.2f}  blk {b:7.2f}"
                  f"  blk/row {b / r:5.3f}  best {floor / min(r, b) * 100:4.1f}% floor", flush=True)
    del qws, bls, tg, flt
    torch.cuda.empty_cache()
