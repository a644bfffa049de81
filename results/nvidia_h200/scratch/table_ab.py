"""Scratch: the launch configs of two config tables (the one tuned at 10d1833 and the one
tuned at 152e027) timed against each other in one process, rounds interleaved, on the
shapes where the two tables disagree or where the same config measured differently, with
tinygemm as a yardstick of the machine.
Run: PYTHONPATH=kernels:experiments python results/nvidia_h200/scratch/table_ab.py OLD.json NEW.json"""
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "experiments"))
from tiny_gemm import timing  # noqa: E402
from tiny_gemm.quant import quantize  # noqa: E402
from tiny_gemm.w4a16 import W4A16Config, w4a16_matmul, w4a16_reference  # noqa: E402
from bench_w4a16 import GROUP_SIZE, clone_int4, tinygemm_weight  # noqa: E402


def entries(path):
    return {(e["M"], e["K"], e["N"]): e for e in json.loads(Path(path).read_text())["entries"]}


old, new = entries(sys.argv[1]), entries(sys.argv[2])
print(torch.cuda.get_device_name(), flush=True)
ROUNDS = 5
for K, N in ((8192, 28672), (28672, 8192), (4096, 14336), (14336, 4096)):
    qw = quantize(torch.randn(N, K, device="cuda").half(), GROUP_SIZE)
    R = timing.rotations(qw.nbytes)
    qws = [qw] + [clone_int4(qw) for _ in range(R - 1)]
    tg = [tinygemm_weight(q) for q in qws]
    for M in (1, 4, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        ref = w4a16_reference(x, qw)
        cands = {}
        for tag, table in (("old", old), ("new", new)):
            e = table[(M, K, N)]
            for dec, cfg in e["best"].items():
                if dec != "dp":
                    cands.setdefault(json.dumps(cfg, sort_keys=True), []).append(f"{tag}-{dec}{'*' if dec == e['auto'] else ''}")
        fns = {}
        for key, tags in cands.items():
            cfg = W4A16Config(**json.loads(key))
            out = w4a16_matmul(x, qw, config=cfg)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (tags, err)
            fns["/".join(tags)] = [partial(w4a16_matmul, x, q, config=cfg) for q in qws]
        xb = x.to(torch.bfloat16)
        fns["tinygemm"] = [partial(torch.ops.aten._weight_int4pack_mm, xb, w, GROUP_SIZE, sz) for w, sz in tg]
        times = {k: [] for k in fns}
        for _ in range(ROUNDS):
            for k, f in fns.items():
                times[k].append(timing.time_graph(f, replays=20)["median_us"])
        cells = " | ".join(f"{k} {statistics.median(v):6.2f} ({min(v):.2f}-{max(v):.2f})" for k, v in times.items())
        print(f"M={M:<2} K={K:<5} N={N:<5} {cells}", flush=True)
    del qws, tg
    torch.cuda.empty_cache()
