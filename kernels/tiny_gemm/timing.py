"""Timing helpers that follow the project's measurement method (shared/anchors/README.md).

* Copy bandwidth: ``b.copy_(a)`` on 2 GiB, bytes read + written, ``do_bench`` median.
* Every call reads its own copy of the weights, with enough copies to exceed 3x L2, so the
  weights come from HBM as in a real decode step where each layer has its own weights.
* All calls are captured in one CUDA graph and replayed; time per call = replay time / calls,
  so no CPU launch overhead is counted for any method.
* Floor = bytes that must move / copy bandwidth.

Importing this module needs no GPU; the functions that time raise RuntimeError without one.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch
import triton

from .w4a16 import gpu_slug

# The repository root when this file sits in a checkout (kernels/tiny_gemm/timing.py).
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("tiny_gemm.timing needs a CUDA GPU; torch.cuda.is_available() is False")


# ------------------------------------------------------------------------------------------
# Bandwidth, floors and byte counts
# ------------------------------------------------------------------------------------------
def copy_bandwidth(nbytes: int = 2 * 2**30, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the bytes read plus those written."""
    _require_cuda()
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def rotations(bytes_per_call: int, l2_bytes: int | None = None) -> int:
    """How many distinct copies of a call's data make a set larger than 3x L2 (at least 2)."""
    if l2_bytes is None:
        _require_cuda()
        l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, 3 * l2_bytes // bytes_per_call + 1)


def floor_us(nbytes: int, bandwidth: float) -> float:
    """The time in microseconds to move nbytes at `bandwidth` bytes/s."""
    return nbytes / bandwidth * 1e6


def w4a16_bytes(M: int, N: int, K: int, group_size: int, act_bytes: int = 2) -> int:
    """Bytes a W4A16 GEMM must move: int4 weights, fp16 scales and zeros, x and y."""
    weights = N * math.ceil(K / 2)
    scales_and_zeros = 2 * 2 * N * (K // group_size)
    return weights + scales_and_zeros + M * K * act_bytes + M * N * act_bytes


def fp16_gemm_bytes(M: int, N: int, K: int) -> int:
    """Bytes an fp16 GEMM must move: the [N, K] weight, x [M, K] and y [M, N]."""
    return 2 * (N * K + M * K + M * N)


# ------------------------------------------------------------------------------------------
# CUDA-graph timing
# ------------------------------------------------------------------------------------------
def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (q in 0..1) of an already sorted list."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_graph(fns: list[Callable[[], Any]], replays: int = 20, warmup: int = 3,
               warmup_ms: float = 20.0) -> dict:
    """Time calls from one CUDA graph that holds every fn once, in order.

    Each fn is run eagerly first (on a side stream, as the CUDA-graph docs ask), so Triton
    compiles and lazily cached buffers are allocated before capture. The graph is then
    replayed `warmup` times and for at least `warmup_ms` more: after the host-side set-up
    of a shape leaves the GPU idle, its clocks take milliseconds to come back, and without
    this the first method timed on a shape read up to 7% slow on an H200 (the same config
    timed twice in one bench run: 68.6 and 63.8 us). Times are per call: replay time /
    len(fns).
    """
    _require_cuda()
    if not fns:
        raise ValueError("time_graph needs at least one function")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    for _ in range(warmup):
        graph.replay()
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first.record()
    graph.replay()
    last.record()
    torch.cuda.synchronize()
    for _ in range(min(10_000, int(warmup_ms / max(first.elapsed_time(last), 1e-3)))):
        graph.replay()
    torch.cuda.synchronize()

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    per_call = sorted(s.elapsed_time(e) * 1e3 / len(fns) for s, e in zip(starts, ends))
    return {
        "median_us": _percentile(per_call, 0.5),
        "p20_us": _percentile(per_call, 0.2),
        "p80_us": _percentile(per_call, 0.8),
        "replays": replays,
        "calls_per_replay": len(fns),
    }


# ------------------------------------------------------------------------------------------
# Provenance
# ------------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    """stdout of a command, stripped, or None if it is missing or fails."""
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _driver_version() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    return version.decode() if isinstance(version, bytes) else version


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the measured tree. TINY_GEMM_GIT_COMMIT and TINY_GEMM_GIT_DIRTY (0/1)
    win when set: a copy of the tree on a remote GPU machine carries a .git that may be
    stale (one answered a commit three behind the copied tree, and dirty), so whoever made
    the copy says what it is. Otherwise git of the checkout this file sits in; else
    (None, None)."""
    if os.environ.get("TINY_GEMM_GIT_COMMIT"):
        dirty = os.environ.get("TINY_GEMM_GIT_DIRTY")
        return os.environ["TINY_GEMM_GIT_COMMIT"], (None if dirty is None else dirty == "1")
    commit = _run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT) if (_REPO_ROOT / ".git").exists() else None
    if commit is None:
        return None, None
    status = _run(["git", "status", "--porcelain"], cwd=_REPO_ROOT)
    return commit, (None if status is None else bool(status))


def provenance(config: dict | None = None) -> dict:
    """Where and with what a measurement was taken; the GPU fields are None without a GPU."""
    gpu = sm_count = l2_bytes = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu, sm_count, l2_bytes = props.name, props.multi_processor_count, props.L2_cache_size
    commit, dirty = _git_state()
    return {
        "gpu": gpu,
        "sm_count": sm_count,
        "l2_bytes": l2_bytes,
        "driver": _driver_version() if gpu is not None else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "hostname": socket.gethostname(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
    }


def results_dir(root: str | Path = "results") -> Path:
    """``<root>/<gpu slug>/`` for the current GPU (not created here)."""
    _require_cuda()
    return Path(root) / gpu_slug(torch.cuda.get_device_name(torch.cuda.current_device()))
