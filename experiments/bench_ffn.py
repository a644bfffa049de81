"""The SwiGLU FFN at decode batch sizes: tiny_gemm's fusion variants on fp16 weights and its INT4
path against the unfused PyTorch FFN, in one run. The runner of experiment ffn_fusion
(conf/experiment/ffn_fusion.yaml):

    PYTHONPATH=kernels python experiments/run.py experiment=ffn_fusion
    python experiments/run.py experiment=ffn_fusion 'experiment.M=[1,16]'

y = (silu(x W_gate^T) * (x W_up^T)) W_down^T for x [M, D] in fp16, M in experiment.M; D and F
are experiment.D and experiment.F, Llama-3-8B by default (4096, 14336), no biases (Llama has
none). The shape family (shapes=...) is not used.

Methods (experiment.methods):
  torch_fp16          the unfused PyTorch FFN: F.linear (cuBLAS) three times on nn.Linear
                      [out, in] weights, silu, mul
  tiny_gemm_none, tiny_gemm_epilogue, tiny_gemm_full
                      fused_gated_ffn on the same fp16 weights, passed as their [in, out] views
                      w.t() (no copy), with fusion "none", "epilogue" or "full"
  tiny_gemm_int4      fused_gated_ffn on Int4Weight weights (experiment.group_size): the INT4
                      path, w4a16_matmul for the three GEMMs
  tiny_gemm_int4_joined
                      the same INT4 weights with gate and up stored as one weight
                      (Int4Weight.cat([gate, up]).split([F, F])): one GEMM of N = 2F for both
All compute one function: the fp16 weights are the INT4 weights dequantized (as cuBLAS in
bench_w4a16.py), so one float64 reference, gated_ffn_reference on the INT4 weights, checks
every method (3 calls, normwise relative error <= 1e-2; tiny_gemm writes into a NaN-filled
out= buffer, its partial-sum workspaces NaN-filled too).

Measurement, as bench_w4a16.py: weights rotated past 3x L2 (two 352 MB copies of the fp16
FFN, timing.rotations copies of the INT4 one; x is shared), one CUDA graph, median of
cfg.replays replays with p20 and p80. floor_us is the method's own: fp16 weights + x + y for
the fp16 methods, INT4 bytes (packed codes, fp16 scales and zeros as timing.w4a16_bytes counts
them) + x + y for INT4; int4_floor_us, the INT4 problem's floor, is on every row. A method that
raises or fails its check is a FAILED row with the reason in `note`; the run goes on.
"""
from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as tnf

from tiny_gemm import timing
from tiny_gemm.ffn import fused_gated_ffn, gated_ffn_reference
from tiny_gemm.quant import GROUP_SIZES, Int4Weight, dequantize, quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import Method, check_and_time, nan_like  # noqa: E402
from bench_w4a16 import _fmt, check_methods_and_m, clone_int4  # noqa: E402

EXPERIMENT = "ffn_fusion"
DEVICE = "cuda"         # where weights and activations are made (a CPU check of this module sets "cpu")
DENSE_FUSIONS = {"tiny_gemm_none": "none", "tiny_gemm_epilogue": "epilogue", "tiny_gemm_full": "full"}
INT4_METHODS = ("tiny_gemm_int4", "tiny_gemm_int4_joined")
METHODS = ("torch_fp16", *DENSE_FUSIONS, *INT4_METHODS)
COLUMNS = ("experiment", "method", "M", "D", "F", "group_size", "weights", "dtype", "time_us",
           "p20_us", "p80_us", "floor_us", "pct_floor", "int4_floor_us", "rel_err", "status",
           "rotations", "note")


# ------------------------------------------------------------------------------------------
# Byte counts
# ------------------------------------------------------------------------------------------
def ffn_fp16_bytes(M: int, D: int, F: int) -> int:
    """Bytes the fp16 FFN must move: three [D, F]-sized fp16 weights, x [M, D] and y [M, D]
    (the intermediate h is what fusion may keep on chip, so it is not counted)."""
    return 2 * (3 * D * F + 2 * M * D)


def ffn_int4_bytes(M: int, D: int, F: int, group_size: int) -> int:
    """Bytes the INT4 FFN must move: gate and up [F, D] and down [D, F] as timing.w4a16_bytes
    counts a weight (packed codes, scales and zeros at 2 bytes each, as for the GEMM rows and the
    anchors; quantize stores int8 zeros, so the bytes read are 1.8 MB fewer), x and y in fp16."""
    weights = 2 * timing.w4a16_bytes(0, F, D, group_size) + timing.w4a16_bytes(0, D, F, group_size)
    return weights + 2 * 2 * M * D


# ------------------------------------------------------------------------------------------
# Weights and methods
# ------------------------------------------------------------------------------------------
def torch_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The unfused PyTorch SwiGLU FFN on nn.Linear [out, in] weights: three cuBLAS GEMMs, silu, mul."""
    return tnf.linear(tnf.silu(tnf.linear(x, w_gate)) * tnf.linear(x, w_up), w_down)


def _tiny_checked(x, w_gate, w_up, w_down, fusion: str) -> torch.Tensor:
    return fused_gated_ffn(x, w_gate, w_up, w_down, fusion=fusion, out=nan_like(x))


class FfnWeights:
    """The FFN's weights, rotated: int4[i] = (gate, up, down) Int4Weight copies, fp16[i] the
    same weights dequantized to fp16 [out, in] tensors; each list long enough to exceed 3x L2."""

    def __init__(self, D: int, F: int, group_size: int):
        def linear(out_f: int, in_f: int) -> torch.Tensor:   # activations stay O(1)
            return (torch.randn(out_f, in_f, device=DEVICE) / math.sqrt(in_f)).half()

        q = tuple(quantize(linear(o, i), group_size) for o, i in ((F, D), (F, D), (D, F)))
        n4 = timing.rotations(sum(w.nbytes for w in q))
        self.int4 = [q] + [tuple(clone_int4(w) for w in q) for _ in range(n4 - 1)]
        self._joined = None
        w16 = tuple(dequantize(w) for w in q)
        n16 = timing.rotations(sum(w.numel() * w.element_size() for w in w16))
        self.fp16 = [w16] + [tuple(w.clone() for w in w16) for _ in range(n16 - 1)]

    @property
    def int4_joined(self) -> list[tuple[Int4Weight, Int4Weight, Int4Weight]]:
        """int4 with gate and up of each copy stored as one weight and split into its two
        parts (made on first use: one more copy of the gate and up codes per rotation)."""
        if self._joined is None:
            self._joined = [(*Int4Weight.cat([g, u]).split([g.out_features, u.out_features]), d)
                            for g, u, d in self.int4]
        return self._joined


def build_method(name: str, x: torch.Tensor, wts: FfnWeights) -> Method:
    """The method `name` of METHODS on activations x [M, D]."""
    if name == "torch_fp16":
        calls = [partial(torch_ffn, x, *w) for w in wts.fp16]
        return Method(name, calls, calls[0], "F.linear x3 + silu + mul")
    if name in DENSE_FUSIONS:
        fusion = DENSE_FUSIONS[name]
        views = [tuple(t.t() for t in w) for w in wts.fp16]       # [in, out] views, no copy
        return Method(name, [partial(fused_gated_ffn, x, *w, fusion=fusion) for w in views],
                      partial(_tiny_checked, x, *views[0], fusion), f"fusion={fusion}")
    if name == "tiny_gemm_int4_joined":
        ws = wts.int4_joined
        return Method(name, [partial(fused_gated_ffn, x, *w) for w in ws],
                      partial(_tiny_checked, x, *ws[0], "auto"), "fusion=auto, gate and up as one weight")
    return Method(name, [partial(fused_gated_ffn, x, *w) for w in wts.int4],
                  partial(_tiny_checked, x, *wts.int4[0], "auto"), "fusion=auto (the INT4 path)")


def bench_M(M: int, D: int, F: int, group_size: int, wts: FfnWeights, names: tuple[str, ...],
            bandwidth: float, replays: int, experiment: str = EXPERIMENT) -> list[dict]:
    x = torch.randn(M, D, device=DEVICE, dtype=torch.float16)
    ref = gated_ffn_reference(x, *wts.int4[0])          # float64, on the INT4 weights
    floors = {"fp16": timing.floor_us(ffn_fp16_bytes(M, D, F), bandwidth),
              "int4": timing.floor_us(ffn_int4_bytes(M, D, F, group_size), bandwidth)}
    rows = []
    for name in names:
        weights = "int4" if name in INT4_METHODS else "fp16"
        method = build_method(name, x, wts)
        row = dict(experiment=experiment, method=name, M=M, D=D, F=F, group_size=group_size,
                   weights=weights, dtype="float16", time_us=None, p20_us=None, p80_us=None,
                   floor_us=floors[weights], pct_floor=None, int4_floor_us=floors["int4"],
                   rel_err=None, status="FAILED", rotations=len(method.calls), note="")
        rows.append(check_and_time(row, method, ref, replays))
        print(format_row(rows[-1]), flush=True)
    return rows


def format_row(r: dict) -> str:
    return (f"M={r['M']:<3} {r['method']:<20} {r['status']:<6} time {_fmt(r['time_us'], '8.2f')} us  "
            f"floor {_fmt(r['floor_us'], '6.2f')} us  {_fmt(r['pct_floor'], '5.1f')}%  "
            f"int4 floor {_fmt(r['int4_floor_us'], '6.2f')} us  rel_err {_fmt(r['rel_err'], '.2e')}")


# ------------------------------------------------------------------------------------------
# As a runner of experiments/run.py (experiment.runner: bench_ffn)
# ------------------------------------------------------------------------------------------
def check_experiment(cfg) -> None:
    """A misspelt method, an empty sweep or sizes the INT4 format cannot hold are a ValueError
    before any GPU work. The shape family of the config is not used."""
    exp = cfg.experiment
    if not exp.methods:
        raise ValueError("experiment.methods is empty: nothing to measure")
    check_methods_and_m(exp, METHODS)
    G = int(exp.group_size)
    if G not in GROUP_SIZES:
        raise ValueError(f"experiment.group_size must be one of {GROUP_SIZES}, got {G}")
    for key in ("D", "F"):
        if int(exp[key]) < 1 or int(exp[key]) % G:
            raise ValueError(f"experiment.{key} = {exp[key]} must be a positive multiple of group_size {G}")


def run_experiment(cfg, bandwidth: float) -> tuple[list[dict], tuple[str, ...]]:
    """Every method at every M on one set of rotated weights: rows and their columns."""
    exp = cfg.experiment
    D, F, G = int(exp.D), int(exp.F), int(exp.group_size)
    wts = FfnWeights(D, F, G)
    rows = []
    for M in (int(m) for m in exp.M):
        rows += bench_M(M, D, F, G, wts, tuple(exp.methods), bandwidth, cfg.replays, exp.name)
    return rows, COLUMNS
