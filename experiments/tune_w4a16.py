"""Tune the W4A16 launch configuration per (M, K, N) on this GPU and write the table that
tiny_gemm.w4a16.select_config reads: kernels/tiny_gemm/configs/<gpu slug>.json.

    PYTHONPATH=kernels python experiments/tune_w4a16.py [--M 1,4,16] [--shapes "K,N;K,N"] [--quick] [--out PATH]

By default every shape of every family in conf/shapes/ (a shape added there is tuned by the
next make tune).

For each shape and M, every candidate W4A16Config of each decomposition (dp, splitk, streamk)
is timed by the method of bench_w4a16.py (rotated weight copies past 3x L2, one CUDA graph),
with fewer replays. The fastest candidate that passes the float64 check is kept per
decomposition, and the fastest decomposition becomes the entry's "auto". The heuristic
fallback (what an untuned shape gets) is timed beside it and recorded as the entry's
"fallback". Entries already in the output file for shapes that are not re-tuned are kept.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import triton

from tiny_gemm import timing
from tiny_gemm.quant import Int4Weight, quantize
from tiny_gemm.w4a16 import (CONFIG_DIR, DECOMPOSITIONS, W4A16Config, gpu_slug, heuristic_config,
                             w4a16_matmul, w4a16_reference)

# bench_w4a16.py sits beside this file; share its helpers rather than copy them
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_w4a16 import GROUP_SIZE, MAX_REL_ERR, clone_int4, parse_ints, sweep_parser, worst_rel_err  # noqa: E402

DEFAULT_M = (1, 4, 16)   # select_config uses the smallest tuned M >= the call's M
SHAPES_DIR = Path(__file__).resolve().parents[1] / "conf" / "shapes"


def config_shapes(shapes_dir: Path = SHAPES_DIR) -> tuple[tuple[int, int], ...]:
    """(K, N) of every layer of every family in conf/shapes/, each once: what the experiments
    measure, and so what make tune covers unless --shapes says otherwise. A family whose
    gate_proj and up_proj have one shape (K, N) also gets (K, 2N): the joined gate/up weight
    that the INT4 FFN reads with one GEMM (tiny_gemm.ffn._ffn_int4)."""
    import yaml
    shapes = []
    for path in sorted(shapes_dir.glob("*.yaml")):
        layers = {layer["name"]: (int(layer["K"]), int(layer["N"]))
                  for layer in (yaml.safe_load(path.read_text()) or {}).get("layers") or []}
        shapes += layers.values()
        gate, up = layers.get("gate_proj"), layers.get("up_proj")
        if gate is not None and gate == up:
            shapes.append((gate[0], 2 * gate[1]))
    return tuple(dict.fromkeys(shapes))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = sweep_parser(__doc__, DEFAULT_M, 5, "timed graph replays per candidate", config_shapes())
    p.add_argument("--quick", action="store_true", help="a much smaller candidate space (smoke tests)")
    p.add_argument("--stages", type=parse_ints, default=None,
                   help="pipeline stages of the tensor-core candidates (default 3,4; 3 with --quick)")
    p.add_argument("--out", type=Path, default=None,
                   help="table to write (default kernels/tiny_gemm/configs/<gpu slug>.json)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Candidate space
# ------------------------------------------------------------------------------------------
def _programs(cfg: W4A16Config, tiles: int, k_iters: int, n_sm: int) -> int:
    """Programs the launch of cfg runs (mirrors w4a16._launch)."""
    if cfg.decomposition == "dp":
        return tiles
    if cfg.decomposition == "splitk":
        per = triton.cdiv(k_iters, min(cfg.split_k, k_iters))
        return tiles * triton.cdiv(k_iters, per)
    return min(cfg.programs or n_sm, tiles * k_iters)


def candidates(decomposition: str, M: int, N: int, K: int, n_sm: int, quick: bool = False,
               stages: tuple[int, ...] | None = None) -> list[W4A16Config]:
    """Candidate configs of one decomposition, pruned.

    Tensor-core tiles: block_m 16 (one row-tile for M <= 16), block_k 64 or 128, block_n
    32..256, 2 to 8 warps (fewer warps per program, more programs per SM). For M <= 2 also
    the FMA path, block_m 1, in the shape of GemLite's M = 1 GEMV: many small programs
    (block_k 32..128, 1..4 warps) whose number, not a deep pipeline, keeps enough bytes in
    flight. 3 or 4 pipeline stages (tensor-core path). split_k and programs are runtime
    arguments, so their variants cost no compile. Pruned: launches that fill under a
    quarter of the SMs (the weights stream from too few SMs to reach bandwidth) unless
    nothing else is left, and variants that run the same launch as another (split_k past
    the K-iterations, programs past the work)."""
    stages = tuple(stages) if stages else (3,) if quick else (3, 4)
    splits = (4, 8) if quick else (2, 4, 8, 16, 32)
    program_counts = (n_sm,) if quick else (n_sm, 2 * n_sm, 4 * n_sm, 8 * n_sm)
    # (block_m, block_n, block_k, num_warps)
    shapes = [(16, bn, bk, nw) for bn in ((64, 128) if quick else (32, 64, 128, 256))
              for bk in ((128,) if quick else (64, 128))
              for nw in ((4,) if quick else (2, 4) if bn <= 64 else (2, 4, 8) if bn == 128 else (4, 8))]
    if M <= 2:
        shapes += [(1, bn, bk, nw) for bn in ((64,) if quick else (64, 128, 256))
                   for bk in ((128,) if quick else (32, 64, 128))
                   for nw in ((4,) if quick else (1, 2, 4))]

    out: list[tuple[int, W4A16Config]] = []
    for bm, bn, bk, nw in shapes:
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        k_iters = triton.cdiv(K, bk)
        # the FMA path prefetches by hand: Triton's pipeliner (num_stages) does not touch it
        for ns in (stages if bm > 1 else stages[:1]):
            base = W4A16Config(decomposition, block_m=bm, block_n=bn, block_k=bk,
                               num_warps=nw, num_stages=ns)
            if decomposition == "dp":
                variants = [base]
            elif decomposition == "splitk":
                variants = [replace(base, split_k=s) for s in splits]
            else:
                variants = [replace(base, programs=p) for p in program_counts]
            seen = set()
            for cfg in variants:
                progs = _programs(cfg, tiles, k_iters, n_sm)
                if decomposition == "splitk" and progs == tiles:
                    continue                     # one split: that is dp
                if progs in seen:
                    continue                     # the same launch as a smaller variant
                seen.add(progs)
                out.append((progs, cfg))
    kept = [cfg for progs, cfg in out if 4 * progs >= n_sm]
    if not kept and out:
        most = max(progs for progs, _ in out)
        kept = [cfg for progs, cfg in out if progs == most]
    return kept


# ------------------------------------------------------------------------------------------
# Tuning
# ------------------------------------------------------------------------------------------
def _poisoned_call(x: torch.Tensor, qw: Int4Weight, cfg: W4A16Config) -> torch.Tensor:
    out = torch.full((x.shape[0], qw.out_features), float("nan"), dtype=x.dtype, device=x.device)
    return w4a16_matmul(x, qw, config=cfg, out=out)


def check_config(x: torch.Tensor, qw: Int4Weight, cfg: W4A16Config, ref: torch.Tensor) -> float:
    """Worst rel_err of a few runs of cfg (output poisoned with NaN first) against float64."""
    return worst_rel_err(partial(_poisoned_call, x, qw, cfg), ref)


def tune_entry(x: torch.Tensor, qws: list[Int4Weight], n_sm: int, replays: int, quick: bool,
               stages: tuple[int, ...] | None = None) -> dict:
    """The table entry of one (M, K, N): the best checked config of each decomposition."""
    M, K = x.shape
    N = qws[0].out_features
    ref = w4a16_reference(x, qws[0])

    def time_us(cfg: W4A16Config) -> float:
        fns = [partial(w4a16_matmul, x, q, config=cfg) for q in qws]
        return timing.time_graph(fns, replays=replays, warmup=2, warmup_ms=5.0)["median_us"]

    best, times = {}, {}
    for dec in DECOMPOSITIONS:
        timed = [(time_us(cfg), cfg) for cfg in candidates(dec, M, N, K, n_sm, quick, stages)]
        for t, cfg in sorted(timed, key=lambda tc: tc[0]):
            err = check_config(x, qws[0], cfg, ref)
            if err <= MAX_REL_ERR:
                best[dec], times[dec] = cfg.to_dict(), t
                break
            print(f"  M={M} K={K} N={N} {cfg}: rel_err {err:.3g}, skipped", file=sys.stderr)
    if not times:
        raise RuntimeError(f"no candidate passed the check for M={M} K={K} N={N}")
    # what a shape missing from the table gets: timed the same way, so the table records the
    # fallback's distance from the tuned entry (select_config reads only "auto" and "best")
    fb = heuristic_config(M, N, K, GROUP_SIZE, n_sm)
    fallback = {"config": fb.to_dict(), "time_us": time_us(fb), "rel_err": check_config(x, qws[0], fb, ref)}
    return {"M": M, "K": K, "N": N, "group_size": GROUP_SIZE, "auto": min(times, key=times.get),
            "best": best, "time_us": times, "fallback": fallback}


def tune_shape(K: int, N: int, Ms: tuple[int, ...], n_sm: int, replays: int, quick: bool,
               stages: tuple[int, ...] | None = None) -> list[dict]:
    qw = quantize(torch.randn(N, K, device="cuda").half(), GROUP_SIZE)
    R = timing.rotations(qw.nbytes)
    qws = [qw] + [clone_int4(qw) for _ in range(R - 1)]
    entries = []
    for M in Ms:
        t0 = time.perf_counter()
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        entries.append(tune_entry(x, qws, n_sm, replays, quick, stages))
        print(f"{format_entry(entries[-1])}   [{time.perf_counter() - t0:.0f} s]", flush=True)
    del qws
    torch.cuda.empty_cache()
    return entries


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
def _short(cfg: dict) -> str:
    s = f"m{cfg['block_m']} n{cfg['block_n']} w{cfg['num_warps']} s{cfg['num_stages']}"
    if cfg["decomposition"] == "splitk":
        s += f" k{cfg['split_k']}"
    elif cfg["decomposition"] == "streamk":
        s += f" p{cfg['programs']}"
    return s


def format_entry(e: dict) -> str:
    parts = [f"{dec} {e['time_us'][dec]:7.2f} us ({_short(e['best'][dec])})"
             for dec in DECOMPOSITIONS if dec in e["best"]]
    if "fallback" in e:
        fb = e["fallback"]
        parts.append(f"fallback {fb['time_us']:7.2f} us ({_short(fb['config'])}, "
                     f"{fb['time_us'] / e['time_us'][e['auto']]:.2f}x auto)")
    return f"M={e['M']:<3} K={e['K']:<6} N={e['N']:<6} auto={e['auto']:<8} " + " | ".join(parts)


def load_table(path: Path) -> dict:
    """The table at path as a tuning run finds it (no entries if there is none)."""
    return json.loads(path.read_text()) if path.exists() else {"entries": []}


def write_table(path: Path, gpu: str, start: dict, entries: list[dict], config: dict, key, order=None) -> None:
    """Write the tuned table at path: this run's entries, plus those of `start` (the table the
    run found, load_table) whose key(e) was not re-tuned, sorted by order(e) (default key);
    the kept entries keep their provenance, under provenance_of_other_entries. Called after
    every tuned shape, so an interrupted run keeps what it measured. Shared by tune_decode.py."""
    new = {key(e) for e in entries}
    kept = [e for e in start["entries"] if key(e) not in new]
    table = {"gpu": gpu, "provenance": timing.provenance(config=config),
             "entries": sorted(kept + entries, key=order or key)}
    if kept:
        table["provenance_of_other_entries"] = [start["provenance"]] + start.get("provenance_of_other_entries", [])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_w4a16: no CUDA GPU found; nothing tuned.")
        return 0
    torch.manual_seed(args.seed)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    out = args.out or CONFIG_DIR / f"{gpu_slug(props.name)}.json"
    t0 = time.perf_counter()
    entries = []
    start = load_table(out)
    config = {"replays": args.replays, "quick": args.quick, "stages": args.stages, "M": list(args.M),
              "shapes": args.shapes}
    for K, N in args.shapes:
        entries += tune_shape(K, N, args.M, props.multi_processor_count, args.replays, args.quick, args.stages)
        write_table(out, props.name, start, entries, config,
                    key=lambda e: (e["M"], e["K"], e["N"], e["group_size"]),
                    order=lambda e: (e["K"], e["N"], e["M"]))
    print(f"\nchosen configurations ({time.perf_counter() - t0:.0f} s):")
    for e in entries:
        print(format_entry(e))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
