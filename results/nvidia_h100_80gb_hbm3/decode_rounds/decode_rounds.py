"""Decode attention against SDPA in repeated, interleaved rounds, at the points of the
attention_fusion grid where one attention_fusion run cannot order them.

attention_fusion times every method once per point (a median of 20 CUDA-graph replays). Where
two methods sit within a percent of each other, the order can flip from one run to the next
(the GPU's clocks and HBM refresh drift over seconds). Here each method is timed ROUNDS times,
the order of the methods rotating every round, by the same method (bench_attention's
build_method and check_and_time: inputs rotated past 3x L2, one CUDA graph, median of the
replays). Printed per point: the median over rounds of each method, and in how many rounds
tiny_gemm (this GPU's tuned table) was faster than the fastest SDPA backend of that round.

    PYTHONPATH=kernels:experiments python decode_rounds.py --out FILE.json [--rounds 15]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from tiny_gemm import timing
from bench_attention import Problem, build_method, check_and_time, make_inputs, new_row
from tiny_gemm.attention import attention_reference

POINTS = ((1, 512), (8, 512), (16, 512), (16, 2048), (16, 8192))
METHODS = ("tiny_gemm", "tiny_gemm_heuristic", "sdpa_default", "sdpa_cudnn", "sdpa_flash")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--replays", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    result = {"provenance": timing.provenance({"script": "decode_rounds.py", **vars(args)}), "points": []}
    for B, S in POINTS:
        prob = Problem("decode", B, 32, 8, 1, S, 128, torch.float16)
        inp = make_inputs(prob)
        ref = attention_reference(inp.q[0], inp.k[0], inp.v[0], causal=prob.causal)      # float64
        methods = {m: build_method(m, prob, inp) for m in METHODS}
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        notes = {}
        for r in range(args.rounds):
            order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
            for m in order:
                if r == 0:          # checked against float64 once, then timed
                    row = check_and_time(new_row("decode_rounds", prob, m, None, len(inp.q)), methods[m], ref,
                                         args.replays)
                    if row["status"] != "ok":
                        raise RuntimeError(f"{m} B={B} S={S}: {row['note']}")
                    notes[m] = row["note"]
                    times[m].append(row["time_us"])
                else:
                    times[m].append(timing.time_graph(methods[m].calls, replays=args.replays)["median_us"])
        sdpa = [min(times[m][r] for m in METHODS if m.startswith("sdpa")) for r in range(args.rounds)]
        wins = sum(t < s for t, s in zip(times["tiny_gemm"], sdpa))
        med = {m: statistics.median(v) for m, v in times.items()}
        best_sdpa = min((m for m in METHODS if m.startswith("sdpa")), key=med.get)
        line = (f"B {B:2d} ctx {S:5d} | " + " ".join(f"{m} {med[m]:8.2f}" for m in METHODS)
                + f" | fastest SDPA by median: {best_sdpa}, speedup {med[best_sdpa] / med['tiny_gemm']:.3f}x"
                + f" | tiny_gemm faster than every SDPA backend in {wins} of {args.rounds} rounds")
        print(line, flush=True)
        result["points"].append({"B": B, "S": S, "times_us": times, "median_us": med, "notes": notes,
                                 "rounds_tiny_gemm_faster": wins, "fastest_sdpa": best_sdpa,
                                 "speedup_vs_fastest_sdpa": med[best_sdpa] / med["tiny_gemm"], "line": line})
        del inp, methods
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{gpu}: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
