"""Scratch: the SplitK/StreamK reduction tail, with the last contributor loading one partial
slot at a time (REDUCE_UNROLL = 1, the loop before f7a9f6d: one L2 round trip per slot)
against 2, 4 and 8 slots at once, on each shape's tuned config (and StreamK beside SplitK),
rounds interleaved, tinygemm beside them. "rule" is what w4a16._reduce_unroll picked when it ran (the rule
before the one it led to: 8, at most 64 fp32 registers per thread of loaded slots). The
results are bitwise equal (same K-order sum); checked.
Run: PYTHONPATH=kernels:experiments python reduce_ab.py"""
import statistics
from functools import partial

import torch

from tiny_gemm import timing
from tiny_gemm import w4a16 as W
from tiny_gemm.quant import quantize
from bench_w4a16 import GROUP_SIZE, clone_int4, tinygemm_weight

AUTO = W._reduce_unroll
bw = timing.copy_bandwidth()
print(torch.cuda.get_device_name(), f"copy {bw / 1e12:.2f} TB/s", flush=True)
ROUNDS = 3
SHAPES = ((4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024),
          (8192, 1024), (8192, 8192), (28672, 8192), (8192, 28672))
UNROLLS = (1, 2, 4, 8)
print(f"{'M':>2} {'K':>5} {'N':>5}  {'config':38}" + "".join(f" {'U' + str(u):>7}" for u in UNROLLS)
      + "".join(f" {str(u) + '/1':>5}" for u in UNROLLS[1:]) + f" {'tinygemm':>8}", flush=True)
for K, N in SHAPES:
    qw = quantize(torch.randn(N, K, device="cuda").half(), GROUP_SIZE)
    R = timing.rotations(qw.nbytes)
    qws = [qw] + [clone_int4(qw) for _ in range(R - 1)]
    tg = [tinygemm_weight(q) for q in qws]
    for M in (1, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        out = torch.empty(M, N, device="cuda", dtype=torch.float16)
        ref = W.w4a16_reference(x, qw)
        xb = x.to(torch.bfloat16)
        tg_fns = [partial(torch.ops.aten._weight_int4pack_mm, xb, w, GROUP_SIZE, sz) for w, sz in tg]
        for dec in ("auto", "splitk", "streamk"):
            cfg = W.select_config(M, N, K, GROUP_SIZE, x.device, dec)
            if dec != "auto" and cfg == W.select_config(M, N, K, GROUP_SIZE, x.device):
                continue
            res = {}
            for u in UNROLLS:
                W._reduce_unroll = lambda *a, u=u: u
                out.fill_(float("nan"))
                W._launch(x, qw, out, cfg)
                res[u] = out.clone()
                assert torch.equal(res[u], res[1]), (K, N, M, u)
            err = ((res[1].double() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, err
            fns = {u: [partial(W._launch, x, q, out, cfg) for q in qws] for u in UNROLLS}
            fns["tg"] = tg_fns
            times = {k: [] for k in fns}
            for _ in range(ROUNDS):
                for tag in fns:
                    W._reduce_unroll = (lambda *a, u=tag: u) if tag != "tg" else AUTO
                    times[tag].append(timing.time_graph(fns[tag], replays=15)["median_us"])
            W._reduce_unroll = AUTO
            med = {k: statistics.median(v) for k, v in times.items()}
            rule = AUTO(cfg.decomposition, cfg.block_m, cfg.block_n, cfg.num_warps)
            c = f"{dec[:4]}:{cfg.decomposition} m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} k{cfg.split_k} rule {rule}"
            print(f"{M:>2} {K:>5} {N:>5}  {c:38}" + "".join(f" {med[u]:7.2f}" for u in UNROLLS)
                  + "".join(f" {med[u] / med[1]:5.3f}" for u in UNROLLS[1:])
                  + f" {med['tg']:8.2f}", flush=True)
    del qws, tg
    torch.cuda.empty_cache()
