"""Scratch: decode_attention launch configs (BLOCK_N, warps, stages) x split counts, beside SDPA
default and cuDNN, on the attention_fusion decode grid (H 32, Hkv 8, D 128, fp16, full caches).
Every (config, splits) is checked against the float64 reference (output poisoned) before timing.
Run: PYTHONPATH=kernels:experiments python results/nvidia_h200/scratch/decode_sweep.py"""
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "experiments"))
import tiny_gemm.attention as A  # noqa: E402
from tiny_gemm import timing  # noqa: E402
from bench_attention import Problem, make_inputs, sdpa  # noqa: E402

print(torch.cuda.get_device_name(), flush=True)
bw = timing.copy_bandwidth()
CONFIGS = [(64, 4, 3), (32, 4, 3), (32, 2, 3), (64, 2, 3), (64, 4, 2), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 3), (128, 4, 3)]
SPLITS = [1, 2, 4, 8, 16, 32, 64]
orig = A._decode_config
for B in (1, 4, 16):
    for ctx in (512, 2048, 8192):
        p = Problem("decode", B, 32, 8, 1, ctx, 128, torch.float16)
        inp = make_inputs(p)
        floor = timing.floor_us(p.bytes_per_call(), bw)
        lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        q3 = [q.squeeze(2) for q in inp.q]
        ref = A.decode_attention_reference(q3[0], inp.k[0], inp.v[0], lens, None, torch.float64)
        base = {}
        for name, backend in (("sdpa_default", None), ("sdpa_cudnn", "CUDNN_ATTENTION")):
            fns = [partial(sdpa, q, k, v, False, backend) for q, k, v in zip(inp.q, inp.k, inp.v)]
            base[name] = timing.time_graph(fns, replays=10)["median_us"]
        best_sdpa = min(base.values())
        res = []
        heur = A.decode_num_splits(B * 8, ctx, 132)
        for cfg in CONFIGS:
            A._decode_config = lambda dev, *_, cfg=cfg: cfg
            for s in SPLITS:
                if s > max(1, ctx // cfg[0]):
                    continue
                try:
                    out = torch.full_like(q3[0], float("nan"))
                    A.decode_attention(q3[0], inp.k[0], inp.v[0], lens, num_splits=s, out=out)
                    err = ((out.double() - ref).norm() / ref.norm()).item()
                    fns = [partial(A.decode_attention, q, k, v, lens, num_splits=s, check_seqlens=False)
                           for q, k, v in zip(q3, inp.k, inp.v)]
                    t = timing.time_graph(fns, replays=10)["median_us"]
                except Exception as e:  # noqa: BLE001
                    print(f"  B={B} ctx={ctx} cfg={cfg} s={s}: {type(e).__name__} {str(e)[:100]}")
                    continue
                res.append((t, cfg, s, err))
        A._decode_config = orig
        res.sort(key=lambda r: r[0])
        cur = [r for r in res if r[1] == (64, 4, 3) and r[2] == heur]
        print(f"B={B:2d} ctx={ctx:5d} floor {floor:6.2f} | sdpa_default {base['sdpa_default']:7.2f} cudnn {base['sdpa_cudnn']:7.2f}"
              f" | current (64,4,3) s={heur}: {cur[0][0] if cur else float('nan'):7.2f}", flush=True)
        for t, cfg, s, err in res[:6]:
            print(f"    {t:7.2f} us ({100 * floor / t:5.1f}% floor, {best_sdpa / t:4.2f}x best sdpa) cfg {cfg} splits {s} err {err:.1e}")
        for s in SPLITS:   # the best config at each split count
            rs = [r for r in res if r[2] == s]
            if rs:
                print(f"      splits {s:3d}: {rs[0][0]:7.2f} us cfg {rs[0][1]}")
        del inp
        torch.cuda.empty_cache()
