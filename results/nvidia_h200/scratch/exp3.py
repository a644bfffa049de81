"""Scratch: cost of the x_sum epilogue (mode 0) vs none (1, wrong results) vs zero subtracted in the operand (2)."""
import torch
import tiny_gemm.w4a16 as W
from tiny_gemm import quantize, W4A16Config, w4a16_matmul, w4a16_reference, timing
from tiny_gemm.quant import Int4Weight
torch.manual_seed(0)
bw = timing.copy_bandwidth()
# warm the clocks
a = torch.empty(2**30, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
for _ in range(200): b.copy_(a)
torch.cuda.synchronize(); del a, b
cfgs = {
 (4096, 14336): [W4A16Config("splitk", block_m=16, block_n=256, block_k=128, split_k=4, num_warps=4),
                 W4A16Config("splitk", block_m=16, block_n=128, block_k=128, split_k=4, num_warps=4),
                 W4A16Config("splitk", block_m=16, block_n=64, block_k=128, split_k=4, num_warps=4),
                 W4A16Config("splitk", block_m=16, block_n=128, block_k=128, split_k=8, num_warps=2)],
 (8192, 28672): [W4A16Config("streamk", block_m=16, block_n=256, block_k=128, programs=264, num_warps=4),
                 W4A16Config("splitk", block_m=16, block_n=128, block_k=128, split_k=2, num_warps=4),
                 W4A16Config("streamk", block_m=16, block_n=128, block_k=128, programs=528, num_warps=4),
                 W4A16Config("streamk", block_m=16, block_n=64, block_k=128, programs=528, num_warps=4)],
 (14336, 4096): [W4A16Config("splitk", block_m=16, block_n=256, block_k=128, split_k=16, num_warps=4),
                 W4A16Config("splitk", block_m=16, block_n=128, block_k=128, split_k=8, num_warps=4),
                 W4A16Config("splitk", block_m=16, block_n=64, block_k=128, split_k=8, num_warps=4)],
 (4096, 4096): [W4A16Config("splitk", block_m=16, block_n=128, block_k=128, split_k=8, num_warps=4),
                W4A16Config("splitk", block_m=16, block_n=64, block_k=128, split_k=8, num_warps=4)],
}
for (K, N), cl in cfgs.items():
    qw = quantize(torch.randn(N, K, dtype=torch.float16, device="cuda"), 128)
    nrot = timing.rotations(qw.nbytes)
    qws = [Int4Weight(qw.packed.clone(), qw.scales.clone(), qw.zeros.clone(), 128, qw.shape) for _ in range(nrot)]
    fl = timing.floor_us(timing.w4a16_bytes(1, N, K, 128), bw)
    for M in (1, 16):
        x = torch.randn(M, K, dtype=torch.float16, device="cuda")
        ref = w4a16_reference(x, qw)
        for cfg in cl:
            line = f"K={K:5d} N={N:5d} M={M:2d} {cfg.decomposition:7s} n{cfg.block_n} w{cfg.num_warps} s{cfg.split_k} p{cfg.programs}:"
            for mode in (0, 1, 2):
                W.XSUM_MODE = mode
                out = w4a16_matmul(x, qw, config=cfg)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                t = timing.time_graph([lambda q=q: w4a16_matmul(x, q, config=cfg) for q in qws], replays=10, warmup=10)["median_us"]
                line += f"  m{mode} {t:6.2f} ({100*fl/t:4.1f}%, err {err:.0e})"
            print(line, flush=True)
W.XSUM_MODE = 0
