"""Run the tuned W4A16 kernels once each (after a warm-up) for a profiler, and dump what the
compiler made of them (TTGIR, PTX, SASS) to --out. Under Nsight Compute:

    ncu --kernel-name regex:_w4a16 --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        --section WarpStateStats python experiments/profile_w4a16.py --out DIR
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tiny_gemm import quantize, select_config
from tiny_gemm.w4a16 import _launch

CASES = ((1, 4096, 14336), (16, 4096, 14336))   # the FMA path and the tensor-core path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to profile")
        return
    for M, K, N in CASES:
        qw = quantize(torch.randn(N, K, dtype=torch.float16, device="cuda"), 128)
        x = torch.randn(M, K, dtype=torch.float16, device="cuda")
        out = torch.empty(M, N, dtype=torch.float16, device="cuda")
        cfg = select_config(M, N, K, 128, x.device)
        for _ in range(2):   # warm-up: compile, size the scratch
            k = _launch(x, qw, out, cfg)
        torch.cuda.synchronize()
        k = _launch(x, qw, out, cfg)
        torch.cuda.synchronize()
        print(M, K, N, cfg, "regs", k.n_regs, "spills", k.n_spills, "shared", k.metadata.shared)
        if args.out:
            for ext in ("ttgir", "ptx", "sass"):
                try:
                    Path(args.out, f"m{M}_{cfg.decomposition}.{ext}").write_text(k.asm[ext])
                except Exception as e:  # sass needs cuobjdump
                    print(f"no {ext}: {e!r}")


if __name__ == "__main__":
    main()
