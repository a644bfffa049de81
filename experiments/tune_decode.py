"""Tune decode_attention's launch configuration per (batch, context) on this GPU and write the
table that tiny_gemm.attention.select_decode_config reads:
kernels/tiny_gemm/configs/decode/<gpu slug>.json.

    PYTHONPATH=kernels python experiments/tune_decode.py [--batch 1,2,4,8,16] [--context 512,...] [--quick] [--out PATH]

The heads, kv heads, head dim and dtype default to those of conf/experiment/attention_fusion.yaml
(Llama-3-8B: 32, 8, 128, float16); the grid defaults to its decode batches and the powers of two
of its context range, so that every point the experiment measures is an entry, and a call
between two grid points takes the next larger one (select_decode_config).

For each point every candidate DecodeConfig (split count, keys per step, warps, pipeline stages,
L2 prefetch of the first block or not) is timed by the method of bench_attention.py (full
caches, q, k and v rotated past 3x L2, one CUDA graph), with fewer replays; the FINALISTS
fastest are timed again, in turn, with four times as many. The fastest finalist that passes the
float64 check (NaN-filled output and split workspace) is the entry's "best". The heuristic (what a shape outside the grid
gets) is timed beside it and recorded as "fallback", with its ratio in the printed table.
Entries already in the output file for points not re-tuned are kept.
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
import triton

from tiny_gemm import timing
from tiny_gemm.attention import (DECODE_CONFIG_DIR, DecodeConfig, decode_attention, decode_attention_reference,
                                 heuristic_decode_config)
from tiny_gemm.w4a16 import gpu_slug

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import DTYPES, Problem, make_inputs, nan_like, poisoned_workspaces  # noqa: E402
from bench_w4a16 import MAX_REL_ERR, parse_ints, worst_rel_err  # noqa: E402
from tune_w4a16 import load_table, write_table  # noqa: E402

EXPERIMENT_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "experiment" / "attention_fusion.yaml"
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# (block_n, num_warps): 32-key steps only with 4 warps (a 16 x 32 tile leaves 8 warps idle)
TILES = ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8))
STAGES = (2, 3, 4)
PREFETCH = (0, 1)
FINALISTS = 6        # the fastest candidates of the first pass, timed again with more replays


def experiment_defaults(path: Path = EXPERIMENT_CONFIG) -> dict:
    """heads, kv_heads, head_dim, dtype, batch and context of the attention_fusion experiment;
    the context becomes every power of two from its smallest to its largest value."""
    import yaml
    e = yaml.safe_load(path.read_text())["experiment"]
    ctx = e["decode"]["context"]
    lo, hi = min(ctx), max(ctx)
    powers = [1 << i for i in range(lo.bit_length() - 1, hi.bit_length()) if lo <= 1 << i <= hi]
    return dict(heads=e["heads"], kv_heads=e["kv_heads"], head_dim=e["head_dim"], dtype=e["dtype"],
                batch=tuple(e["decode"]["batch"]), context=tuple(sorted(set(powers) | set(ctx))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = experiment_defaults()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=parse_ints, default=d["batch"],
                   help=f"decode batch sizes (default '{','.join(map(str, d['batch']))}')")
    p.add_argument("--context", type=parse_ints, default=d["context"],
                   help=f"cache lengths S_max (default '{','.join(map(str, d['context']))}')")
    p.add_argument("--heads", type=int, default=d["heads"])
    p.add_argument("--kv-heads", type=int, default=d["kv_heads"])
    p.add_argument("--head-dim", type=int, default=d["head_dim"])
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d["dtype"])
    p.add_argument("--replays", type=int, default=5, help="timed graph replays per candidate")
    p.add_argument("--quick", action="store_true", help="a much smaller candidate space (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="table to write (default kernels/tiny_gemm/configs/decode/<gpu slug>.json)")
    return p.parse_args(argv)


def candidates(batch_kv_heads: int, S_max: int, n_sm: int, quick: bool = False) -> list[DecodeConfig]:
    """Candidate configs of one point, pruned: at most four programs per SM, at least 32 keys
    per split, no key step of twice a split's keys or more (it would load mostly masked keys),
    and no two candidates that run the same launch (a split count that rounds to the same
    whole blocks as a smaller one)."""
    splits = (1, 2, 4, 8, 16) if quick else SPLITS
    tiles = ((64, 4), (128, 4)) if quick else TILES
    stages = (3,) if quick else STAGES
    prefetch = (0,) if quick else PREFETCH
    out, seen = [], set()
    for s in splits:
        if s > 1 and (batch_kv_heads * s > 4 * n_sm or triton.cdiv(S_max, s) < 32):
            continue
        keys = triton.cdiv(S_max, s)
        for block_n, warps in tiles:
            if block_n > 32 and 2 * keys <= block_n:
                continue
            chunk = triton.cdiv(keys, block_n) * block_n
            for ns in stages:
                for pf in prefetch:
                    key = (triton.cdiv(S_max, chunk), chunk, block_n, warps, ns, pf)
                    if key not in seen:
                        seen.add(key)
                        out.append(DecodeConfig(s, block_n, warps, ns, pf))
    return out


def tune_point(B: int, S: int, args: argparse.Namespace, n_sm: int) -> dict:
    """The table entry of one (batch, context): the best checked candidate and the fallback."""
    p = Problem("decode", B, args.heads, args.kv_heads, 1, S, args.head_dim, DTYPES[args.dtype])
    inp = make_inputs(p)
    qs = [q.squeeze(2) for q in inp.q]
    lens = torch.full((B,), S, dtype=torch.int32, device=qs[0].device)
    ref = decode_attention_reference(qs[0], inp.k[0], inp.v[0], lens)          # float64

    def time_us(cfg: DecodeConfig, replays: int = args.replays) -> float:
        fns = [partial(decode_attention, q, k, v, lens, check_seqlens=False, config=cfg)
               for q, k, v in zip(qs, inp.k, inp.v)]
        return timing.time_graph(fns, replays=replays, warmup=2, warmup_ms=5.0)["median_us"]

    def check(cfg: DecodeConfig) -> float:
        with poisoned_workspaces():
            return worst_rel_err(lambda: decode_attention(qs[0], inp.k[0], inp.v[0], lens, config=cfg,
                                                          out=nan_like(qs[0])), ref)

    bkv = B * args.kv_heads
    cands = candidates(bkv, S, n_sm, args.quick)
    first = sorted(((time_us(c), c) for c in cands), key=lambda tc: tc[0])
    timed = sorted(((time_us(c, 4 * args.replays), c) for _, c in first[:FINALISTS]),
                   key=lambda tc: tc[0]) + first[FINALISTS:]       # the rest, should all finalists fail
    best = None
    for t, cfg in timed:
        err = check(cfg)
        if err <= MAX_REL_ERR:
            best = (t, cfg, err)
            break
        print(f"  B={B} S={S} {cfg}: rel_err {err:.3g}, skipped", file=sys.stderr)
    if best is None:
        raise RuntimeError(f"no candidate passed the check for B={B} S_max={S}")
    # what a point outside the grid gets (select_decode_config without a table entry)
    fb = heuristic_decode_config(bkv, S, qs[0].device)
    entry = {"B": B, "H": args.heads, "Hkv": args.kv_heads, "D": args.head_dim,
             "kv_group": args.heads // args.kv_heads, "batch_kv_heads": bkv, "S_max": S,
             "dtype": args.dtype, "best": best[1].to_dict(), "time_us": best[0], "rel_err": best[2],
             "candidates": len(cands),
             "fallback": {"config": fb.to_dict(), "time_us": time_us(fb, 4 * args.replays), "rel_err": check(fb)}}
    del inp, qs
    torch.cuda.empty_cache()
    return entry


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
def _short(cfg: dict) -> str:
    return (f"s{cfg['num_splits']} n{cfg['block_n']} w{cfg['num_warps']} st{cfg['num_stages']}"
            f"{' pf' if cfg.get('prefetch') else ''}")


def format_entry(e: dict) -> str:
    fb = e["fallback"]
    return (f"B={e['B']:<3} S_max={e['S_max']:<6} best {e['time_us']:8.2f} us ({_short(e['best'])}) | "
            f"fallback {fb['time_us']:8.2f} us ({_short(fb['config'])}, {fb['time_us'] / e['time_us']:.3f}x best)"
            f" | {e['candidates']} candidates")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_decode: no CUDA GPU found; nothing tuned.")
        return 0
    torch.manual_seed(args.seed)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    out = args.out or DECODE_CONFIG_DIR / f"{gpu_slug(props.name)}.json"
    start = load_table(out)
    run_config = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                  for k, v in vars(args).items()}
    t0 = time.perf_counter()
    entries = []
    for B in args.batch:
        for S in args.context:
            t1 = time.perf_counter()
            entries.append(tune_point(B, S, args, props.multi_processor_count))
            print(f"{format_entry(entries[-1])}   [{time.perf_counter() - t1:.0f} s]", flush=True)
            write_table(out, props.name, start, entries, run_config,
                        key=lambda e: (e["D"], e["kv_group"], e["batch_kv_heads"], e["S_max"]))
    print(f"\nchosen configurations ({time.perf_counter() - t0:.0f} s, {props.name}):")
    for e in entries:
        print(format_entry(e))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
