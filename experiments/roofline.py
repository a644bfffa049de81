"""Roofline view of W4A16 and FP16 GEMMs: achieved bandwidth, and where Nsight Compute is
available, each kernel's SM and DRAM throughput as % of peak.

    PYTHONPATH=kernels python experiments/run.py experiment=roofline [shapes=llama3_8b] \
        ['experiment.M=[1,16]'] [experiment.ncu=off|auto|/path/to/ncu]

Part "bench": every method at every M over the shapes, timed by bench_w4a16.py's method
(checked against float64, rotated weights, CUDA-graph replay); pct_floor is the achieved
bandwidth (the method's own bytes / time) as % of the measured copy bandwidth, achieved_tb_s
the same bandwidth in TB/s. cublas_fp16 moves the fp16 weight (weight_format fp16), the
others int4 weights with fp16 scales and zeros (weight_format int4).

Part "ncu": ONE Nsight Compute run over the whole sweep (its start-up takes seconds), with
this file as its target (``--ncu-target CASES.json``). The target builds one copy of each
shape's weights, runs every case twice outside the profiled region (compiles, cuBLAS
heuristics, lazily allocated buffers), then, between cudaProfilerStart/Stop
(``--profile-from-start off``), launches for each case a tiny marker kernel whose grid is
(case index + 1) followed by the case's call. Rows of ncu's ``--csv --page raw`` output are
attributed to cases by those markers, so a case may launch any number of kernels (cuBLAS
sometimes launches a split-K GEMM and a reduction). Markers were chosen over NVTX ranges:
the NVTX columns of the raw CSV differ between ncu versions, and renaming kernels after
their range would lose the kernel names. ncu locks the clocks to base and flushes the caches
before each kernel (its defaults), so its durations (ncu_time_us) are not the benchmark's.

ncu is found by ``experiment.ncu``: "auto" (PATH, then /opt/nvidia/nsight-compute/*/ncu,
then /usr/local/cuda*/bin/ncu), "off", or a path. Where it is missing, fails or times out,
the bench rows are still written, with a part "ncu" row whose note says why.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from bench_w4a16 import (GROUP_SIZE, METHODS as BENCH_METHODS, ShapeWeights, bench_shape,
                         check_experiment as check_bench_experiment, experiment_shapes,
                         methods_for, tinygemm_weight)
from tiny_gemm.quant import dequantize, quantize

ROOT = Path(__file__).resolve().parents[1]
# gemlite autotunes when first called; it has no place in a one-run-per-kernel profile
METHODS = tuple(m for m in BENCH_METHODS if m != "gemlite")
NCU_METRICS = {"sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_throughput_pct",
               "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_throughput_pct",
               "gpu__time_duration.sum": "ncu_time_us"}
NCU_TIMEOUT_S = 600         # when the config names none
NCU_GLOBS = ("/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda*/bin/ncu")
MARKER = "_roofline_case_marker"
# microseconds per unit of a duration in ncu's CSV
_TIME_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
               "second": 1e6, "s": 1e6}
COLUMNS = ("experiment", "part", "method", "weight_format", "M", "K", "N", "group_size", "dtype",
           "bytes", "time_us", "p20_us", "p80_us", "floor_us", "pct_floor", "achieved_tb_s",
           "rel_err", "status", "rotations", "kernel", "sm_throughput_pct", "dram_throughput_pct",
           "ncu_time_us", "note", "config")


@triton.jit
def _roofline_case_marker(ptr):
    """Separates the cases in ncu's kernel list; its grid size is the case index + 1."""
    tl.store(ptr, tl.program_id(0))


# ------------------------------------------------------------------------------------------
# Finding and running ncu
# ------------------------------------------------------------------------------------------
def find_ncu(setting: str) -> tuple[str | None, str]:
    """(path of ncu, "") or (None, why not) for experiment.ncu = "auto", "off" or a path."""
    if setting == "off":
        return None, "ncu: off in the config"
    if setting != "auto":
        ok = os.path.isfile(setting) and os.access(setting, os.X_OK)
        return (setting, "") if ok else (None, f"ncu: {setting} is not an executable file")
    found = shutil.which("ncu")
    if found:
        return found, ""
    for pattern in NCU_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1], ""
    return None, f"ncu not found on PATH nor in {', '.join(NCU_GLOBS)}"


def ncu_version(ncu: str) -> str:
    """'2025.3.1.0' from `ncu --version`, or '' when it cannot be read."""
    try:
        out = subprocess.run([ncu, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    match = re.search(r"Version\s+(\S+)", out)
    return match.group(1) if match else ""


def ncu_command(ncu: str, cases_file: Path) -> list[str]:
    """ncu over this file's target mode: the three metrics, one raw CSV row per kernel, with
    its default clock and cache control spelt out (base clocks, caches flushed per kernel)."""
    return [ncu, "--profile-from-start", "off", "--clock-control", "base", "--cache-control", "all",
            "--metrics", ",".join(NCU_METRICS), "--csv", "--page", "raw", "--print-units", "base",
            sys.executable, str(Path(__file__).resolve()), "--ncu-target", str(cases_file)]


def run_ncu(cmd: list[str], timeout_s: float) -> tuple[int | None, str, str]:
    """(returncode, stdout, stderr) of cmd; returncode None when it ran past timeout_s, in
    which case its whole process group (ncu and the profiled Python) is killed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "kernels"), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


# ------------------------------------------------------------------------------------------
# Parsing ncu's CSV and attributing its kernels to cases
# ------------------------------------------------------------------------------------------
def _number(text: str) -> float | None:
    """'1,234.5' -> 1234.5; '', 'n/a' and other non-numbers -> None."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_ncu_csv(text: str) -> list[dict]:
    """Kernels of `ncu --csv --page raw` output, in profiling order: dicts with id, kernel,
    grid_x (first grid dimension, None without a Grid Size column) and the NCU_METRICS under
    their short names (durations in microseconds, whatever unit ncu printed). Lines before
    the header (==PROF== lines, the application's output) and lines that are not kernel rows
    are skipped; a missing header or metric column is a ValueError."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith('"ID"')), None)
    if start is None:
        raise ValueError("no ncu CSV header (a line starting with \"ID\") in the output")
    rows = list(csv.reader(line for line in lines[start:] if not line.startswith("==")))
    header = rows[0]
    missing = [c for c in ("ID", "Kernel Name", *NCU_METRICS) if c not in header]
    if missing:
        raise ValueError(f"ncu CSV lacks the columns {missing}")
    col = {name: header.index(name) for name in header}
    units = rows[1] if len(rows) > 1 and len(rows[1]) == len(header) and not rows[1][col["ID"]] else None
    time_unit = units[col["gpu__time_duration.sum"]] if units else "nsecond"
    if time_unit not in _TIME_UNITS:
        raise ValueError(f"ncu CSV: unknown unit {time_unit!r} of gpu__time_duration.sum")
    kernels = []
    for row in rows[1:]:
        if len(row) != len(header) or not row[col["ID"]].strip().isdigit():
            continue
        grid = re.findall(r"\d+", row[col["Grid Size"]]) if "Grid Size" in col else []
        k = {"id": int(row[col["ID"]]), "kernel": row[col["Kernel Name"]],
             "grid_x": int(grid[0]) if grid else None}
        for metric, short in NCU_METRICS.items():
            k[short] = _number(row[col[metric]])
        if k["ncu_time_us"] is not None:
            k["ncu_time_us"] *= _TIME_UNITS[time_unit]
        kernels.append(k)
    return sorted(kernels, key=lambda k: k["id"])


def note_row(experiment: str, note: str, case: dict | None = None) -> dict:
    """A part "ncu" row that carries no measurement, only why (of one case, or of all)."""
    return {"experiment": experiment, "part": "ncu", **(case or {}), "status": "ok", "note": note}


def attribute(kernels: list[dict], cases: list[dict], experiment: str, note: str = "") -> list[dict]:
    """Rows of part "ncu", one per profiled kernel of a case. The kernels after a marker belong
    to the case its grid names (the marker's place in the list when ncu printed no grid);
    a case with no kernel, and kernels before any marker, get a note row."""
    rows, seen, orphans, current, markers = [], set(), 0, None, 0
    for k in kernels:
        if MARKER in k["kernel"]:
            current = k["grid_x"] - 1 if k["grid_x"] is not None else markers
            markers += 1
            continue
        if current is None or not 0 <= current < len(cases):
            orphans += 1
            continue
        seen.add(current)
        rows.append({"experiment": experiment, "part": "ncu", **cases[current], "status": "ok",
                     "kernel": k["kernel"], "sm_throughput_pct": k["sm_throughput_pct"],
                     "dram_throughput_pct": k["dram_throughput_pct"], "ncu_time_us": k["ncu_time_us"],
                     "note": note})
    rows += [note_row(experiment, "ncu profiled no kernel of this case", case)
             for i, case in enumerate(cases) if i not in seen]
    if orphans:
        rows.append(note_row(experiment, f"{orphans} profiled kernels followed no case marker; left out"))
    return rows


def ncu_rows(experiment: str, cases: list[dict], setting: str, timeout_s: float) -> list[dict]:
    """Part "ncu" of the experiment: one ncu run over every case; never raises for ncu's sake."""
    ncu, why = find_ncu(setting)
    if ncu is None:
        return [note_row(experiment, why)]
    if not cases:
        return [note_row(experiment, "no case passed its check; nothing to profile")]
    version = ncu_version(ncu)
    torch.cuda.empty_cache()         # leave the GPU's memory to the profiled process
    with tempfile.TemporaryDirectory(prefix="roofline_ncu_") as tmp:
        cases_file = Path(tmp) / "cases.json"
        cases_file.write_text(json.dumps(cases))
        cmd = ncu_command(ncu, cases_file)
        print("running", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        rc, out, err = run_ncu(cmd, timeout_s)
    print(f"ncu: {time.perf_counter() - t0:.0f} s, exit status {rc}", flush=True)
    tail = " | ".join((out + "\n" + err).strip().splitlines()[-6:])
    if rc is None:
        return [note_row(experiment, f"ncu ran past {timeout_s:.0f} s and was stopped; its output ends: {tail}")]
    try:
        kernels = parse_ncu_csv(out)
    except ValueError as exc:
        return [note_row(experiment, f"ncu (exit status {rc}) gave no usable CSV ({exc}); its output ends: {tail}")]
    if not kernels:
        return [note_row(experiment, f"ncu (exit status {rc}) profiled no kernel; its output ends: {tail}")]
    rows = attribute(kernels, cases, experiment, f"Nsight Compute {version}".strip())
    if rc != 0:
        rows.append(note_row(experiment, f"ncu exited with status {rc}; its output ends: {tail}"))
    return rows


# ------------------------------------------------------------------------------------------
# The profiled process (python experiments/roofline.py --ncu-target CASES.json, under ncu)
# ------------------------------------------------------------------------------------------
def single_weights(K: int, N: int) -> ShapeWeights:
    """One copy of an [N, K] weight in each method's format: ncu flushes the caches itself,
    and every extra allocation is memory its kernel replay may save and restore."""
    qw = quantize(torch.randn(N, K, device="cuda").half(), GROUP_SIZE)
    errors, tg = {}, None
    try:
        tg = [tinygemm_weight(qw)]
    except Exception as exc:     # a torch without this kernel or format: its cases get no rows
        errors["tinygemm"] = f"{type(exc).__name__}: {exc}"
    return ShapeWeights([qw], [dequantize(qw)], tg, None, errors)


def ncu_target(cases: list[dict]) -> None:
    """Run each case once in the profiled region, after its marker; warm-ups run outside it.
    Prints to stderr only: ncu's CSV is on stdout."""
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    _roofline_case_marker[(1,)](flag)                     # compile the marker before profiling
    by_shape: dict[tuple[int, int], dict[int, list[int]]] = {}
    for i, c in enumerate(cases):
        by_shape.setdefault((c["K"], c["N"]), {}).setdefault(c["M"], []).append(i)
    for (K, N), by_M in by_shape.items():
        wts = single_weights(K, N)
        for M, idx in by_M.items():
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            methods, errors = methods_for(x, wts, tuple(cases[i]["method"] for i in idx))
            for name, err in errors.items():
                print(f"{name} K={K} N={N}: no weights ({err}); not profiled", file=sys.stderr)
            calls = {m.name: m.calls[0] for m in methods}
            for fn in calls.values():
                fn()
                fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            for i in idx:
                _roofline_case_marker[(i + 1,)](flag)
                if cases[i]["method"] in calls:
                    calls[cases[i]["method"]]()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        del wts
        torch.cuda.empty_cache()
    print(f"ncu target: {len(cases)} cases run", file=sys.stderr)


# ------------------------------------------------------------------------------------------
# As a runner of experiments/run.py (experiment.runner: roofline)
# ------------------------------------------------------------------------------------------
def check_experiment(cfg) -> None:
    """bench_w4a16's checks, gemlite refused, and ncu's settings typed right."""
    check_bench_experiment(cfg)
    exp = cfg.experiment
    if "gemlite" in exp.methods:
        raise ValueError(f"experiment.methods: gemlite is not profiled by roofline; known: {list(METHODS)}")
    ncu_setting(exp)
    if not float(exp.get("ncu_timeout_s", NCU_TIMEOUT_S)) > 0:
        raise ValueError(f"experiment.ncu_timeout_s must be > 0, got {exp.get('ncu_timeout_s')}")


def ncu_setting(exp) -> str:
    """experiment.ncu as "auto", "off" or a path (YAML reads a bare off as False)."""
    setting = exp.get("ncu", "auto")
    if setting is False:
        return "off"
    if not isinstance(setting, str) or not setting:
        raise ValueError(f"experiment.ncu must be auto, off or a path, got {setting!r}")
    return setting


def bench_row(row: dict, bandwidth: float) -> dict:
    """A bench_w4a16 row as a part "bench" row: its bytes and achieved bandwidth added."""
    nbytes = round(row["floor_us"] * bandwidth / 1e6)          # floor_us = bytes / bandwidth
    achieved = nbytes / (row["time_us"] * 1e-6) / 1e12 if row["time_us"] else None
    return {**row, "part": "bench", "bytes": nbytes, "achieved_tb_s": achieved,
            "weight_format": "fp16" if row["method"] == "cublas_fp16" else "int4"}


def run_experiment(cfg, bandwidth: float) -> tuple[list[dict], tuple[str, ...]]:
    """Part "bench" over the sweep, then part "ncu" over the cases that passed their check."""
    from tqdm import tqdm
    exp = cfg.experiment
    names = tuple(exp.methods)
    Ms = tuple(int(m) for m in exp.M)
    rows = []
    for K, N in tqdm(experiment_shapes(cfg), desc=f"{exp.name} ({cfg.shapes.name})", unit="shape"):
        rows += [bench_row(r, bandwidth) for r in
                 bench_shape(K, N, Ms, bandwidth, cfg.replays, False, experiment=exp.name, names=names)]
    keys = ("method", "weight_format", "M", "K", "N", "group_size", "dtype")
    cases = [{k: r[k] for k in keys} for r in rows if r["status"] == "ok"]
    rows += ncu_rows(exp.name, cases, ncu_setting(exp), float(exp.get("ncu_timeout_s", NCU_TIMEOUT_S)))
    return [{c: r.get(c) for c in COLUMNS} for r in rows], COLUMNS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The process Nsight Compute profiles (run by run_experiment).")
    p.add_argument("--ncu-target", type=Path, required=True, metavar="CASES.json",
                   help="the cases to run, a JSON list of {method, M, K, N, ...}")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("roofline --ncu-target: no CUDA GPU found; nothing run.", file=sys.stderr)
        return 0
    torch.manual_seed(0)
    ncu_target(json.loads(args.ncu_target.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
