"""Host-side pieces every kernel module shares: the interpreter switch, the choice of backend,
and the validation of a caller's ``out`` buffer."""
from __future__ import annotations

import os

import torch

from .quant import _require

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on the CPU, one program at a time."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, device: torch.device) -> bool:
    """"auto" runs Triton on CUDA tensors or under the interpreter, else the PyTorch reference;
    "triton" and "torch" force one (a ValueError where Triton cannot run)."""
    _require(backend in BACKENDS, ValueError, f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        _require(device.type == "cuda" or interpreting(), ValueError,
                 "backend='triton' needs CUDA tensors or TRITON_INTERPRET=1")
    return backend == "triton" or (backend == "auto" and (device.type == "cuda" or interpreting()))


def check_out(out, shape, like: torch.Tensor, ref_name: str) -> torch.Tensor:
    """out, checked to be a contiguous tensor of `shape` with like's dtype and device (named
    ref_name in the errors); a new one when out is None."""
    if out is None:
        return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
    _require(isinstance(out, torch.Tensor), TypeError, "out must be a torch.Tensor")
    _require(out.dtype == like.dtype, TypeError, f"out must have {ref_name}'s dtype {like.dtype}, got {out.dtype}")
    _require(tuple(out.shape) == tuple(shape), ValueError, f"out must have shape {list(shape)}, got {list(out.shape)}")
    _require(out.device == like.device, ValueError, f"out is on {out.device}, {ref_name} on {like.device}")
    _require(out.is_contiguous(), ValueError, "out must be contiguous")
    return out
