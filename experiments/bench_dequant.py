"""Runner of the dequant_breakdown experiment (experiments/run.py, experiment.runner:
bench_dequant): where the time of an INT4 GEMM goes, with the in-kernel cost of
dequantization measured, not estimated.

    PYTHONPATH=kernels python experiments/run.py experiment=dequant_breakdown [shapes=llama3_8b]

Methods, each a row per shape and M in bench_w4a16's columns plus `note`:

* dequant_kernel        tiny_gemm.dequant.dequantize_triton alone, into one [N, K] fp16 buffer
                        (x is not read). Floor: the INT4 weight read plus the fp16 weight
                        written. Check: bitwise equal to quant.dequantize.
* cublas_fp16           F.linear on the pre-dequantized fp16 weight: the GEMM step of a
                        two-step pipeline.
* dequant_then_gemm     dequantize_triton into that buffer, then F.linear on it, in one timed
                        call: the two-step pipeline with a good dequantization kernel.
* dequant_fp16          quant.dequantize (PyTorch) then F.linear: what a naive user does.
* tiny_gemm             the fused kernel, decomposition "auto" (the tuned table).
* tiny_gemm_no_dequant  the fused kernel with tiny_gemm's launch configuration, its unpacking and
                        zero point removed (w4a16._launch(..., ablate_dequant=True)): the raw
                        bytes, zero-extended, are the tensor-core operands; the scale epilogue is
                        kept. Its results are wrong by design: its check is only that it writes
                        every element, the same way each time; its status is "ablated" and its
                        rel_err (against the true result) is recorded, not required. The
                        ablation exists on the tensor-core path only, so where the tuned
                        configuration is the FMA path (block_m = 1) it runs with block_m = 16,
                        and its note says so.

Every other method must pass bench_w4a16's check (float64 reference, rel_err <= 1e-2, output
poisoned with NaN) or is FAILED and not timed. Timing is bench_w4a16's: weight copies rotated
past 3x L2, one CUDA graph, medians with p20/p80. The two dequantizing pipelines write every
call into the one buffer, as a pipeline with one scratch weight would.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F

from tiny_gemm import timing
from tiny_gemm.dequant import dequantize_triton
from tiny_gemm.quant import Int4Weight, dequantize
from tiny_gemm.w4a16 import W4A16Config, _launch, select_config, w4a16_reference

from bench_w4a16 import (CSV_COLUMNS, GROUP_SIZE, Method, ShapeWeights, build_weights,
                         check_experiment as check_bench_experiment, experiment_shapes, format_row,
                         measure, methods_for, rel_err)

# the methods of bench_w4a16 this experiment reuses, and its own
REUSED = ("cublas_fp16", "dequant_fp16", "tiny_gemm")
METHODS = ("dequant_kernel", "cublas_fp16", "dequant_then_gemm", "dequant_fp16", "tiny_gemm",
           "tiny_gemm_no_dequant")
COLUMNS = (*CSV_COLUMNS, "note")
NOTES = {
    "dequant_kernel": "dequantize_triton alone; floor: INT4 weight read + fp16 weight written; bitwise check",
    "cublas_fp16": "F.linear on the pre-dequantized fp16 weight (the GEMM step of two)",
    "dequant_then_gemm": "dequantize_triton + F.linear in one call (two steps)",
    "dequant_fp16": "torch dequantize + F.linear (two steps, naive)",
    "tiny_gemm": "fused, tuned config",
    "tiny_gemm_no_dequant": "fused, dequant ablated (no unpack, no zero point): wrong by design",
}


# ------------------------------------------------------------------------------------------
# The methods of this experiment that bench_w4a16 does not have
# ------------------------------------------------------------------------------------------
def _dequant_bitwise_checked(qw: Int4Weight, expected: torch.Tensor) -> torch.Tensor:
    """dequantize_triton into a NaN-poisoned buffer; AssertionError (measure() then reports
    the method FAILED) unless its fp16 result is bit-identical to `expected`."""
    out = dequantize_triton(qw, torch.full_like(expected, math.nan))
    differ = int((out.view(torch.int16) != expected.view(torch.int16)).sum())
    if differ:
        raise AssertionError(f"dequantize_triton differs from quant.dequantize in {differ} elements")
    return out


def _dequant_then_gemm(x: torch.Tensor, qw: Int4Weight, w_buf: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dequantize_triton(qw, w_buf))


def _dequant_then_gemm_checked(x: torch.Tensor, qw: Int4Weight, w_buf: torch.Tensor) -> torch.Tensor:
    """The two steps through a NaN-poisoned weight buffer: a weight left unwritten shows."""
    return _dequant_then_gemm(x, qw, torch.full_like(w_buf, math.nan))


def _ablated(x: torch.Tensor, qw: Int4Weight, cfg: W4A16Config, out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = torch.empty(x.shape[0], qw.out_features, dtype=x.dtype, device=x.device)
    _launch(x, qw, out, cfg, ablate_dequant=True)
    return out


def _ablated_checked(x: torch.Tensor, qw: Int4Weight, cfg: W4A16Config) -> torch.Tensor:
    return _ablated(x, qw, cfg, torch.full((x.shape[0], qw.out_features), math.nan, dtype=x.dtype, device=x.device))


def ablation_config(M: int, N: int, K: int, device: torch.device) -> tuple[W4A16Config, str]:
    """tiny_gemm's configuration for the ablated kernel, and a note when it had to change."""
    cfg = select_config(M, N, K, GROUP_SIZE, device, "auto")
    if cfg.block_m != 1:
        return cfg, ""
    return (replace(cfg, block_m=16),
            "block_m forced to 16: the tuned config is the FMA path (block_m 1), which has no ablated form")


def breakdown_methods(x: torch.Tensor, wts: ShapeWeights, names: tuple[str, ...],
                      w_buf: torch.Tensor, ref: torch.Tensor) -> list[tuple[Method, str]]:
    """(method, note) for each of `names` in that order, at activations x [M, K]; w_buf is
    the [N, K] fp16 weight buffer of the two-step pipelines, ref the float64 reference."""
    M, K = x.shape
    qw0 = wts.qws[0]
    N = qw0.out_features
    # (the errors methods_for returns concern the peers' weights, which this experiment does not use)
    reused, _ = methods_for(x, wts, tuple(n for n in names if n in REUSED))
    built = {m.name: (m, NOTES[m.name]) for m in reused}
    int4_bytes = timing.w4a16_bytes(M, N, K, GROUP_SIZE)
    if "dequant_kernel" in names:
        expected = dequantize(qw0)
        calls = [partial(dequantize_triton, q, w_buf) for q in wts.qws]
        built["dequant_kernel"] = (Method(
            "dequant_kernel", "fp16", qw0.nbytes + w_buf.numel() * w_buf.element_size(), calls,
            checked=partial(_dequant_bitwise_checked, qw0, expected), ref=expected.double()),
            NOTES["dequant_kernel"])
    if "dequant_then_gemm" in names:
        # its floor is the INT4 problem's, like dequant_fp16's: the bytes that must move
        calls = [partial(_dequant_then_gemm, x, q, w_buf) for q in wts.qws]
        checked = partial(_dequant_then_gemm_checked, x, qw0, w_buf)
        built["dequant_then_gemm"] = (Method("dequant_then_gemm", "fp16", int4_bytes, calls, checked, ref),
                                      NOTES["dequant_then_gemm"])
    if "tiny_gemm_no_dequant" in names:
        cfg, why = ablation_config(M, N, K, x.device)
        calls = [partial(_ablated, x, q, cfg) for q in wts.qws]
        # checked against its own first output: every element written, the same way each time
        own = _ablated(x, qw0, cfg).double()
        built["tiny_gemm_no_dequant"] = (Method(
            "tiny_gemm_no_dequant", "fp16", int4_bytes, calls, partial(_ablated_checked, x, qw0, cfg), own,
            config=json.dumps(cfg.to_dict(), sort_keys=True)),
            "; ".join(filter(None, (NOTES["tiny_gemm_no_dequant"], why))))
    return [built[n] for n in names]


# ------------------------------------------------------------------------------------------
# As a runner of experiments/run.py
# ------------------------------------------------------------------------------------------
def check_experiment(cfg) -> None:
    """A misspelt method or an empty sweep is a ValueError before any GPU work."""
    if not cfg.experiment.methods:
        raise ValueError("experiment.methods is empty")
    check_bench_experiment(cfg, METHODS)


def run_experiment(cfg, bandwidth: float) -> tuple[list[dict], tuple[str, ...]]:
    """Every method of the experiment at every M over the shapes: rows and their columns."""
    from tqdm import tqdm
    exp = cfg.experiment
    names = tuple(exp.methods)
    rows = []
    for K, N in tqdm(experiment_shapes(cfg), desc=f"{exp.name} ({cfg.shapes.name})", unit="shape"):
        wts = build_weights(K, N, with_gemlite=False)
        w_buf = torch.empty(N, K, dtype=torch.float16, device="cuda")
        for M in (int(m) for m in exp.M):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            ref = w4a16_reference(x, wts.qws[0])
            for method, note in breakdown_methods(x, wts, names, w_buf, ref):
                row = measure(method, M, K, N, bandwidth, cfg.replays, exp.name)
                if method.name == "tiny_gemm_no_dequant" and row["status"] == "ok":
                    row.update(status="ablated", rel_err=rel_err(method.ref, ref))
                row["note"] = note
                rows.append(row)
                print(format_row(row), flush=True)
        del wts, w_buf
        torch.cuda.empty_cache()
    return rows, COLUMNS
