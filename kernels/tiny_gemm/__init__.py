"""tiny_gemm: Triton kernels for small-batch LLM decode.

    import tiny_gemm
    qw = tiny_gemm.quantize(w, group_size=128)        # w: [N, K] (nn.Linear layout)
    y = tiny_gemm.w4a16_matmul(x, qw)                 # x: [..., K] fp16/bf16 -> [..., N]
    y = torch.ops.tiny_gemm.w4a16_mm(x, qw.packed, qw.scales, qw.zeros, qw.group_size, qw.in_features)
"""
from .quant import Int4Weight, dequantize, quantization_error, quantize
from .w4a16 import W4A16Config, select_config, w4a16_matmul, w4a16_reference
from . import ops  # noqa: F401  (registers torch.ops.tiny_gemm.*)

__all__ = [
    "Int4Weight", "quantize", "dequantize", "quantization_error",
    "W4A16Config", "select_config", "w4a16_matmul", "w4a16_reference",
]
__version__ = "0.1.0"
