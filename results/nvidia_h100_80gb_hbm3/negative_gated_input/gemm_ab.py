"""Down GEMM of the Llama-3-8B FFN (K 14336, N 4096) alone: plain x against the gated input
(silu, relu), and the joined gate/up GEMM and the activation kernel alone. Rotated weights, graph."""
import sys, os, json
from functools import partial
import torch
sys.path.insert(0, "experiments")
from tiny_gemm import ffn, timing, w4a16 as W
from tiny_gemm.quant import quantize, Int4Weight
from bench_w4a16 import clone_int4
D, F, G = 4096, 14336, 128
print("gpu", torch.cuda.get_device_name(), flush=True)
down = quantize((torch.randn(D, F, device="cuda") / F**0.5).half(), G)
gu_w = quantize((torch.randn(2 * F, D, device="cuda") / D**0.5).half(), G)
downs = [down] + [clone_int4(down) for _ in range(timing.rotations(down.nbytes) - 1)]
gus = [gu_w] + [clone_int4(gu_w) for _ in range(timing.rotations(gu_w.nbytes) - 1)]
rows = []
for M in (1, 16):
    x = torch.randn(M, D, device="cuda", dtype=torch.float16)
    gu = torch.randn(M, 2 * F, device="cuda", dtype=torch.float16)
    h = torch.randn(M, F, device="cuda", dtype=torch.float16)
    out = torch.empty(M, D, device="cuda", dtype=torch.float16)
    cfg = W.select_config(M, D, F, G, x.device)
    def t(name, calls):
        r = timing.time_graph(calls, replays=20)
        rows.append(dict(M=M, name=name, time_us=r["median_us"] if isinstance(r, dict) else r))
        print(f"M={M:<3} {name:<28} {rows[-1]['time_us']}", flush=True)
    t("down plain", [partial(W._launch, h, w, out, cfg) for w in downs])
    for act in ("silu", "relu"):
        t(f"down gated {act}", [partial(W._launch, gu[:, :F], w, out, cfg, x_act=act) for w in downs])
    cfg1 = W.select_config(M, 2 * F, D, G, x.device)
    t("gate/up joined", [partial(W._launch, x, w, gu, cfg1) for w in gus])
    t("act kernel", [partial(ffn._act_launch, gu[:, :F], gu[:, F:], None, "silu", out=h)] * 8)
    t("gate/up + act + down", [(lambda w1=w1, w2=w2: (W._launch(x, w1, gu, cfg1), ffn._act_launch(gu[:, :F], gu[:, F:], None, "silu", out=h), W._launch(h, w2, out, cfg))) for w1, w2 in zip(gus, downs * 4)])
    t("gate/up + gated down", [(lambda w1=w1, w2=w2: (W._launch(x, w1, gu, cfg1), W._launch(gu[:, :F], w2, out, cfg, x_act="silu"))) for w1, w2 in zip(gus, downs * 4)])
    print(cfg, cfg1)
json.dump(rows, open(os.environ["OUT"] + "/gemm_ab.json", "w"), indent=1, default=str)
