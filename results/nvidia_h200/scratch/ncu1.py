import torch
from tiny_gemm import quantize, W4A16Config, w4a16_matmul
for (M, K, N, cfg) in [(1, 8192, 28672, W4A16Config("streamk", block_m=16, block_n=256, block_k=128, programs=264, num_warps=4, num_stages=3)),
                       (1, 4096, 14336, W4A16Config("splitk", block_m=1, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=3))]:
    qw = quantize(torch.randn(N, K, dtype=torch.float16, device="cuda"), 128)
    x = torch.randn(M, K, dtype=torch.float16, device="cuda")
    for _ in range(3):
        w4a16_matmul(x, qw, config=cfg)
    torch.cuda.synchronize()
