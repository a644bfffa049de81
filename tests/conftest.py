"""Shared test set-up. Without a CUDA GPU the Triton kernels run under the interpreter, which
must be switched on before tiny_gemm (and its @triton.jit functions) is imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

# Normwise relative error bounds against the float64 reference. The kernel accumulates in
# fp32, so what is left is the rounding of the output to fp16 (2^-11) or bf16 (2^-8).
TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (running under the Triton interpreter)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poisoned_workspace(monkeypatch):
    """NaN-fill the SplitK/StreamK partial-tile workspace before every launch in the tests."""
    import tiny_gemm.w4a16
    monkeypatch.setattr(tiny_gemm.w4a16, "POISON_WORKSPACE", True)


def replay_after(fn, refill):
    """Capture fn() in a CUDA graph, refill() its inputs in place, replay: the graph's output,
    which must then hold fn of the new inputs. Compile fn outside the capture first."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    refill()
    g.replay()
    torch.cuda.synchronize()
    return out


def poisoned(shape, dtype, device=DEVICE):
    """An output buffer full of NaN: an element the kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_close_to_ref(out, ref, dtype):
    """Every element written and finite; normwise and elementwise error within TOL[dtype]."""
    out64 = out.double()
    assert torch.isfinite(out64).all(), f"{(~torch.isfinite(out64)).sum().item()} elements unwritten or non-finite"
    ref = ref.to(out64.device)
    scale = ref.norm().clamp_min(1e-30)
    rel = ((out64 - ref).norm() / scale).item()
    assert rel <= TOL[dtype], f"relative error {rel:.3e} > {TOL[dtype]:.1e}"
    worst = (out64 - ref).abs().max().item()
    bound = 4 * TOL[dtype] * ref.abs().max().item() + 1e-6
    assert worst <= bound, f"max abs error {worst:.3e} > {bound:.3e}"
