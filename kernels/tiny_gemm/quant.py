"""Group-wise asymmetric INT4 weight quantization and the packed format the kernels read.

Format (``Int4Weight``), for a weight of nn.Linear shape [N, K] (out_features, in_features):

* ``packed``: uint8 [ceil(K / 128), N, 64], K-blocked: block b holds k = 128 b .. 128 b + 127
  of every output column, 64 bytes per column, the columns one after another. Byte
  ``packed[b, n, j]`` holds the code of k = 128 b + 2 j in its low nibble and of k = 128 b +
  2 j + 1 in its high nibble; codes past K are 0 (the kernels mask x there). Within a column
  K is contiguous, because the tensor-core B operand wants it: a thread's four consecutive
  bytes along K are one 32-bit shared-memory load that unpacks, in registers, straight into
  the operand's layout. Across columns the block is contiguous too, so the [BLOCK_N, 128]
  tile of one K-step is one run of BLOCK_N * 64 bytes: on an H100 this read the 117 MB of
  Llama-3-70B's down projection at M = 1 in 0.72x the time of the row-major [N, K / 2] layout
  (results/nvidia_h100_80gb_hbm3/scratch/layout_ab.txt). ``pack_rows`` gives the row-major
  bytes, whose four consecutive bytes of a row, read as a little-endian int32, are one
  AutoGPTQ ``qweight`` word (eight codes along K, lowest nibble first): GPTQ's qweight
  [K/8, N] is ``pack_rows(codes).view(int32).T``.
* ``scales``: [K // group_size, N] in fp16, bf16 or fp32.
* ``zeros``: [K // group_size, N], either int8 (integer zero points, as round-to-nearest and
  GPTQ give; ``quantize`` and ``from_gptq`` store these) or the scales' float dtype
  (fractional zero points, the HQQ / GemLite convention). The dtype picks the kernel's
  epilogue at compile time: an integer zero is subtracted from the codes in the tensor-core
  operand, exactly in fp16 and bf16; a fractional one needs the sum of x over each group.
* dequantized weight: ``w[n, k] = (code[n, k] - zeros[k // G, n]) * scales[k // G, n]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128, 256)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _require(cond: bool, exc: type[Exception], msg: str) -> None:
    if not cond:
        raise exc(msg)


def _check_group_size(group_size: int | None, K: int, arg: str = "group_size") -> int:
    """Return the effective group size (K for one group per row) or raise ValueError."""
    if group_size is None or group_size == -1:
        return K
    _require(isinstance(group_size, int) and not isinstance(group_size, bool), TypeError,
             f"{arg} must be an int in {GROUP_SIZES} or None, got {type(group_size).__name__}")
    _require(group_size in GROUP_SIZES or group_size == K, ValueError,
             f"{arg} must be one of {GROUP_SIZES} or None (one group per row), got {group_size}")
    _require(K % group_size == 0, ValueError,
             f"K = {K} (in_features) is not a multiple of {arg} = {group_size}")
    return group_size


# codes per K-block of the packed layout, and bytes per column of a block
K_BLOCK = 128
BLOCK_BYTES = K_BLOCK // 2


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> row-major bytes [N, ceil(K/2)] (even k in the low nibble)."""
    N, K = codes.shape
    if K % 2:
        codes = torch.cat([codes, codes.new_zeros(N, 1)], dim=1)
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def block_rows(rows: torch.Tensor) -> torch.Tensor:
    """Row-major bytes [N, R] -> the K-blocked layout [ceil(R / 64), N, 64], zero-padded."""
    N, R = rows.shape
    nb = -(-R // BLOCK_BYTES)
    padded = torch.zeros(N, nb * BLOCK_BYTES, dtype=torch.uint8, device=rows.device)
    padded[:, :R] = rows
    return padded.view(N, nb, BLOCK_BYTES).permute(1, 0, 2).contiguous()


def unblock_rows(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The K-blocked layout -> row-major bytes [N, ceil(K/2)]."""
    nb, N, _ = packed.shape
    return packed.permute(1, 0, 2).reshape(N, nb * BLOCK_BYTES)[:, :(K + 1) // 2].contiguous()


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> packed uint8 [ceil(K/128), N, 64] (see the module docstring)."""
    return block_rows(pack_rows(codes))


def unpack_codes(packed: torch.Tensor, K: int) -> torch.Tensor:
    """packed uint8 [ceil(K/128), N, 64] -> uint8 codes [N, K]."""
    rows = unblock_rows(packed, K)
    lo, hi = rows & 0xF, rows >> 4
    return torch.stack([lo, hi], dim=2).reshape(rows.shape[0], -1)[:, :K]


@dataclass(eq=False)
class Int4Weight:
    """A packed INT4 weight of logical shape ``shape = (N, K)``; see the module docstring."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        N, K = self.shape
        _require(self.packed.dtype == torch.uint8, TypeError,
                 f"packed must be uint8, got {self.packed.dtype}")
        blocks = (-(-K // K_BLOCK), N, BLOCK_BYTES)
        _require(tuple(self.packed.shape) == blocks, ValueError,
                 f"packed must be [ceil(K / {K_BLOCK}), N, {BLOCK_BYTES}] = {list(blocks)} for shape "
                 f"{self.shape}, got {list(self.packed.shape)}")
        _require(self.scales.dtype in FLOAT_DTYPES, TypeError,
                 f"scales must be one of {FLOAT_DTYPES}, got {self.scales.dtype}")
        _require(self.zeros.dtype in (self.scales.dtype, torch.int8), TypeError,
                 f"zeros must be int8 (integer zero points) or the scales' dtype {self.scales.dtype}, "
                 f"got {self.zeros.dtype}")
        _require(K % self.group_size == 0, ValueError,
                 f"K = {K} is not a multiple of group_size = {self.group_size}")
        groups = (K // self.group_size, N)
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            _require(tuple(t.shape) == groups, ValueError,
                     f"{name} must be [K // group_size, N] = {list(groups)}, got {list(t.shape)}")
        _require(self.packed.device == self.scales.device == self.zeros.device, ValueError,
                 "packed, scales and zeros must be on one device")
        # the kernels need each column's 64 bytes of a block contiguous and the columns of a
        # block one after another; the blocks may lie apart (the parts of ``split`` are views)
        if self.packed.stride(2) != 1 or self.packed.stride(1) != BLOCK_BYTES:
            self.packed = self.packed.contiguous()
        self.scales = self.scales.contiguous()
        self.zeros = self.zeros.contiguous()

    # --- properties -------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes a GEMM must read for this weight: packed codes, scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros))

    def to(self, device) -> "Int4Weight":
        return Int4Weight(self.packed.to(device), self.scales.to(device), self.zeros.to(device),
                          self.group_size, self.shape)

    def codes(self) -> torch.Tensor:
        """Unpacked codes, uint8 [N, K]."""
        return unpack_codes(self.packed, self.in_features)

    # --- row blocks -------------------------------------------------------------------------
    @classmethod
    def cat(cls, weights: "list[Int4Weight]") -> "Int4Weight":
        """The rows of `weights` one after another, as one weight (a copy): gate and up of a
        SwiGLU block, say, so that one GEMM reads both. ``split`` gives the parts back as
        views of it, which fused_gated_ffn recognises and reads in one pass."""
        _require(isinstance(weights, (list, tuple)) and len(weights) > 0
                 and all(isinstance(w, Int4Weight) for w in weights), TypeError,
                 "weights must be a non-empty list of Int4Weight")
        a = weights[0]
        for i, w in enumerate(weights[1:], 1):
            _require(w.in_features == a.in_features and w.group_size == a.group_size, ValueError,
                     f"weights[{i}] has K {w.in_features}, group_size {w.group_size}; "
                     f"weights[0] has {a.in_features}, {a.group_size}")
            _require(w.scales.dtype == a.scales.dtype and w.zeros.dtype == a.zeros.dtype, TypeError,
                     f"weights[{i}] has scales/zeros {w.scales.dtype}/{w.zeros.dtype}; "
                     f"weights[0] has {a.scales.dtype}/{a.zeros.dtype}")
            _require(w.device == a.device, ValueError,
                     f"weights[{i}] is on {w.device}, weights[0] on {a.device}")
        return cls(torch.cat([w.packed for w in weights], dim=1), torch.cat([w.scales for w in weights], dim=1),
                   torch.cat([w.zeros for w in weights], dim=1), a.group_size,
                   (sum(w.out_features for w in weights), a.in_features))

    def split(self, sizes: "list[int]") -> "list[Int4Weight]":
        """Row blocks of sizes[0], sizes[1], ... rows (summing to N). Their codes are views of
        this weight's memory; scales and zeros ([K // G, N], N contiguous) are copied, a few
        percent of the bytes. Each part remembers this weight, so that a kernel handed all
        of its parts in order can read this weight instead, in one pass (fused_gated_ffn
        does so for gate and up)."""
        _require(isinstance(sizes, (list, tuple)) and all(isinstance(n, int) and n > 0 for n in sizes)
                 and sum(sizes) == self.out_features, ValueError,
                 f"sizes must be positive ints summing to N = {self.out_features}, got {sizes}")
        parts, start = [], 0
        for n in sizes:
            cols = slice(start, start + n)
            part = Int4Weight(self.packed[:, cols], self.scales[:, cols], self.zeros[:, cols],
                              self.group_size, (n, self.in_features))
            part._part_of = (self, start, start + n)
            parts.append(part)
            start += n
        return parts

    # --- other formats ----------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int | None) -> "Int4Weight":
        """From unpacked codes [N, K] (0..15) and scales, zeros [N, K // group_size] (HQQ layout).

        Float zeros are kept as float (they may be fractional); pass int8 zeros to declare
        integer zero points, which the kernel applies more cheaply."""
        _require(isinstance(codes, torch.Tensor) and codes.dim() == 2, ValueError,
                 "codes must be a 2-D tensor [N, K]")
        _require(not codes.is_floating_point() and not codes.is_complex(), TypeError,
                 f"codes must be an integer tensor, got {codes.dtype}")
        N, K = codes.shape
        G = _check_group_size(group_size, K)
        _require(bool(((codes >= 0) & (codes <= 15)).all()), ValueError, "codes must lie in 0..15")
        _require(scales.dim() == 2 and tuple(scales.shape) == (N, K // G), ValueError,
                 f"scales must be [N, K // group_size] = {[N, K // G]}, got {list(scales.shape)}")
        _require(zeros.shape == scales.shape, ValueError,
                 f"zeros must have the shape of scales {list(scales.shape)}, got {list(zeros.shape)}")
        _require(scales.dtype in FLOAT_DTYPES, TypeError,
                 f"scales must be one of {FLOAT_DTYPES}, got {scales.dtype}")
        z = zeros.t() if zeros.dtype == torch.int8 else zeros.t().to(scales.dtype)
        return cls(pack_codes(codes.to(torch.uint8)), scales.t().contiguous(), z.contiguous(), G, (N, K))

    @classmethod
    def from_gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  group_size: int | None) -> "Int4Weight":
        """From AutoGPTQ int32 tensors (no act-order): qweight [K/8, N], qzeros [K/G, N/8]
        holding zero - 1, scales [K/G, N]."""
        for name, t in (("qweight", qweight), ("qzeros", qzeros)):
            _require(isinstance(t, torch.Tensor) and t.dtype == torch.int32, TypeError,
                     f"{name} must be an int32 tensor")
            _require(t.dim() == 2, ValueError, f"{name} must be 2-D, got {t.dim()}-D")
        K, N = qweight.shape[0] * 8, qweight.shape[1]
        G = _check_group_size(group_size, K)
        _require(tuple(scales.shape) == (K // G, N), ValueError,
                 f"scales must be [K // group_size, N] = {[K // G, N]}, got {list(scales.shape)}")
        _require(N % 8 == 0 and tuple(qzeros.shape) == (K // G, N // 8), ValueError,
                 f"qzeros must be [K // group_size, N // 8] = {[K // G, N // 8]}, got {list(qzeros.shape)}")
        _require(scales.dtype in FLOAT_DTYPES, TypeError,
                 f"scales must be one of {FLOAT_DTYPES}, got {scales.dtype}")
        # A qweight word is four of our row-major bytes along K, little-endian: a transpose.
        packed = block_rows(qweight.t().contiguous().view(torch.uint8))
        shifts = torch.arange(0, 32, 4, device=qzeros.device, dtype=torch.int32)
        z = ((qzeros.unsqueeze(-1) >> shifts) & 0xF).reshape(K // G, N) + 1
        return cls(packed, scales.contiguous(), z.to(torch.int8), G, (N, K))

    def to_gptq(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight [K/8, N], qzeros [K/G, N/8], scales [K/G, N]) in the AutoGPTQ int32 layout."""
        N, K = self.shape
        _require(K % 8 == 0 and N % 8 == 0, ValueError,
                 f"the GPTQ layout needs K and N multiples of 8, got shape {self.shape}")
        z = self.zeros.float()
        _require(bool(((z == z.round()) & (z >= 1) & (z <= 16)).all()), ValueError,
                 "zeros must be integers in 1..16 to be stored as GPTQ qzeros (zero - 1 in 4 bits)")
        qweight = unblock_rows(self.packed, K).view(torch.int32).t().contiguous()
        zc = (z - 1).to(torch.uint8)
        qzeros = (zc[:, 0::2] | (zc[:, 1::2] << 4)).flatten().view(torch.int32).reshape(-1, N // 8)
        return qweight, qzeros, self.scales.clone()


def joined_rows(*parts: Int4Weight) -> Int4Weight | None:
    """The weight that `parts` were split from (Int4Weight.split), when they are all of its
    parts in order; else None."""
    links = [getattr(p, "_part_of", None) for p in parts]
    if not parts or None in links:
        return None
    whole = links[0][0]
    if any(link[0] is not whole for link in links) or links[0][1] != 0 \
            or links[-1][2] != whole.out_features \
            or any(l0[2] != l1[1] for l0, l1 in zip(links, links[1:])):
        return None
    return whole


def quantize(w: torch.Tensor, group_size: int | None = 128) -> Int4Weight:
    """Asymmetric round-to-nearest INT4 quantization of w [N, K] in groups along K.

    Each group's range is widened to include 0, so zeros are integers in 0..15 (stored as
    int8) and an all-zero group is exact. Scales are rounded to w's dtype before the codes
    are chosen, so the stored scales are the ones the codes were fitted to.
    """
    _require(isinstance(w, torch.Tensor), TypeError, f"w must be a torch.Tensor, got {type(w).__name__}")
    _require(w.dtype in FLOAT_DTYPES, TypeError, f"w must be one of {FLOAT_DTYPES}, got {w.dtype}")
    _require(w.dim() == 2, ValueError, f"w must be 2-D [N, K] (nn.Linear layout), got shape {list(w.shape)}")
    N, K = w.shape
    _require(N > 0 and K > 0, ValueError, f"w must be non-empty, got shape {list(w.shape)}")
    G = _check_group_size(group_size, K)
    wg = w.float().reshape(N, K // G, G)
    lo = wg.amin(-1).clamp(max=0.0)
    hi = wg.amax(-1).clamp(min=0.0)
    scale = ((hi - lo) / 15.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(w.dtype).float()
    zero = (-lo / scale).round().clamp(0, 15)
    codes = (wg / scale.unsqueeze(-1) + zero.unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
    return Int4Weight(pack_codes(codes.reshape(N, K)), scale.t().to(w.dtype).contiguous(),
                      zero.t().to(torch.int8).contiguous(), G, (N, K))


def dequantize(qw: Int4Weight) -> torch.Tensor:
    """[N, K] weight in the scales' dtype (computed in fp32, rounded once)."""
    _require(isinstance(qw, Int4Weight), TypeError, f"qw must be an Int4Weight, got {type(qw).__name__}")
    return dequantize_float(qw, torch.float32).to(qw.dtype)


def dequantize_float(qw: Int4Weight, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[N, K] weight in a wide float dtype, for references."""
    N, K = qw.shape
    G = qw.group_size
    codes = unpack_codes(qw.packed, K).to(dtype).reshape(N, K // G, G)
    w = (codes - qw.zeros.t().to(dtype).unsqueeze(-1)) * qw.scales.t().to(dtype).unsqueeze(-1)
    return w.reshape(N, K)


def quantization_error(w: torch.Tensor, qw: Int4Weight) -> float:
    """Relative Frobenius error ||w - dequantize(qw)|| / ||w||, in float64."""
    w64 = w.double()
    return float(torch.linalg.norm(w64 - dequantize_float(qw).to(w64.device)) / torch.linalg.norm(w64))
