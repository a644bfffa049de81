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

import importlib
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from tiny_gemm import timing

# the runners sit beside this file; bench_w4a16.py also holds the writer every runner uses
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_w4a16 import experiment_shapes, write_results  # noqa: E402,F401  (experiment_shapes: re-exported)


def runner_of(cfg: DictConfig):
    """The module that runs this experiment: experiment.runner (default bench_w4a16), which
    defines check_experiment(cfg) and run_experiment(cfg, bandwidth) -> (rows, columns)."""
    return importlib.import_module(cfg.experiment.get("runner", "bench_w4a16"))


def check_experiment(cfg: DictConfig) -> None:
    """Errors in the config (unknown methods, empty sweeps) are ValueErrors before GPU work."""
    runner_of(cfg).check_experiment(cfg)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    runner = runner_of(cfg)
    runner.check_experiment(cfg)
    exp = cfg.experiment
    if not torch.cuda.is_available():
        print(f"{exp.name}: no CUDA GPU found; nothing measured.")
        return
    torch.manual_seed(cfg.seed)
    bandwidth = timing.copy_bandwidth()
    rows, columns = runner.run_experiment(cfg, bandwidth)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else timing.results_dir(cfg.results_root)
    meta = {"experiment": exp.name,
            "provenance": timing.provenance(OmegaConf.to_container(cfg, resolve=True)),
            "copy_bandwidth_bytes_per_s": bandwidth}
    written = write_results(out_dir, rows, meta, force=cfg.force, experiment=exp.name, columns=columns)
    failed = sum(r.get("status", "ok") not in ("ok", "ablated") for r in rows)
    print(f"wrote {written} ({len(rows)} rows, {failed} failed)")


if __name__ == "__main__":
    main()
