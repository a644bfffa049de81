"""Run one experiment of conf/experiment/ over one shape family of conf/shapes/ on this GPU.

    python experiments/run.py experiment=int4_vs_fp16 shapes=llama3_8b
    python -m experiments.run experiment=splitk_vs_dp 'experiment.M=[1,16]'
    python experiments/run.py shapes=llama3_70b 'extra_shapes=[[8192,6144]]' force=true

Every method is checked against the float64 reference (output poisoned with NaN) before it is
timed, with the method of bench_w4a16.py (weights rotated past 3x L2, CUDA-graph replay,
medians with p20/p80, % of the floor at the measured copy bandwidth). Writes a tidy
results/<gpu>/<experiment>.csv (one row per method, M and shape) and a JSON beside it with the
provenance and the full resolved config; an existing result is kept unless force=true.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from tiny_gemm import timing

# bench_w4a16.py sits beside this file: its weights, methods and measurement are the ones used
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_w4a16 import METHODS, bench_shape, setup_gemlite, write_results  # noqa: E402


def experiment_shapes(cfg: DictConfig) -> list[tuple[int, int]]:
    """(K, N) of the shape family's layers and the extra shapes, each once, in order."""
    shapes = [(int(layer.K), int(layer.N)) for layer in cfg.shapes.layers]
    shapes += [(int(k), int(n)) for k, n in cfg.extra_shapes]
    return list(dict.fromkeys(shapes))


def check_experiment(cfg: DictConfig) -> None:
    """A misspelt method or an empty sweep is a ValueError before any GPU work."""
    exp = cfg.experiment
    unknown = set(exp.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"experiment.methods: unknown {sorted(unknown)}; known: {list(METHODS)}")
    if not exp.M or any(int(m) < 1 for m in exp.M):
        raise ValueError(f"experiment.M must list batch sizes >= 1, got {list(exp.M)}")
    if not experiment_shapes(cfg):
        raise ValueError("no shapes: give shapes=<family> or extra_shapes=[[K,N],...]")


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    check_experiment(cfg)
    exp = cfg.experiment
    if not torch.cuda.is_available():
        print(f"{exp.name}: no CUDA GPU found; nothing measured.")
        return
    torch.manual_seed(cfg.seed)
    names = tuple(exp.methods)
    with_gemlite = "gemlite" in names and setup_gemlite()
    bandwidth = timing.copy_bandwidth()
    rows = []
    for K, N in tqdm(experiment_shapes(cfg), desc=f"{exp.name} ({cfg.shapes.name})", unit="shape"):
        rows += bench_shape(K, N, tuple(int(m) for m in exp.M), bandwidth, cfg.replays, with_gemlite,
                            experiment=exp.name, names=names, split_ks=tuple(exp.split_k))
    out_dir = Path(cfg.out_dir) if cfg.out_dir else timing.results_dir(cfg.results_root)
    meta = {"experiment": exp.name,
            "provenance": timing.provenance(OmegaConf.to_container(cfg, resolve=True)),
            "copy_bandwidth_bytes_per_s": bandwidth}
    written = write_results(out_dir, rows, meta, force=cfg.force, experiment=exp.name)
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"wrote {written} ({len(rows)} rows, {failed} failed)")


if __name__ == "__main__":
    main()
