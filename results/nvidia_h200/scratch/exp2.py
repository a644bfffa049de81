"""Scratch: does the length of the contiguous run per column (BLOCK_K / 2 bytes) limit bandwidth?"""
import sys, torch
from tiny_gemm import quantize, W4A16Config, w4a16_matmul, w4a16_reference
from tiny_gemm import timing
from tiny_gemm.quant import Int4Weight
torch.manual_seed(0)
bw = timing.copy_bandwidth()
print(f"copy bandwidth {bw/1e12:.2f} TB/s", flush=True)
rows = []
for (K, N) in [(8192, 28672), (4096, 14336)]:
    for G in (128, None):
        w = torch.randn(N, K, dtype=torch.float16, device="cuda")
        qw = quantize(w, G); del w
        Gs = qw.group_size
        nrot = timing.rotations(qw.nbytes)
        qws = [Int4Weight(qw.packed.clone(), qw.scales.clone(), qw.zeros.clone(), Gs, qw.shape) for _ in range(nrot)]
        fl = timing.floor_us(timing.w4a16_bytes(1, N, K, Gs), bw)
        for M in (1, 16):
            x = torch.randn(M, K, dtype=torch.float16, device="cuda")
            ref = w4a16_reference(x, qw)
            for dec, bm, bn, bk, nw, extra in [
                    ("splitk", 16, 256, 128, 4, dict(split_k=8)), ("streamk", 16, 256, 128, 4, dict(programs=264)),
                    ("splitk", 16, 128, 128, 8, dict(split_k=8)), ("splitk", 1, 64, 128, 4, dict(split_k=4)),
                    ("splitk", 16, 256, 256, 4, dict(split_k=8)), ("splitk", 16, 128, 256, 4, dict(split_k=8)),
                    ("streamk", 16, 128, 256, 4, dict(programs=264)), ("splitk", 16, 128, 512, 4, dict(split_k=4)),
                    ("splitk", 16, 64, 512, 4, dict(split_k=4)), ("splitk", 1, 64, 256, 4, dict(split_k=4)),
                    ("streamk", 16, 128, 512, 4, dict(programs=264)), ("streamk", 16, 128, 512, 8, dict(programs=132))]:
                if bk > Gs:
                    continue
                cfg = W4A16Config(dec, block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=3, **extra)
                try:
                    out = w4a16_matmul(x, qw, config=cfg)
                    err = ((out.double() - ref).norm() / ref.norm()).item()
                    t = timing.time_graph([lambda q=q: w4a16_matmul(x, q, config=cfg) for q in qws], replays=5)["median_us"]
                except Exception as e:
                    err, t = float("nan"), float("nan"); print("ERR", cfg, repr(e)[:200])
                print(f"K={K:5d} N={N:5d} G={Gs:5d} M={M:2d} {dec:7s} m{bm} n{bn} k{bk} w{nw} {extra}: {t:7.2f} us  {100*fl/t:5.1f}% floor  err {err:.1e}", flush=True)
