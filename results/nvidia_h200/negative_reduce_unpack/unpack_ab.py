"""fp16 unpack with 2 PRMT + 4 LOP3 and the high nibble as 1024 + 16 q (one HFMA2 removes it), against HEAD
of the parent commit (tiny_gemm_old, a copy of its kernels/tiny_gemm), on every entry of this
GPU's tuned table, rounds interleaved in one process. Rotated weights, CUDA graph, median."""
import sys, os, json, statistics
from functools import partial
import torch
sys.path.insert(0, os.path.dirname(__file__))
import tiny_gemm_var.w4a16 as VAR
import tiny_gemm.w4a16 as OLD
from tiny_gemm import timing, w4a16 as NEW
from tiny_gemm.quant import quantize, Int4Weight

def clone(qw):
    return Int4Weight(qw.packed.clone(), qw.scales.clone(), qw.zeros.clone(), qw.group_size, qw.shape)

dev = torch.device("cuda")
gpu = torch.cuda.get_device_name()
print("gpu", gpu, "torch", torch.__version__, flush=True)
table = NEW.load_config_table(gpu)
rows = []
ROUNDS = 5
print(f"{'M':>2} {'K':>5} {'N':>5}  {'config':44} {'old':>7} {'new':>7} {'new/old':>7} {'err_new':>8} {'err_old':>8}", flush=True)
for (K, N, G), entries in sorted(table.items()):
    qw = quantize(torch.randn(N, K, dtype=torch.float16, device=dev) / K**0.5, G)
    qws = [qw] + [clone(qw) for _ in range(timing.rotations(qw.nbytes) - 1)]
    for M in [m for m in sorted(entries) if m in (1, 16)]:
        x = torch.randn(M, K, dtype=torch.float16, device=dev)
        out = torch.empty(M, N, dtype=torch.float16, device=dev)
        cfg = NEW.select_config(M, N, K, G, dev)
        ref = NEW.w4a16_reference(x, qw)
        errs = {}
        for name, mod in (("old", OLD), ("new", VAR)):
            out.fill_(float("nan"))
            c = mod.W4A16Config(**cfg.to_dict())
            mod._launch(x, qw, out, c)
            torch.cuda.synchronize()
            errs[name] = ((out.double() - ref).norm() / ref.norm()).item()
        t = {"old": [], "new": []}
        for _ in range(ROUNDS):
            for name, mod in (("old", OLD), ("new", VAR)):
                c = mod.W4A16Config(**cfg.to_dict())
                t[name].append(timing.time_graph([partial(mod._launch, x, q, out, c) for q in qws])["median_us"])
        med = {k: statistics.median(v) for k, v in t.items()}
        r = dict(M=M, K=K, N=N, config=cfg.to_dict(), old_us=med["old"], new_us=med["new"],
                 ratio=med["new"] / med["old"], err_new=errs["new"], err_old=errs["old"])
        rows.append(r)
        cs = f"{cfg.decomposition} m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} k{cfg.split_k}"
        print(f"{M:>2} {K:>5} {N:>5}  {cs:44} {med['old']:7.2f} {med['new']:7.2f} {r['ratio']:7.3f} {errs['new']:8.1e} {errs['old']:8.1e}", flush=True)
    del qws
    torch.cuda.empty_cache()
# splits at M = 1 with the new reduction, for the tuner's sake
print("split sweep skipped", flush=True)
prov = timing.provenance(config={"script": "unpack_ab.py", "rounds": ROUNDS})
json.dump({"provenance": prov, "rows": rows}, open(os.path.join(os.environ.get("OUT", "/tmp"), "unpack_ab.json"), "w"), indent=1, default=str)
r = [x["ratio"] for x in rows if "ratio" in x]
print(f"new/old over {len(r)} entries: median {statistics.median(r):.3f}, min {min(r):.3f}, max {max(r):.3f}")
