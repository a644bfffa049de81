"""Scratch: decode_attention with the combine in the split kernel (the last split of each
(sequence, kv head) combines) against a second combine kernel, at the decode_num_splits
heuristic and at 4..16 splits for B 1, beside SDPA default (H 32, Hkv 8, D 128, fp16).
Run: PYTHONPATH=kernels:experiments python results/nvidia_h200/scratch/decode_ab.py"""
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
for B in (1, 4, 16):
    for ctx in (512, 2048, 8192):
        p = Problem("decode", B, 32, 8, 1, ctx, 128, torch.float16)
        inp = make_inputs(p)
        floor = timing.floor_us(p.bytes_per_call(), bw)
        lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        q3 = [q.squeeze(2) for q in inp.q]
        ref = A.decode_attention_reference(q3[0], inp.k[0], inp.v[0], lens, None, torch.float64)
        fns = [partial(sdpa, q, k, v, False, None) for q, k, v in zip(inp.q, inp.k, inp.v)]
        line = f"B={B:2d} ctx={ctx:5d} floor {floor:6.2f} sdpa_default {timing.time_graph(fns, replays=10)['median_us']:7.2f} |"
        heur = A.decode_num_splits(B * 8, ctx, 132)
        for s in sorted({None, 4, 8, 16} if B == 1 else {None}, key=lambda s: s or 0):
            for mode in (True, False):
                A.COMBINE_IN_KERNEL = mode   # the A/B switch of 93a6518, since removed
                out = torch.full_like(q3[0], float("nan"))
                A.decode_attention(q3[0], inp.k[0], inp.v[0], lens, num_splits=s, out=out)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                fns = [partial(A.decode_attention, q, k, v, lens, num_splits=s, check_seqlens=False)
                       for q, k, v in zip(q3, inp.k, inp.v)]
                t = timing.time_graph(fns, replays=10)["median_us"]
                line += f" s={s or heur}{'in' if mode else 'k2'} {t:6.2f} ({err:.0e})"
        print(line, flush=True)
        A.COMBINE_IN_KERNEL = True
        del inp
        torch.cuda.empty_cache()
