"""Benchmark W4A16 GEMM at decode sizes against its peers, by the method of
shared/anchors/README.md (rotated weight copies past 3x L2, one CUDA graph, floor from the
measured copy bandwidth), so the numbers compare with the anchors there.

    PYTHONPATH=kernels python experiments/bench_w4a16.py [--M 1,4,16] [--shapes "K,N;K,N"] [--out DIR]

Methods: tiny_gemm (decomposition "auto"), tiny_gemm_dp / _splitk / _streamk, cublas_fp16
(F.linear on the dequantized fp16 weight), tinygemm (torch's _weight_int4pack_mm, bf16) and
gemlite when it is installed. Each is checked against a float64 reference before it is timed;
one that fails (or raises) is reported as FAILED and not timed.

Writes <out>/bench_w4a16.csv (one row per method x shape x M) and <out>/bench_w4a16.json
(provenance, copy bandwidth, arguments); <out> defaults to results/<gpu slug>/.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from tiny_gemm import timing
from tiny_gemm.quant import Int4Weight, dequantize, quantize
from tiny_gemm.w4a16 import select_config, w4a16_matmul, w4a16_reference

EXPERIMENT = "bench_w4a16"
DEFAULT_M = (1, 4, 16)
DEFAULT_SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192))
GROUP_SIZE = 128
MAX_REL_ERR = 1e-2
# checks per method: a race in a reduction shows as an error that comes and goes
CHECKS = 3
# tiny_gemm methods and the decomposition each one asks for
TINY_METHODS = {"tiny_gemm": "auto", "tiny_gemm_dp": "dp", "tiny_gemm_splitk": "splitk",
                "tiny_gemm_streamk": "streamk"}
# every method an experiment may name; dequant_fp16 is what a naive user does: dequantize,
# then an FP16 matmul
METHODS = (*TINY_METHODS, "cublas_fp16", "dequant_fp16", "tinygemm", "gemlite")
BENCH_METHODS = tuple(m for m in METHODS if m != "dequant_fp16")   # what `make bench` compares
# tinygemm's K-tiling of its packed weight; 8 is what gpt-fast and torchao use
TINYGEMM_INNER_K_TILES = 8
CSV_COLUMNS = ("experiment", "method", "M", "K", "N", "group_size", "dtype", "time_us", "p20_us",
               "p80_us", "floor_us", "pct_floor", "int4_floor_us", "rel_err", "status", "rotations",
               "config")


# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------
def parse_ints(text: str) -> tuple[int, ...]:
    """'1,4,16' -> (1, 4, 16)."""
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """'K,N;K,N' -> ((K, N), (K, N))."""
    shapes = []
    for item in text.split(";"):
        if item.strip():
            k, n = parse_ints(item)
            shapes.append((k, n))
    return tuple(shapes)


def shapes_arg(shapes: tuple[tuple[int, int], ...]) -> str:
    return ";".join(f"{k},{n}" for k, n in shapes)


def sweep_parser(doc: str, default_M: tuple[int, ...], replays: int, replays_help: str,
                 default_shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES) -> argparse.ArgumentParser:
    """The arguments a sweep over batch sizes and shapes takes (bench and tune)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--M", type=parse_ints, default=default_M,
                   help=f"batch rows (default '{','.join(map(str, default_M))}')")
    p.add_argument("--shapes", type=parse_shapes, default=default_shapes,
                   help=f"'K,N;K,N' (default '{shapes_arg(default_shapes)}')")
    p.add_argument("--replays", type=int, default=replays, help=replays_help)
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = sweep_parser(__doc__, DEFAULT_M, 20, "timed graph replays (median is reported)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/<gpu slug>/)")
    p.add_argument("--force", action="store_true", help="replace an existing result instead of writing beside it")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Weights in each method's format
# ------------------------------------------------------------------------------------------
def clone_int4(qw: Int4Weight) -> Int4Weight:
    """A copy of qw in its own memory, so that a call on it reads HBM, not the L2 of another."""
    return Int4Weight(qw.packed.clone(), qw.scales.clone(), qw.zeros.clone(), qw.group_size, qw.shape)


def tinygemm_weight(qw: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """qw in the format of torch's tinygemm kernel (aten._weight_int4pack_mm), same values.

    The packed input of _convert_weight_to_int4pack is uint8 [N, K/2] with the even k in the
    HIGH nibble (torch >= 2.5). tinygemm dequantizes w = (q - 8) * scale + zero, with
    scales_and_zeros [K/G, N, 2] (scale, zero) in bf16; ours is w = (q - z) * s, so its
    zero is (8 - z) * s. Scales and zeros are rounded to bf16, the one difference from qw."""
    codes = qw.codes()                                     # uint8 [N, K]
    packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).contiguous()
    w = torch.ops.aten._convert_weight_to_int4pack(packed, TINYGEMM_INNER_K_TILES)
    s, z = qw.scales.float(), qw.zeros.float()             # [K/G, N]
    scales_and_zeros = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16).contiguous()
    return w, scales_and_zeros


def gemlite_layer(qw: Int4Weight):
    """A GemLite W4A16 layer with qw's values (HQQ convention: w = (q - z) * s, as ours)."""
    import gemlite

    N, K = qw.shape
    layer = gemlite.GemLiteLinear(4, group_size=qw.group_size, in_features=K, out_features=N,
                                  input_dtype=gemlite.DType.FP16, output_dtype=gemlite.DType.FP16)
    layer.pack(qw.codes(), qw.scales.t().contiguous(), qw.zeros.t().to(qw.scales.dtype).contiguous(), bias=None)
    return layer


def setup_gemlite() -> bool:
    """Whether gemlite is installed; if so, set the autotuning the anchors were measured with."""
    try:
        import gemlite
    except ImportError:
        return False
    try:
        gemlite.set_autotune("fast")
    except Exception as exc:     # an older GemLite with another set_autotune signature
        print(f"gemlite: set_autotune('fast') failed ({exc}); using its default", file=sys.stderr)
    return True


# ------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------
@dataclass
class Method:
    """One way to compute y for a shape and M.

    calls[i] reads weight copy i; checked() returns an output to check against ref (with the
    output poisoned first where the method takes `out=`)."""

    name: str
    dtype: str
    floor_bytes: int
    calls: list[Callable[[], torch.Tensor]]
    checked: Callable[[], torch.Tensor]
    ref: torch.Tensor
    config: str = ""


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64; NaN when y has a non-finite value."""
    y = y.double()
    if not bool(torch.isfinite(y).all()):
        return math.nan
    return float(torch.linalg.norm(y - ref) / torch.linalg.norm(ref))


def worst_rel_err(fn: Callable[[], torch.Tensor], ref: torch.Tensor, runs: int = CHECKS) -> float:
    """The largest rel_err of `runs` calls of fn (NaN if any is NaN)."""
    errs = [rel_err(fn(), ref) for _ in range(runs)]
    return math.nan if any(math.isnan(e) for e in errs) else max(errs)


def _tiny_checked(x: torch.Tensor, qw: Int4Weight, decomposition: str, split_k: int | None = None) -> torch.Tensor:
    out = torch.full((x.shape[0], qw.out_features), math.nan, dtype=x.dtype, device=x.device)
    return w4a16_matmul(x, qw, decomposition, split_k, out=out)


@dataclass
class ShapeWeights:
    """The R rotated copies of one [N, K] weight, in every method's format."""

    qws: list[Int4Weight]
    fp16: list[torch.Tensor]
    tinygemm: list[tuple[torch.Tensor, torch.Tensor]] | None
    gemlite: list | None
    errors: dict[str, str]      # method -> why its weights could not be built


def build_weights(K: int, N: int, with_gemlite: bool) -> ShapeWeights:
    qw = quantize(torch.randn(N, K, device="cuda").half(), GROUP_SIZE)
    # enough copies of the INT4 weight to exceed 3x L2; the fp16 copies are 4x larger still
    rotations = timing.rotations(qw.nbytes)
    qws = [qw] + [clone_int4(qw) for _ in range(rotations - 1)]
    # the fp16 weight the INT4 one stands for, so cuBLAS computes the same function
    w16 = dequantize(qw)
    fp16 = [w16] + [w16.clone() for _ in range(rotations - 1)]
    errors: dict[str, str] = {}
    tg = gl = None
    try:
        w, sz = tinygemm_weight(qw)
        tg = [(w, sz)] + [(w.clone(), sz.clone()) for _ in range(rotations - 1)]
    except Exception as exc:     # a torch without this kernel or format: report, don't stop
        errors["tinygemm"] = f"{type(exc).__name__}: {exc}"
    if with_gemlite:
        try:
            gl = [gemlite_layer(q) for q in qws]
        except Exception as exc:
            errors["gemlite"] = f"{type(exc).__name__}: {exc}"
    return ShapeWeights(qws, fp16, tg, gl, errors)


def _dequant_then_linear(x: torch.Tensor, qw: Int4Weight) -> torch.Tensor:
    return F.linear(x, dequantize(qw))


def methods_for(x: torch.Tensor, wts: ShapeWeights, names: tuple[str, ...] = METHODS,
                split_ks: tuple[int, ...] = ()) -> tuple[list[Method], dict[str, str]]:
    """The methods of `names` for activations x [M, K], and the errors of those that could not
    be built. split_ks adds tiny_gemm_splitk_k<S> rows, SplitK at a fixed number of splits
    with the tuned tile (the split_k sweep of an experiment)."""
    M, K = x.shape
    qw0 = wts.qws[0]
    N = qw0.out_features
    int4_bytes = timing.w4a16_bytes(M, N, K, GROUP_SIZE)
    ref = w4a16_reference(x, qw0)
    methods = []
    tiny = [(name, dec, None) for name, dec in TINY_METHODS.items() if name in names]
    tiny += [(f"tiny_gemm_splitk_k{k}", "splitk", k) for k in split_ks]
    for name, dec, split in tiny:
        cfg = select_config(M, N, K, GROUP_SIZE, x.device, dec, split)
        methods.append(Method(
            name, "fp16", int4_bytes,
            calls=[partial(w4a16_matmul, x, q, dec, split) for q in wts.qws],
            checked=partial(_tiny_checked, x, qw0, dec, split), ref=ref,
            config=json.dumps(cfg.to_dict(), sort_keys=True)))
    if "cublas_fp16" in names:
        cublas = [partial(F.linear, x, w) for w in wts.fp16]
        methods.append(Method("cublas_fp16", "fp16", timing.fp16_gemm_bytes(M, N, K), cublas, cublas[0], ref))
    if "dequant_fp16" in names:
        # its floor is the INT4 problem's: the bytes that must move, not the ones it chooses to
        dq = [partial(_dequant_then_linear, x, q) for q in wts.qws]
        methods.append(Method("dequant_fp16", "fp16", int4_bytes, dq, dq[0], ref))
    if wts.tinygemm is not None and "tinygemm" in names:
        # its reference uses the bf16 activations it is given, so only the kernel is judged
        x_bf16 = x.to(torch.bfloat16)
        tg = [partial(torch.ops.aten._weight_int4pack_mm, x_bf16, w, GROUP_SIZE, sz) for w, sz in wts.tinygemm]
        methods.append(Method("tinygemm", "bf16", int4_bytes, tg, tg[0], w4a16_reference(x_bf16, qw0)))
    if wts.gemlite is not None and "gemlite" in names:
        gl = [partial(layer, x) for layer in wts.gemlite]
        methods.append(Method("gemlite", "fp16", int4_bytes, gl, gl[0], ref))
    return methods, {k: v for k, v in wts.errors.items() if k in names}


# ------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------
def measure(method: Method, M: int, K: int, N: int, bandwidth: float, replays: int,
            experiment: str = EXPERIMENT) -> dict:
    """Check, then (if right) time one method; returns its CSV row."""
    int4_floor = timing.floor_us(timing.w4a16_bytes(M, N, K, GROUP_SIZE), bandwidth)
    floor = timing.floor_us(method.floor_bytes, bandwidth)
    row = dict(experiment=experiment, method=method.name, M=M, K=K, N=N, group_size=GROUP_SIZE,
               dtype=method.dtype, time_us=None, p20_us=None, p80_us=None, floor_us=floor,
               pct_floor=None, int4_floor_us=int4_floor, rel_err=None, status="FAILED",
               rotations=len(method.calls), config=method.config)
    try:
        err = worst_rel_err(method.checked, method.ref)
    except Exception:
        print(f"{method.name} M={M} K={K} N={N} raised:\n{traceback.format_exc()}", file=sys.stderr)
        return row
    row["rel_err"] = err
    if not err <= MAX_REL_ERR:          # NaN fails too
        print(f"{method.name} M={M} K={K} N={N}: FAILED, rel_err {err:.3g} > {MAX_REL_ERR}", file=sys.stderr)
        return row
    try:
        t = timing.time_graph(method.calls, replays=replays)
    except Exception:
        print(f"{method.name} M={M} K={K} N={N}: timing raised:\n{traceback.format_exc()}", file=sys.stderr)
        return row
    row.update(time_us=t["median_us"], p20_us=t["p20_us"], p80_us=t["p80_us"],
               pct_floor=100 * floor / t["median_us"], status="ok")
    return row


def failed_row(name: str, M: int, K: int, N: int, bandwidth: float, experiment: str = EXPERIMENT) -> dict:
    """The row of a method whose weights could not be built."""
    int4_floor = timing.floor_us(timing.w4a16_bytes(M, N, K, GROUP_SIZE), bandwidth)
    return dict(experiment=experiment, method=name, M=M, K=K, N=N, group_size=GROUP_SIZE,
                dtype="bf16" if name == "tinygemm" else "fp16", time_us=None, p20_us=None,
                p80_us=None, floor_us=int4_floor, pct_floor=None, int4_floor_us=int4_floor,
                rel_err=None, status="FAILED", rotations=None, config="")


def bench_shape(K: int, N: int, Ms: tuple[int, ...], bandwidth: float, replays: int,
                with_gemlite: bool, experiment: str = EXPERIMENT, names: tuple[str, ...] = METHODS,
                split_ks: tuple[int, ...] = ()) -> list[dict]:
    wts = build_weights(K, N, with_gemlite and "gemlite" in names)
    for name, err in wts.errors.items():
        print(f"{name} K={K} N={N}: could not build its weights: {err}", file=sys.stderr)
    rows = []
    for M in Ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        methods, errors = methods_for(x, wts, names, split_ks)
        for m in methods:
            rows.append(measure(m, M, K, N, bandwidth, replays, experiment))
            print(format_row(rows[-1]), flush=True)
        rows += [failed_row(name, M, K, N, bandwidth, experiment) for name in errors]
    del wts
    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------
# As a runner of experiments/run.py (experiment.runner: bench_w4a16, the default)
# ------------------------------------------------------------------------------------------
def experiment_shapes(cfg) -> list[tuple[int, int]]:
    """(K, N) of the shape family's layers (of each family, for shapes=all) and the extra
    shapes, each once, in order."""
    families = [cfg.shapes] + list(cfg.shapes.get("families", {}).values())
    shapes = [(int(layer.K), int(layer.N)) for fam in families for layer in fam.get("layers", [])]
    shapes += [(int(k), int(n)) for k, n in cfg.extra_shapes]
    return list(dict.fromkeys(shapes))


def check_methods_and_m(exp, known: tuple[str, ...]) -> None:
    """experiment.methods all in `known` and experiment.M a list of batch sizes >= 1, else a
    ValueError: the part of check_experiment the other runners share."""
    unknown = set(exp.methods) - set(known)
    if unknown:
        raise ValueError(f"experiment.methods: unknown {sorted(unknown)}; known: {list(known)}")
    if not exp.M or any(int(m) < 1 for m in exp.M):
        raise ValueError(f"experiment.M must list batch sizes >= 1, got {list(exp.M)}")


def check_experiment(cfg, known: tuple[str, ...] = METHODS) -> None:
    """A misspelt method or an empty sweep is a ValueError before any GPU work."""
    check_methods_and_m(cfg.experiment, known)
    if not experiment_shapes(cfg):
        raise ValueError("no shapes: give shapes=<family> or extra_shapes=[[K,N],...]")


def run_experiment(cfg, bandwidth: float) -> tuple[list[dict], tuple[str, ...]]:
    """Every method of the experiment at every M over the shapes: rows and their columns."""
    from tqdm import tqdm
    exp = cfg.experiment
    names = tuple(exp.methods)
    with_gemlite = "gemlite" in names and setup_gemlite()
    rows = []
    for K, N in tqdm(experiment_shapes(cfg), desc=f"{exp.name} ({cfg.shapes.name})", unit="shape"):
        rows += bench_shape(K, N, tuple(int(m) for m in exp.M), bandwidth, cfg.replays, with_gemlite,
                            experiment=exp.name, names=names, split_ks=tuple(exp.get("split_k", ())))
    return rows, CSV_COLUMNS


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_row(r: dict) -> str:
    return (f"M={r['M']:<3} K={r['K']:<6} N={r['N']:<6} {r['method']:<18} {r['status']:<6} "
            f"time {_fmt(r['time_us'], '8.2f')} us  floor {_fmt(r['floor_us'], '6.2f')} us  "
            f"{_fmt(r['pct_floor'], '5.1f')}%  rel_err {_fmt(r['rel_err'], '.2e')}")


def write_results(out_dir: Path, rows: list[dict], meta: dict, force: bool = False,
                  experiment: str = EXPERIMENT, columns: tuple[str, ...] = CSV_COLUMNS) -> Path:
    """Write <experiment>.csv (the given columns) and .json; an existing result (e.g. the
    committed reference run) is kept unless force, and the new one gets a timestamped name
    beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = experiment
    if not force and (out_dir / f"{stem}.csv").exists():
        stem = f"{experiment}.{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        print(f"{out_dir / experiment}.csv exists (use --force to replace it); writing {stem}.csv")
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    (out_dir / f"{stem}.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return out_dir / f"{stem}.csv"


def summary_table(rows: list[dict]) -> str:
    """M, K, N, the INT4 floor, then time_us (pct of its floor) per method, and the speedup
    of tiny_gemm (auto) over tinygemm and over cuBLAS FP16."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["M"], r["K"], r["N"]), {})[r["method"]] = r

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        if r["status"] != "ok":
            return "FAILED"
        return f"{r['time_us']:.1f} ({r['pct_floor']:.0f}%)"

    def speedup(ms: dict, peer: str) -> str:
        a, b = ms.get("tiny_gemm"), ms.get(peer)
        if a is None or b is None or a["status"] != "ok" or b["status"] != "ok":
            return "-"
        return f"{b['time_us'] / a['time_us']:.2f}x"

    header = ["M", "K", "N", "int4 floor"] + methods + ["vs tinygemm", "vs cuBLAS"]
    table = [header]
    for (M, K, N), ms in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        floor = next(iter(ms.values()))["int4_floor_us"]
        table.append([str(M), str(K), str(N), f"{floor:.1f}"] + [cell(ms.get(m)) for m in methods]
                     + [speedup(ms, "tinygemm"), speedup(ms, "cublas_fp16")])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{EXPERIMENT}: no CUDA GPU found; nothing measured.")
        return 0
    torch.manual_seed(args.seed)
    with_gemlite = setup_gemlite()
    bandwidth = timing.copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []
    for K, N in args.shapes:
        rows += bench_shape(K, N, args.M, bandwidth, args.replays, with_gemlite, names=BENCH_METHODS)
    out_dir = args.out or timing.results_dir()
    meta = {"experiment": EXPERIMENT, "provenance": timing.provenance(),
            "copy_bandwidth_bytes_per_s": bandwidth, "args": vars(args)}
    written = write_results(out_dir, rows, meta, force=args.force)
    print()
    print("us per call (% of the method's own floor); speedups are of tiny_gemm (auto)")
    print(summary_table(rows))
    print(f"\nwrote {written} and {written.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
