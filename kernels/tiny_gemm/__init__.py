"""tiny_gemm: Triton kernels for small-batch LLM decode.

    import tiny_gemm
    qw = tiny_gemm.quantize(w, group_size=128)        # w: [N, K] (nn.Linear layout)
    y = tiny_gemm.w4a16_matmul(x, qw)                 # x: [..., K] fp16/bf16 -> [..., N]
    y = torch.ops.tiny_gemm.w4a16_mm(x, qw.packed, qw.scales, qw.zeros, qw.group_size, qw.in_features)
    o = tiny_gemm.fused_attention(q, k, v, causal=True)          # prefill, FlashAttention-2 style
    o = tiny_gemm.decode_attention(q, k_cache, v_cache, lens)    # one token per sequence, split-KV
    y = tiny_gemm.fused_gated_ffn(x, w_gate, w_up, w_down)       # SwiGLU; [in, out] or Int4Weight
"""
from .quant import Int4Weight, dequantize, quantization_error, quantize
from .dequant import dequantize_triton
from .w4a16 import W4A16Config, select_config, w4a16_matmul, w4a16_reference
from .attention import (DecodeConfig, attention_dropout_mask, attention_reference, decode_attention,
                        decode_attention_reference, fused_attention, select_decode_config)
from .ffn import ffn_reference, fused_ffn, fused_gated_ffn, gated_ffn_reference
from . import ops  # noqa: F401  (registers torch.ops.tiny_gemm.w4a16_mm; attention and ffn register theirs)

__all__ = [
    "Int4Weight", "quantize", "dequantize", "dequantize_triton", "quantization_error",
    "W4A16Config", "select_config", "w4a16_matmul", "w4a16_reference",
    "fused_attention", "attention_reference", "attention_dropout_mask",
    "decode_attention", "decode_attention_reference", "DecodeConfig", "select_decode_config",
    "fused_ffn", "fused_gated_ffn", "ffn_reference", "gated_ffn_reference",
]
__version__ = "0.1.0"
