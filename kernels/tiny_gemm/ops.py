"""torch.library registrations, so the kernels compose with torch.compile and CUDA graphs.

An Int4Weight is not a tensor, so the op takes its parts:
    torch.ops.tiny_gemm.w4a16_mm(x, qw.packed, qw.scales, qw.zeros, qw.group_size, qw.in_features)
"""
from __future__ import annotations

import torch

from .quant import Int4Weight
from .w4a16 import w4a16_matmul


@torch.library.custom_op("tiny_gemm::w4a16_mm", mutates_args=())
def w4a16_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             group_size: int, in_features: int, decomposition: str = "auto", split_k: int = 0,
             deterministic: bool = False) -> torch.Tensor:
    """W4A16 GEMM on the parts of an Int4Weight; split_k = 0 means unset."""
    qw = Int4Weight(packed, scales, zeros, group_size, (packed.shape[1], in_features))
    return w4a16_matmul(x, qw, decomposition, split_k or None, deterministic)


@w4a16_mm.register_fake
def _(x, packed, scales, zeros, group_size, in_features, decomposition="auto", split_k=0,
      deterministic=False):
    torch._check(x.shape[-1] == in_features, lambda: "x.shape[-1] must equal in_features")
    torch._check(packed.dim() == 3, lambda: "packed must be [ceil(K / 128), N, 64]")
    return x.new_empty((*x.shape[:-1], packed.shape[1]))
