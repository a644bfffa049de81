"""Every Hydra config composes, with every shape family, and names only known methods."""
from pathlib import Path

import pytest

hydra = pytest.importorskip("hydra")
from hydra import compose, initialize_config_dir  # noqa: E402

import sys  # noqa: E402
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from run import check_experiment, experiment_shapes  # noqa: E402

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
SHAPES = sorted(p.stem for p in (ROOT / "conf" / "shapes").glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(version_base=None, config_dir=str(ROOT / "conf")):
        return compose(config_name="config", overrides=overrides)


def test_the_families_the_paper_needs_are_there():
    assert {"llama2_7b", "llama3_8b", "llama3_70b", "mistral_7b"} <= set(SHAPES)
    assert {"int4_vs_fp16", "splitk_vs_dp", "dequant_breakdown", "roofline", "attention_fusion",
            "ffn_fusion"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("shapes", SHAPES)
def test_compose(experiment, shapes):
    cfg = _compose([f"experiment={experiment}", f"shapes={shapes}"])
    check_experiment(cfg)
    assert cfg.experiment.name == experiment
    shapes = experiment_shapes(cfg)
    assert shapes and all(K > 0 and N > 0 and K % 128 == 0 for K, N in shapes)


def test_default_shapes_of_an_experiment_and_extra_shapes():
    cfg = _compose(["experiment=splitk_vs_dp", "extra_shapes=[[4096,6144]]"])
    assert cfg.shapes.name == "splitk_paper"
    shapes = experiment_shapes(cfg)
    assert shapes[-1] == (4096, 6144) and len(shapes) == len(set(shapes))


def test_bad_method_is_rejected():
    cfg = _compose(["experiment.methods=[cublas_fp16,marlin]"])
    with pytest.raises(ValueError, match="marlin"):
        check_experiment(cfg)


def test_int4_vs_fp16_covers_every_family_each_shape_once():
    cfg = _compose([])
    assert cfg.experiment.name == "int4_vs_fp16" and cfg.shapes.name == "all"
    shapes = experiment_shapes(cfg)
    assert len(shapes) == len(set(shapes))
    for family in ("llama2_7b", "llama3_8b", "llama3_70b", "mistral_7b"):
        assert set(experiment_shapes(_compose([f"shapes={family}"]))) <= set(shapes), family
    # one family on the command line replaces the experiment's default
    assert _compose(["shapes=llama3_8b"]).shapes.name == "llama3_8b"


def test_make_tune_covers_every_shape_the_experiments_measure():
    from tune_w4a16 import config_shapes
    tuned = set(config_shapes())
    for shapes in SHAPES:
        assert set(experiment_shapes(_compose([f"shapes={shapes}"]))) <= tuned, shapes


def test_make_tune_covers_the_ffn_experiments_int4_gemms():
    """The INT4 FFN reads gate and up as one weight of N = 2F, then the down projection."""
    from tune_w4a16 import config_shapes
    ffn = _compose(["experiment=ffn_fusion"]).experiment
    assert {(ffn.D, 2 * ffn.F), (ffn.F, ffn.D)} <= set(config_shapes())


def test_make_tune_covers_every_decode_point_of_attention_fusion():
    """tune_decode.py's default grid holds every (batch, context) that attention_fusion
    measures, for its heads, so that tiny_gemm's decode rows come from tuned entries."""
    from tune_decode import candidates, experiment_defaults
    exp = _compose(["experiment=attention_fusion"]).experiment
    d = experiment_defaults()
    assert (d["heads"], d["kv_heads"], d["head_dim"], d["dtype"]) == (exp.heads, exp.kv_heads, exp.head_dim, exp.dtype)
    assert set(exp.decode.batch) <= set(d["batch"]) and set(exp.decode.context) <= set(d["context"])
    for B in d["batch"]:
        for S in d["context"]:
            cands = candidates(B * exp.kv_heads, S, 132)
            assert cands and len(cands) == len(set(cands))
            assert {c.prefetch for c in cands} == {0, 1}
            assert all(c.num_splits == 1 or B * exp.kv_heads * c.num_splits <= 4 * 132 for c in cands)
