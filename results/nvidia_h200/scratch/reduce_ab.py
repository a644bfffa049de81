"""Scratch: the SplitK/StreamK reduction tail, with the last contributor loading one partial
slot at a time (REDUCE_UNROLL = 1, the loop before this change: one L2 round trip per slot)
against UNROLL slots at once (w4a16._reduce_unroll), on each shape's tuned config, rounds
interleaved, tinygemm beside them. The results are bitwise equal (same K-order sum); checked.
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
print(f"{'M':>2} {'K':>5} {'N':>5}  config                       {'U=1':>7} {'U=auto':>7}  auto/1  tinygemm  vs tg", flush=True)
for K, N in SHAPES:
    qw = quantize(torch.randn(N, K, device="cuda").half(), GROUP_SIZE)
    R = timing.rotations(qw.nbytes)
    qws = [qw] + [clone_int4(qw) for _ in range(R - 1)]
    tg = [tinygemm_weight(q) for q in qws]
    for M in (1, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        cfg = W.select_config(M, N, K, GROUP_SIZE, x.device)
        out = torch.empty(M, N, device="cuda", dtype=torch.float16)
        variants = {"1": lambda *a: 1, "auto": AUTO}
        res = {}
        for tag, fn in variants.items():
            W._reduce_unroll = fn
            out.fill_(float("nan"))
            W._launch(x, qw, out, cfg)
            res[tag] = out.clone()
        assert torch.equal(res["1"], res["auto"]), (K, N, M)
        ref = W.w4a16_reference(x, qw)
        err = ((res["auto"].double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, err
        fns = {tag: [partial(W._launch, x, q, out, cfg) for q in qws] for tag in variants}
        xb = x.to(torch.bfloat16)
        fns["tg"] = [partial(torch.ops.aten._weight_int4pack_mm, xb, w, GROUP_SIZE, sz) for w, sz in tg]
        times = {k: [] for k in fns}
        for _ in range(ROUNDS):
            for tag in fns:
                W._reduce_unroll = variants.get(tag, AUTO)
                times[tag].append(timing.time_graph(fns[tag], replays=15)["median_us"])
        W._reduce_unroll = AUTO
        med = {k: statistics.median(v) for k, v in times.items()}
        c = (f"{cfg.decomposition} m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} "
             f"k{cfg.split_k} U{AUTO(cfg.block_m, cfg.block_n, cfg.num_warps)}")
        print(f"{M:>2} {K:>5} {N:>5}  {c:28} {med['1']:7.2f} {med['auto']:7.2f}  {med['auto'] / med['1']:5.3f}  "
              f"{med['tg']:8.2f}  {med['tg'] / med['auto']:5.2f}x", flush=True)
    del qws, tg
    torch.cuda.empty_cache()
