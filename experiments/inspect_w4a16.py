"""Compile W4A16 kernels and report what the compiler made of them: registers, spills, shared
memory, layout conversions in the TTGIR, and the SASS instruction mix (is the dot on the
tensor cores, how many byte permutes the unpack takes). Costs no timing runs.

    python experiments/inspect_w4a16.py [--out DIR]          # on this GPU
    python experiments/inspect_w4a16.py --offline [--arch 90] # no GPU needed: Triton's own
                                                              # ptxas and cuobjdump, for sm_<arch>
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from tiny_gemm import W4A16Config, quantize
from tiny_gemm.w4a16 import _launch

CONFIGS = [
    W4A16Config("dp", block_n=64, block_k=128, num_warps=4, num_stages=3),
    W4A16Config("splitk", block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=3),
    W4A16Config("streamk", block_n=64, block_k=128, num_warps=4, num_stages=3),
    W4A16Config("dp", block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3),
    W4A16Config("splitk", block_m=1, block_n=64, block_k=128, split_k=8, num_warps=4, num_stages=4),
    # tiles the H200 table picks for the large Llama-3 shapes
    W4A16Config("splitk", block_n=128, block_k=128, split_k=4, num_warps=2, num_stages=3),
    W4A16Config("splitk", block_n=256, block_k=128, split_k=2, num_warps=4, num_stages=3),
]
WATCH = ("HMMA", "HGMMA", "I2F", "F2F", "FFMA", "LOP3", "PRMT", "SHF", "LDG", "LDS", "STS", "LDSM", "BAR",
         "MEMBAR", "RED", "ATOM")


# A line of Triton's SASS: control codes, a tab, an optional predicate, the opcode.
_SASS_OP = re.compile(r"^[-0-9a-fA-FY:]+\t(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", re.M)


def sass_mix(kernel) -> dict:
    """Counts of the WATCH opcodes (and all instructions) in a compiled kernel's SASS."""
    try:
        sass = kernel.asm["sass"]
    except Exception as e:  # cuobjdump missing or another Triton version
        return {"sass_error": repr(e)[:80]}
    ops = collections.Counter(op.split(".")[0] for op in _SASS_OP.findall(sass))
    return {k: ops.get(k, 0) for k in WATCH} | {"total": sum(ops.values())}


# a line of cuobjdump -sass: /*offset*/, an optional predicate, the opcode
_CUOBJDUMP_OP = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", re.M)


def compile_offline(cfg: W4A16Config, dtype: str = "fp16", zero_int: bool = True, arch: int = 90):
    """Compile the kernel of cfg for sm_<arch> without a GPU; returns (row, ttgir). N, K,
    strides and pointers are taken as 16-divisible, as Triton specializes them at Llama sizes."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tiny_gemm import w4a16 as W
    fn = {"dp": W._w4a16_dp_kernel, "splitk": W._w4a16_splitk_kernel,
          "streamk": W._w4a16_streamk_kernel}[cfg.decomposition]
    act = torch.float16 if dtype == "fp16" else torch.bfloat16
    constexprs = W._kernel_meta(cfg, act, zero_int, min(cfg.block_k, W.K_BLOCK))
    ptrs = {"x_ptr": f"*{dtype}", "w_ptr": "*u8", "s_ptr": f"*{dtype}", "z_ptr": "*i8" if zero_int else f"*{dtype}",
            "out_ptr": f"*{dtype}", "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else ptrs.get(n, "i32") for n in names}
    aligned = set(ptrs) | {"N", "K", "group_size", "stride_xm", "stride_wb", "stride_om"}
    src = ASTSource(fn, sig, {(names.index(k),): v for k, v in constexprs.items() if k in names},
                    {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in aligned})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([str(bin_dir / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    ops = collections.Counter(op.split(".")[0] for op in _CUOBJDUMP_OP.findall(sass))
    ttgir = k.asm.get("ttgir", "")
    row = dict(dtype=dtype, zeros="int8" if zero_int else "float", **cfg.to_dict(),
               n_regs=int(usage.get("REG", 0)), n_spills=int(usage.get("LOCAL", 0)) + int(usage.get("STACK", 0)),
               shared=k.metadata.shared, convert_layout=ttgir.count("convert_layout"),
               local_alloc=ttgir.count("local_alloc"),
               **{w: ops.get(w, 0) for w in WATCH}, total=sum(ops.values()))
    return row, ttgir


def print_rows(rows: list[dict]) -> None:
    keys = ["dtype", "decomposition", "block_m", "block_n", "num_warps", "n_regs", "n_spills", "shared",
            "convert_layout", "HMMA", "HGMMA", "I2F", "LOP3", "PRMT", "LDG", "LDSM", "total"]
    print(" ".join(f"{k[:10]:>10}" for k in keys))
    for r in rows:
        print(" ".join(f"{str(r.get(k, '')):>10}" for k in keys))


def compile_on_gpu():
    """(row, ttgir) of each of CONFIGS in fp16 and bf16, compiled by launching it on this GPU."""
    K, N = 4096, 14336
    qw = quantize(torch.randn(N, K, dtype=torch.float16), 128).to("cuda")
    for dtype in (torch.float16, torch.bfloat16):
        for cfg in CONFIGS:
            M = min(cfg.block_m, 16) if cfg.block_m <= 16 else 64
            x = torch.randn(M, K, dtype=dtype, device="cuda")
            out = torch.empty(M, N, dtype=dtype, device="cuda")
            k = _launch(x, qw, out, cfg)
            ttgir = k.asm.get("ttgir", "")
            row = dict(dtype=str(dtype).split(".")[-1], **cfg.to_dict(), n_regs=k.n_regs, n_spills=k.n_spills,
                       shared=k.metadata.shared, convert_layout=ttgir.count("convert_layout"),
                       local_alloc=ttgir.count("local_alloc"), **sass_mix(k))
            yield row, ttgir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--offline", action="store_true", help="compile for --arch here, no GPU needed")
    ap.add_argument("--arch", type=int, default=90, help="compute capability for --offline (90: H100/H200)")
    args = ap.parse_args()
    if args.offline:
        cases = (compile_offline(cfg, dtype, arch=args.arch) for dtype in ("fp16", "bf16") for cfg in CONFIGS)
        json_name = "inspect_w4a16_offline.json"
    elif torch.cuda.is_available():
        cases = compile_on_gpu()
        json_name = "inspect_w4a16.json"
    else:
        print("no CUDA GPU: nothing to inspect here; --offline compiles for sm_90 without one")
        return
    rows = []
    for row, ttgir in cases:
        rows.append(row)
        if args.out:
            name = f"{row['decomposition']}_m{row['block_m']}_n{row['block_n']}_{row['dtype']}"
            Path(args.out, f"{name}.ttgir").write_text(ttgir)
    if args.out:
        Path(args.out, json_name).write_text(json.dumps(rows, indent=1))
    if args.offline:
        print(f"compiled for sm_{args.arch} with Triton's ptxas (no GPU used)")
    print_rows(rows)


if __name__ == "__main__":
    main()
