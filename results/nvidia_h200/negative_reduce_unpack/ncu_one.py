import sys, torch
sys.path.insert(0, "experiments")
from tiny_gemm import w4a16 as W
from tiny_gemm.quant import quantize
for K, N in ((14336, 4096), (4096, 28672)):
    qw = quantize(torch.randn(N, K, dtype=torch.float16, device="cuda") / K**0.5, 128)
    x = torch.randn(1, K, dtype=torch.float16, device="cuda")
    out = torch.empty(1, N, dtype=torch.float16, device="cuda")
    cfg = W.select_config(1, N, K, 128, x.device)
    for _ in range(3):
        W._launch(x, qw, out, cfg)
    torch.cuda.synchronize()
    print(K, N, cfg, flush=True)
