"""A/B of the joined INT4 FFN's variants (Llama-3-8B SwiGLU, D 4096, F 14336, group 128):
activation kernel between the GEMMs (the old path) against the gated input of the down GEMM,
with programmatic dependent launch off, triggered at the start (1) or the end (2) of the
gate/up GEMM's loop. Same measurement as bench_ffn (rotated weights, one CUDA graph, median)."""
import sys, json, time
from functools import partial
import torch
sys.path.insert(0, "experiments")
from tiny_gemm import ffn, timing
from tiny_gemm.ffn import gated_ffn_reference
from tiny_gemm.quant import joined_rows
from bench_attention import Method, check_and_time, nan_like
from bench_ffn import FfnWeights, torch_ffn, ffn_int4_bytes, ffn_fp16_bytes

D, F, G = 4096, 14336, 128
bw = timing.copy_bandwidth() if hasattr(timing, "copy_bandwidth") else None
print("gpu", torch.cuda.get_device_name(), "bw", bw, flush=True)
wts = FfnWeights(D, F, G)
ws = wts.int4_joined
VARIANTS = {"act_kernel": dict(gated_input=False, pdl_trigger=0),
            "gated": dict(gated_input=True, pdl_trigger=0),
            "gated_pdl1": dict(gated_input=True, pdl_trigger=1),
            "gated_pdl2": dict(gated_input=True, pdl_trigger=2),
            "pdl1_nopf": dict(gated_input=True, pdl_trigger=1, prefetch=False),
            "pdl2_nopf": dict(gated_input=True, pdl_trigger=2, prefetch=False)}

def run(x, w, kw, out=None):
    g, u, d = w
    out = torch.empty_like(x) if out is None else out
    ffn._int4_joined(x, joined_rows(g, u), None, d, None, "silu", out, **kw)
    return out

rows = []
for M in (1, 4, 16):
    x = torch.randn(M, D, device="cuda", dtype=torch.float16)
    ref = gated_ffn_reference(x, *wts.int4[0])
    methods = [Method("torch_fp16", [partial(torch_ffn, x, *w) for w in wts.fp16], partial(torch_ffn, x, *wts.fp16[0]))]
    for name, kw in VARIANTS.items():
        methods.append(Method(name, [partial(run, x, w, kw) for w in ws], lambda x=x, kw=kw: run(x, ws[0], kw, nan_like(x))))
    for rep in range(1):
        for m in methods:
            row = dict(method=m.name, M=M, rep=rep, floor_us=timing.floor_us(ffn_int4_bytes(M, D, F, G), bw) if bw else None)
            check_and_time(row, m, ref, 20)
            rows.append(row)
            print(f"M={M:<3} rep{rep} {m.name:<12} {row['status']} {row.get('time_us') or float('nan'):8.2f} us  err {row.get('rel_err')}", flush=True)
import os
json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), open(os.environ["OUT"] + "/ffn_ab.json", "w"), default=str, indent=1)
print("\n  M  " + " ".join(f"{n:>12}" for n in ["torch_fp16", *VARIANTS]))
for M in (1, 4, 16):
    for rep in range(1):
        t = {r["method"]: r.get("time_us") for r in rows if r["M"] == M and r["rep"] == rep}
        print(f"{M:>3} {rep} " + " ".join(f"{(t.get(n) or float('nan')):12.2f}" for n in ["torch_fp16", *VARIANTS]))
