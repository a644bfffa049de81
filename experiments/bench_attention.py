"""Fused attention against torch SDPA (each backend pinned in turn, and its default) and naive
PyTorch: decode over batch x context and causal prefill over sequence length, in one run.
The runner of experiment attention_fusion (conf/experiment/attention_fusion.yaml):

    PYTHONPATH=kernels python experiments/run.py experiment=attention_fusion
    python experiments/run.py experiment=attention_fusion 'experiment.decode.batch=[1,16]' 'experiment.prefill.methods=[]'

Shapes: experiment.heads query heads, experiment.kv_heads KV heads (grouped-query attention),
experiment.head_dim, experiment.dtype; Llama-3-8B by default (32, 8, 128, float16). The shape
family (shapes=...) is not used.

Parts (an empty methods list skips one):
  decode   one query token per sequence (no causal flag) over full KV caches [B, Hkv, ctx, D]
           (cache_seqlens = ctx), for B in decode.batch and ctx in decode.context. floor_us =
           bytes that must move (K and V caches, q and the output) / copy bandwidth, and
           pct_floor = floor / time.
  prefill  B sequences of S tokens, causal, Nq = Nk = S, for B in prefill.batch and S in
           prefill.seq_len. tflops = 4 B H S^2 D / 2 / time (q k^T and p v over the causal
           half, FlashAttention's count); no floor (compute-bound).

Methods:
  tiny_gemm       decode_attention (split-KV; check_seqlens=False in the timed calls, so no
                  host sync is timed) or fused_attention (FlashAttention-2 style); decode
                  with the config a user gets (this GPU's tuned table, else the heuristic;
                  `note` says which)
  tiny_gemm_heuristic
                  decode only: decode_attention with the heuristic config, what a shape outside
                  the tuned grid (or a GPU without a table) gets
  sdpa_default    F.scaled_dot_product_attention with enable_gqa=True, backend of torch's choice
  sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math
                  the same with that backend pinned (torch.nn.attention.sdpa_kernel)
  naive           eager attention as a model without fused kernels writes it (Hugging Face's
                  eager path): KV heads repeated to H (a copy), q k^T * scale, the causal mask
                  (prefill), softmax, @ v, all in the input dtype, everything inside the timed call
A pinned backend that rejects the GQA call (enable_gqa=True, KV with Hkv heads) is a FAILED row
with torch's reason in `note`; with experiment.kv_repeat_fallback it is then also measured as
<method>_kvrep on KV heads repeated to H outside the timed region, which reads H / Hkv times
the KV bytes (its floor stays the GQA problem's: the bytes that must move).

Measurement, as bench_w4a16.py: every method is first checked against the float64
attention_reference (3 calls, normwise relative error <= 1e-2; tiny_gemm writes into a
NaN-filled out= buffer and, for decode, a NaN-filled split workspace; SDPA and naive take no
out=), then timed from one CUDA graph over rotated copies of q, k and v (enough to exceed 3x
L2, for prefill too: cheap, and the inputs then come from HBM as in a model), median of
cfg.replays replays, with p20 and p80. A method that raises or fails its check is a FAILED row
with the reason in `note`; the run goes on.

Columns: see COLUMNS. bench_ffn.py shares Method, check_and_time and poisoned_workspaces.
"""
from __future__ import annotations

import math
import sys
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tiny_gemm.attention as tg_attention
import tiny_gemm.w4a16 as tg_w4a16
from tiny_gemm import timing
from tiny_gemm.attention import (HEAD_DIMS, attention_reference, decode_attention, fused_attention,
                                 heuristic_decode_config, tuned_decode_config)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_w4a16 import MAX_REL_ERR, _fmt, worst_rel_err  # noqa: E402

EXPERIMENT = "attention_fusion"
PARTS = ("decode", "prefill")
# SDPA methods that pin one backend: the name of its torch.nn.attention.SDPBackend member
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}
METHODS = ("tiny_gemm", "tiny_gemm_heuristic", "sdpa_default", *SDPA_BACKENDS, "naive")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
COLUMNS = ("experiment", "part", "method", "B", "H", "Hkv", "D", "Nq", "Nk", "dtype", "time_us",
           "p20_us", "p80_us", "floor_us", "pct_floor", "tflops", "rel_err", "status", "rotations",
           "note")
NOTE_CHARS = 400        # a FAILED row's reason is cut to this many characters
DEVICE = "cuda"         # where inputs are made (a CPU check of this module sets "cpu")


# ------------------------------------------------------------------------------------------
# Checking and timing (shared with bench_ffn.py)
# ------------------------------------------------------------------------------------------
@dataclass
class Method:
    """One way to compute an output. calls[i] reads rotation i of the inputs; checked()
    returns the output to compare with the reference (written into a NaN-filled buffer where
    the method takes out=); note says how it is called (it goes to the CSV)."""

    name: str
    calls: list[Callable[[], torch.Tensor]]
    checked: Callable[[], torch.Tensor]
    note: str = ""


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous buffer of t's shape and dtype full of NaN: what a kernel fails to write stays NaN."""
    return torch.full(t.shape, math.nan, dtype=t.dtype, device=t.device)


@contextmanager
def poisoned_workspaces():
    """NaN-fill the decode split workspace and the SplitK / fused-FFN partial slots before every
    launch (as the tests do), so that a read of a slot nobody wrote shows in the output."""
    saved = tg_attention.POISON_WORKSPACE, tg_w4a16.POISON_WORKSPACE
    tg_attention.POISON_WORKSPACE = tg_w4a16.POISON_WORKSPACE = True
    try:
        yield
    finally:
        tg_attention.POISON_WORKSPACE, tg_w4a16.POISON_WORKSPACE = saved


def _one_line(*parts: str) -> str:
    text = "; ".join(p for p in parts if p)
    text = " ".join(text.split())       # one line
    return text if len(text) <= NOTE_CHARS else text[:NOTE_CHARS - 3] + "..."


def _label(row: dict) -> str:
    keys = ("part", "B", "Nk", "M")
    return f"{row['method']} " + " ".join(f"{k}={row[k]}" for k in keys if k in row)


def check_and_time(row: dict, method: Method, ref: torch.Tensor, replays: int) -> dict:
    """Check `method` against `ref`, then, if right, time it. Fills row's rel_err, status,
    time_us, p20_us, p80_us, pct_floor (where row has a floor_us) and note. Never raises: a
    method that raises or fails its check is FAILED, with the reason in note; rel_err stays
    None when the check itself raised (the method could not run at all)."""
    row.update(status="FAILED", note=method.note)
    try:
        with warnings.catch_warnings(record=True) as caught, poisoned_workspaces():
            warnings.simplefilter("always")
            err = worst_rel_err(method.checked, ref)
    except Exception as exc:
        # SDPA explains in warnings why a pinned backend refused before it raises
        why = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        row["note"] = _one_line(method.note, f"{type(exc).__name__}: {exc}", *why)
        print(f"{_label(row)} raised:\n{traceback.format_exc()}", file=sys.stderr)
        return row
    row["rel_err"] = err
    if not err <= MAX_REL_ERR:          # NaN fails too
        row["note"] = _one_line(method.note, f"rel_err {err:.3g} > {MAX_REL_ERR}")
        print(f"{_label(row)}: FAILED, rel_err {err:.3g} > {MAX_REL_ERR}", file=sys.stderr)
        return row
    try:
        t = timing.time_graph(method.calls, replays=replays)
    except Exception as exc:
        row["note"] = _one_line(method.note, f"timing raised {type(exc).__name__}: {exc}")
        print(f"{_label(row)}: timing raised:\n{traceback.format_exc()}", file=sys.stderr)
        return row
    row.update(time_us=t["median_us"], p20_us=t["p20_us"], p80_us=t["p80_us"], status="ok")
    if row.get("floor_us"):
        row["pct_floor"] = 100 * row["floor_us"] / t["median_us"]
    return row


# ------------------------------------------------------------------------------------------
# Byte and FLOP counts
# ------------------------------------------------------------------------------------------
def decode_bytes(B: int, H: int, Hkv: int, S: int, D: int, itemsize: int = 2) -> int:
    """Bytes a decode step must move: the K and V caches [B, Hkv, S, D], q and the output [B, H, D]."""
    return itemsize * (2 * B * Hkv * S * D + 2 * B * H * D)


def attention_flops(B: int, H: int, Nq: int, Nk: int, D: int, causal: bool) -> float:
    """FLOPs of q k^T and p v (2 per multiply-add each) over the (query, key) pairs as
    FlashAttention counts them: Nq Nk, less Nq^2 / 2 when causal (S^2 / 2 at Nq = Nk = S)."""
    pairs = Nq * Nk - (Nq * Nq / 2 if causal else 0)
    return 4.0 * B * H * pairs * D


def tflops(flops: float, time_us: float) -> float:
    return flops / (time_us * 1e-6) / 1e12


# ------------------------------------------------------------------------------------------
# Inputs and methods
# ------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """One attention problem: q [B, H, Nq, D] and k, v [B, Hkv, Nk, D] (decode: Nq = 1, full caches)."""

    part: str
    B: int
    H: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    dtype: torch.dtype

    @property
    def causal(self) -> bool:
        return self.part == "prefill"

    def bytes_per_call(self, kv_heads: int | None = None) -> int:
        """q, k, v and the output of one call (k and v with kv_heads heads, default Hkv)."""
        hkv = self.Hkv if kv_heads is None else kv_heads
        return self.dtype.itemsize * self.D * self.B * (2 * self.H * self.Nq + 2 * hkv * self.Nk)


@dataclass
class Inputs:
    """The rotated copies of one problem's inputs: call i reads q[i], k[i], v[i]."""

    q: list[torch.Tensor]
    k: list[torch.Tensor]
    v: list[torch.Tensor]


def make_inputs(p: Problem) -> Inputs:
    """Enough copies of q, k, v (standard normal) to exceed 3x L2 (timing.rotations)."""
    n = timing.rotations(p.bytes_per_call())

    def randn(heads: int, N: int) -> list[torch.Tensor]:
        return [torch.randn(p.B, heads, N, p.D, device=DEVICE, dtype=p.dtype) for _ in range(n)]

    return Inputs(randn(p.H, p.Nq), randn(p.Hkv, p.Nk), randn(p.Hkv, p.Nk))


def repeat_kv(p: Problem, inp: Inputs) -> Inputs:
    """KV heads repeated to H (query head h reads kv head h // (H / Hkv), as in GQA), with as
    many copies as the larger working set needs."""
    n = min(len(inp.q), timing.rotations(p.bytes_per_call(kv_heads=p.H)))
    group = p.H // p.Hkv
    return Inputs(inp.q[:n], [k.repeat_interleave(group, dim=1) for k in inp.k[:n]],
                  [v.repeat_interleave(group, dim=1) for v in inp.v[:n]])


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eager attention as Hugging Face's eager path writes it: KV heads repeated to q's (a
    copy), q k^T * 1/sqrt(D), the boolean mask (True: hidden) filled with -inf, softmax, @ v,
    all in q's dtype."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, backend: str | None) -> torch.Tensor:
    """F.scaled_dot_product_attention, GQA by enable_gqa when k has fewer heads than q; with
    `backend` (an SDPBackend member name) the only backend allowed."""
    kwargs = {"is_causal": causal}
    if k.shape[1] != q.shape[1]:
        kwargs["enable_gqa"] = True
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _tiny_decode_checked(q, k, v, seqlens, config=None):
    q3 = q.squeeze(2)
    return decode_attention(q3, k, v, seqlens, out=nan_like(q3), config=config).unsqueeze(2)


def _short_decode(cfg) -> str:
    """'splits 2, 64-key steps, 4 warps, 3 stages[, L2 prefetch of the first block]' of a DecodeConfig."""
    return (f"splits {cfg.num_splits}, {cfg.block_n}-key steps, {cfg.num_warps} warps, "
            f"{cfg.num_stages} stages{', L2 prefetch of the first block' if cfg.prefetch else ''}")


def _tiny_prefill_checked(q, k, v):
    return fused_attention(q, k, v, True, out=nan_like(q))


def build_method(name: str, p: Problem, inp: Inputs) -> Method:
    """The method `name` of METHODS (or <sdpa method>_kvrep on repeated KV) over inp. Every
    output is [B, H, Nq, D]."""
    rot = list(zip(inp.q, inp.k, inp.v))
    q0, k0, v0 = rot[0]
    if name.startswith("tiny_gemm") and p.part == "decode":
        seqlens = torch.full((p.B,), p.Nk, dtype=torch.int32, device=q0.device)
        heuristic = heuristic_decode_config(p.B * p.Hkv, p.Nk, q0.device)
        if name == "tiny_gemm":      # what a user gets: the tuned table of this GPU, else the heuristic
            cfg = None
            tuned = tuned_decode_config(p.B * p.Hkv, p.Nk, p.D, p.H // p.Hkv, q0.device)
            note = f"tuned table {_short_decode(tuned)}" if tuned else f"heuristic {_short_decode(heuristic)}"
        else:                        # the heuristic alone: what a shape outside the tuned grid gets
            cfg, note = heuristic, f"heuristic {_short_decode(heuristic)}"
        return Method(name, [partial(decode_attention, q.squeeze(2), k, v, seqlens, check_seqlens=False, config=cfg)
                             for q, k, v in rot],
                      partial(_tiny_decode_checked, q0, k0, v0, seqlens, cfg), note)
    if name == "tiny_gemm_heuristic":
        raise ValueError("tiny_gemm_heuristic is a decode method (prefill has no tuned table)")
    if name == "tiny_gemm":
        return Method(name, [partial(fused_attention, q, k, v, True) for q, k, v in rot],
                      partial(_tiny_prefill_checked, q0, k0, v0))
    if name == "naive":
        mask = None
        if p.causal:   # one mask per shape, built outside the timed region as a model builds it once
            mask = torch.ones(p.Nq, p.Nk, dtype=torch.bool, device=q0.device).triu(p.Nk - p.Nq + 1)
        calls = [partial(naive_attention, q, k, v, mask) for q, k, v in rot]
        return Method(name, calls, calls[0], "KV repeated inside the call")
    base = name.removesuffix("_kvrep")
    backend = SDPA_BACKENDS.get(base)          # None: sdpa_default
    if name.endswith("_kvrep"):
        note = f"KV heads repeated to H outside the timed region ({p.H // p.Hkv}x the KV bytes)"
    else:
        note = "enable_gqa=True" if p.H != p.Hkv else ""
    note = _one_line(f"pinned {backend}" if backend else "torch's choice of backend", note)
    calls = [partial(sdpa, q, k, v, p.causal, backend) for q, k, v in rot]
    return Method(name, calls, calls[0], note)


def new_row(experiment: str, p: Problem, method: str, floor: float | None, rotations: int) -> dict:
    return dict(experiment=experiment, part=p.part, method=method, B=p.B, H=p.H, Hkv=p.Hkv, D=p.D,
                Nq=p.Nq, Nk=p.Nk, dtype=str(p.dtype).removeprefix("torch."), time_us=None,
                p20_us=None, p80_us=None, floor_us=floor, pct_floor=None, tflops=None,
                rel_err=None, status="FAILED", rotations=rotations, note="")


def bench_problem(p: Problem, names: tuple[str, ...], bandwidth: float, replays: int,
                  kv_repeat_fallback: bool, experiment: str = EXPERIMENT) -> list[dict]:
    """Every method of `names` on problem p: one row each, plus a _kvrep row for each SDPA
    backend that rejects the GQA call when kv_repeat_fallback."""
    inp = make_inputs(p)
    ref = attention_reference(inp.q[0], inp.k[0], inp.v[0], causal=p.causal)      # float64
    floor = (timing.floor_us(decode_bytes(p.B, p.H, p.Hkv, p.Nk, p.D, p.dtype.itemsize), bandwidth)
             if p.part == "decode" else None)
    flops = attention_flops(p.B, p.H, p.Nq, p.Nk, p.D, p.causal)
    rows = []

    def measure(name: str, data: Inputs) -> dict:
        row = check_and_time(new_row(experiment, p, name, floor, len(data.q)),
                             build_method(name, p, data), ref, replays)
        if row["status"] == "ok" and p.part == "prefill":
            row["tflops"] = tflops(flops, row["time_us"])
        print(format_row(row), flush=True)
        return row

    repeated = None
    for name in names:
        rows.append(measure(name, inp))
        refused = rows[-1]["status"] != "ok" and rows[-1]["rel_err"] is None
        if refused and kv_repeat_fallback and name in SDPA_BACKENDS and p.H != p.Hkv:
            if repeated is None:
                repeated = repeat_kv(p, inp)
            rows.append(measure(f"{name}_kvrep", repeated))
    del inp, repeated, ref
    torch.cuda.empty_cache()
    return rows


def format_row(r: dict) -> str:
    return (f"{r['part']:<7} B={r['B']:<3} Nq={r['Nq']:<5} Nk={r['Nk']:<5} {r['method']:<20} "
            f"{r['status']:<6} time {_fmt(r['time_us'], '9.2f')} us  floor {_fmt(r['floor_us'], '7.2f')} us "
            f"{_fmt(r['pct_floor'], '5.1f')}%  {_fmt(r['tflops'], '6.1f')} TFLOP/s  "
            f"rel_err {_fmt(r['rel_err'], '.2e')}")


# ------------------------------------------------------------------------------------------
# As a runner of experiments/run.py (experiment.runner: bench_attention)
# ------------------------------------------------------------------------------------------
def _positive_ints(values, what: str) -> list[int]:
    if values is None or not len(values) or any(int(v) < 1 for v in values):
        raise ValueError(f"{what} must list integers >= 1, got {values if values is None else list(values)}")
    return [int(v) for v in values]


def problems(cfg) -> list[Problem]:
    """The problems of the experiment, decode then prefill; a part without methods has none."""
    exp = cfg.experiment
    H, Hkv, D, dtype = int(exp.heads), int(exp.kv_heads), int(exp.head_dim), DTYPES[exp.dtype]
    out = []
    if exp.decode.methods:
        for B in _positive_ints(exp.decode.batch, "experiment.decode.batch"):
            for ctx in _positive_ints(exp.decode.context, "experiment.decode.context"):
                out.append(Problem("decode", B, H, Hkv, 1, ctx, D, dtype))
    if exp.prefill.methods:
        for B in _positive_ints(exp.prefill.batch, "experiment.prefill.batch"):
            for S in _positive_ints(exp.prefill.seq_len, "experiment.prefill.seq_len"):
                out.append(Problem("prefill", B, H, Hkv, S, S, D, dtype))
    return out


def check_experiment(cfg) -> None:
    """A misspelt method, an impossible head layout or an empty sweep is a ValueError before
    any GPU work. The shape family of the config is not used."""
    exp = cfg.experiment
    for part in PARTS:
        if part not in exp:
            raise ValueError(f"experiment.{part} is missing (give it methods: [] to skip it)")
        unknown = set(exp[part].methods) - set(METHODS)
        if unknown:
            raise ValueError(f"experiment.{part}.methods: unknown {sorted(unknown)}; known: {list(METHODS)}")
    if exp.dtype not in DTYPES:
        raise ValueError(f"experiment.dtype must be one of {list(DTYPES)}, got {exp.dtype!r}")
    if int(exp.head_dim) not in HEAD_DIMS:
        raise ValueError(f"experiment.head_dim must be one of {HEAD_DIMS}, got {exp.head_dim}")
    H, Hkv = int(exp.heads), int(exp.kv_heads)
    if Hkv < 1 or H < 1 or H % Hkv:
        raise ValueError(f"experiment.heads ({H}) must be a positive multiple of experiment.kv_heads ({Hkv})")
    if not problems(cfg):
        raise ValueError("nothing to measure: experiment.decode.methods and experiment.prefill.methods are both empty")


def run_experiment(cfg, bandwidth: float) -> tuple[list[dict], tuple[str, ...]]:
    """Every method of each part at every point of its sweep: rows and their columns."""
    from tqdm import tqdm
    exp = cfg.experiment
    rows = []
    for p in tqdm(problems(cfg), desc=exp.name, unit="problem"):
        names = tuple(exp[p.part].methods)
        rows += bench_problem(p, names, bandwidth, cfg.replays, bool(exp.kv_repeat_fallback), exp.name)
    return rows, COLUMNS
