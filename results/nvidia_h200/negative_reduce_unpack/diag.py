"""Where the time of the W4A16 GEMM goes at M = 1 (diagnostic, not a result)."""
import sys, os, json, time
from functools import partial
import torch, triton, triton.language as tl
sys.path.insert(0, "experiments")
from tiny_gemm import timing, w4a16 as W
from tiny_gemm.quant import quantize
from bench_w4a16 import clone_int4

OUT = os.environ.get("OUT", "/tmp")
rows = []
def rec(**r):
    rows.append(r); print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)

@triton.jit
def empty_kernel(p):
    if tl.program_id(0) == 100000:
        tl.store(p, 1)

@triton.jit(do_not_specialize=["M", "iters_per_split", "n_splits"])
def diag_splitk(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, group_size,
                stride_xm, stride_wb, stride_om, iters_per_split, n_splits,
                MAGIC: tl.constexpr, MAGIC_OFFSET: tl.constexpr, ZERO_INT: tl.constexpr,
                ABLATE_DEQUANT: tl.constexpr, INTERPRET: tl.constexpr, W_BLOCK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                NUM_THREADS: tl.constexpr, REDUCE_UNROLL: tl.constexpr, MODE: tl.constexpr):
    tile_id = tl.program_id(0)
    split = tl.program_id(1)
    pid_m, pid_n = W._tile_coords(tile_id, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    it_lo = split * iters_per_split
    it_hi = min(it_lo + iters_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if MODE != 2:
        acc = W._mac_tile(acc, x_ptr, w_ptr, s_ptr, z_ptr, pid_m, pid_n, it_lo, it_hi,
                          M, N, K, group_size, stride_xm, stride_wb, W_BLOCK, MAGIC, MAGIC_OFFSET, ZERO_INT,
                          ABLATE_DEQUANT, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET)
    if MODE == 1:   # partial to its slot, no ticket, no sum
        TILE: tl.constexpr = BLOCK_M * BLOCK_N
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] < M
        tl.store(ws_ptr + (tile_id * n_splits + split) * TILE + offs, acc, mask=rows)
    else:
        W._reduce_partial(acc, tile_id, split, n_splits, pid_m, pid_n, out_ptr, ws_ptr, lock_ptr,
                          M, N, stride_om, n_splits, BLOCK_M, BLOCK_N, NUM_THREADS, INTERPRET, REDUCE_UNROLL)

def diag_launch(x2, qw, out2, cfg, mode):
    M, K = x2.shape; N = qw.out_features; G = qw.group_size
    bk = min(cfg.block_k, G, 128); bm, bn = cfg.block_m, cfg.block_n
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn); k_iters = triton.cdiv(K, bk)
    per = triton.cdiv(k_iters, min(cfg.split_k, k_iters)); parts = triton.cdiv(k_iters, per)
    meta = W._kernel_meta(cfg, x2.dtype, True, bk, interpret=W._interpreting())
    locks = W._tile_locks(x2.device, tiles)
    ws = torch.empty(tiles * parts * bm * bn, dtype=torch.float32, device=x2.device)
    diag_splitk[(tiles, parts)](x2, qw.packed, qw.scales, qw.zeros, out2, ws, locks, M, N, K, G,
                                x2.stride(0), qw.packed.stride(0), out2.stride(0), per, parts,
                                **meta, MODE=mode, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

@triton.jit
def read_tiles(w_ptr, out_ptr, N, stride_wb32, iters_per_split, k_iters, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """Read the packed weights in the GEMM's tile order (16 words per column per K-block), xor them."""
    tile = tl.program_id(0); split = tl.program_id(1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, 16)
    ptrs = w_ptr + offs_n[None, :] * 16 + offs_r[:, None]
    acc = tl.zeros((16, BLOCK_N), tl.int32)
    lo = split * iters_per_split
    hi = min(lo + iters_per_split, k_iters)
    for it in tl.range(lo, hi, num_stages=STAGES):
        acc ^= tl.load(ptrs + it * stride_wb32)
    tl.store(out_ptr + tile * 1024 + split, tl.xor_sum(tl.xor_sum(acc, 0), 0))

@triton.jit
def read_flat(w_ptr, out_ptr, n_words, CHUNK: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in tl.range(0, CHUNK, BLOCK, num_stages=STAGES):
        o = pid * CHUNK + i + offs
        acc ^= tl.load(w_ptr + o, mask=o < n_words, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(acc, 0))

def main():
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    bw = timing.copy_bandwidth()
    rec(what="gpu", name=gpu, copy_bw_TBs=bw / 1e12)
    p = torch.zeros(1, dtype=torch.int32, device=dev)
    for grid, nw in ((132, 4), (512, 2), (1024, 2)):
        r = timing.time_graph([partial(empty_kernel[(grid,)], p, num_warps=nw)] * 20)
        rec(what="empty", grid=grid, warps=nw, us=r["median_us"])
    torch.cuda.synchronize()
    shapes = [(14336, 4096), (4096, 14336), (4096, 28672), (2048, 4096), (4096, 4096), (8192, 4096), (28672, 4096)]
    for K, N in shapes:
        qw = quantize(torch.randn(N, K, dtype=torch.float16, device=dev) / K**0.5, 128)
        qws = [qw] + [clone_int4(qw) for _ in range(timing.rotations(qw.nbytes) - 1)]
        x = torch.randn(1, K, dtype=torch.float16, device=dev)
        out = torch.empty(1, N, dtype=torch.float16, device=dev)
        nbytes = timing.w4a16_bytes(1, N, K, 128)
        fl = timing.floor_us(nbytes, bw)
        cfg = W.select_config(1, N, K, 128, dev)
        if cfg.decomposition != "splitk":
            cfg_s = W.heuristic_config(1, N, K, 128, 132)
        else:
            cfg_s = cfg
        t = timing.time_graph([partial(W._launch, x, w, out, cfg) for w in qws])["median_us"]
        rec(what="shipped", K=K, N=N, floor=fl, us=t, pct=100 * fl / t, cfg=str(cfg))
        for mode, name in ((0, "diag_full"), (1, "no_reduce"), (2, "reduce_only")):
            t = timing.time_graph([partial(diag_launch, x, w, out, cfg_s, mode) for w in qws])["median_us"]
            rec(what=name, K=K, N=N, floor=fl, us=t, pct=100 * fl / t, split=cfg_s.split_k, bn=cfg_s.block_n)
        if (K, N) in ((14336, 4096), (4096, 28672)):
            for s in (1, 2, 4, 8, 16, 32):
                c2 = W.W4A16Config("splitk", block_m=16, block_n=cfg_s.block_n, split_k=s, num_warps=2)
                for mode, name in ((0, "full"), (1, "no_reduce")):
                    t = timing.time_graph([partial(diag_launch, x, w, out, c2, mode) for w in qws])["median_us"]
                    rec(what=f"split_sweep_{name}", K=K, N=N, split=s, us=t, pct=100 * fl / t)
        # pure reads of the packed weights
        if (K, N) not in ((14336, 4096), (4096, 28672)):
            del qws; torch.cuda.empty_cache(); continue
        k_iters = K // 128
        sink = torch.empty(1 << 20, dtype=torch.int32, device=dev)
        wbytes = qw.packed.numel()
        wfl = timing.floor_us(wbytes, bw)
        best = None
        for bn in (64, 128, 256):
            for s in (1, 2, 4, 8, 16):
                for st in (2, 3, 4):
                    for nw in (2, 4):
                        per = triton.cdiv(k_iters, s); parts = triton.cdiv(k_iters, per)
                        fns = [partial(read_tiles[(N // bn, parts)], w.packed.view(torch.int32), sink, N,
                                       w.packed.stride(0) // 4, per, k_iters, BLOCK_N=bn, STAGES=st, num_warps=nw) for w in qws]
                        t = timing.time_graph(fns)["median_us"]
                        if best is None or t < best[0]:
                            best = (t, bn, s, st, nw)
        rec(what="read_tiles_best", K=K, N=N, wfloor=wfl, us=best[0], pct=100 * wfl / best[0], cfg=str(best[1:]))
        best = None
        for chunk in (4096, 16384, 65536):
            for blk in (1024, 2048):
                for st in (2, 4):
                    nwords = wbytes // 4
                    fns = [partial(read_flat[(triton.cdiv(nwords, chunk),)], w.packed.view(torch.int32), sink, nwords,
                                   CHUNK=chunk, BLOCK=blk, STAGES=st, num_warps=4) for w in qws]
                    t = timing.time_graph(fns)["median_us"]
                    if best is None or t < best[0]:
                        best = (t, chunk, blk, st)
        rec(what="read_flat_best", K=K, N=N, wfloor=wfl, us=best[0], pct=100 * wfl / best[0], cfg=str(best[1:]))
        del qws
        torch.cuda.empty_cache()
    json.dump(rows, open(f"{OUT}/diag.json", "w"), indent=1, default=str)

if __name__ == "__main__":
    main()
