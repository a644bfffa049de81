"""Compile W4A16 kernels on this GPU and report what the compiler made of them: registers,
spills, shared memory, layout conversions in the TTGIR, and the SASS instruction mix (is the
dot on the tensor cores, does the unpack use int->float conversions). Costs no timing runs.

    python experiments/inspect_w4a16.py [--out DIR]
"""
from __future__ import annotations

import argparse
import collections
import json
import re
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to inspect")
        return
    K, N = 4096, 14336
    qw = quantize(torch.randn(N, K, dtype=torch.float16), 128).to("cuda")
    rows = []
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
            rows.append(row)
            if args.out:
                name = f"{cfg.decomposition}_m{cfg.block_m}_n{cfg.block_n}_{row['dtype']}"
                Path(args.out, f"{name}.ttgir").write_text(ttgir)
    if args.out:
        Path(args.out, "inspect_w4a16.json").write_text(json.dumps(rows, indent=1))
    keys = ["dtype", "decomposition", "block_m", "block_n", "n_regs", "n_spills", "shared",
            "convert_layout", "HMMA", "HGMMA", "I2F", "LOP3", "PRMT", "LDG", "LDSM", "total"]
    print(" ".join(f"{k[:10]:>10}" for k in keys))
    for r in rows:
        print(" ".join(f"{str(r.get(k, '')):>10}" for k in keys))


if __name__ == "__main__":
    main()
