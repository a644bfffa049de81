"""experiments/roofline.py without a GPU: ncu's raw CSV parsed, kernels attributed to cases by
the marker kernels, and a missing, failing or hanging ncu turned into note rows (a fake ncu)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import roofline  # noqa: E402

# `ncu --csv --page raw --print-units base` as Nsight Compute 2025.3 prints it: its own lines,
# the header (metrics sorted by name), a units row, quoted values with thousands separators.
SAMPLE = '''==PROF== Connected to process 4242 (/usr/bin/python3.12)
==PROF== Profiling "_roofline_case_marker": 0%....50%....100% - 9 passes
==PROF== Profiling "gemv2T_kernel_val": 0%....50%....100% - 9 passes
==PROF== Profiling "_roofline_case_marker": 0%....50%....100% - 9 passes
==PROF== Profiling "_w4a16_splitk_kernel": 0%....50%....100% - 9 passes
==PROF== Profiling "_roofline_case_marker": 0%....50%....100% - 9 passes
==PROF== Profiling "gemmSN_TN_kernel": 0%....50%....100% - 9 passes
==PROF== Profiling "splitKreduce_kernel": 0%....50%....100% - 9 passes
==PROF== Disconnected from process 4242
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__throughput.avg.pct_of_peak_sustained_elapsed","gpu__time_duration.sum","sm__throughput.avg.pct_of_peak_sustained_elapsed"
"","","","","","","","","","","","%","nsecond","%"
"0","4242","python3.12","127.0.0.1","_roofline_case_marker","1","7","(32, 1, 1)","(1, 1, 1)","0","9.0","0.11","2,272","0.02"
"1","4242","python3.12","127.0.0.1","gemv2T_kernel_val<int, int, __half, __half, float, 128, 16, 4, 4, false, false>","1","7","(128, 1, 1)","(1, 1024, 1)","0","9.0","81.37","24,096","23.55"
"2","4242","python3.12","127.0.0.1","_roofline_case_marker","1","7","(32, 1, 1)","(2, 1, 1)","0","9.0","0.12","2,240","0.02"
"3","4242","python3.12","127.0.0.1","_w4a16_splitk_kernel","1","7","(32, 1, 1)","(64, 16, 1)","0","9.0","38.91","11,712","46.60"
"4","4242","python3.12","127.0.0.1","_roofline_case_marker","1","7","(32, 1, 1)","(3, 1, 1)","0","9.0","0.10","2,208","0.02"
"5","4242","python3.12","127.0.0.1","gemmSN_TN_kernel","1","7","(256, 1, 1)","(32, 4, 1)","0","9.0","72.80","1,512,000","n/a"
"6","4242","python3.12","127.0.0.1","splitKreduce_kernel","1","7","(256, 1, 1)","(16, 1, 1)","0","9.0","3.05","3,040","4.10"
'''
CASES = [dict(method="cublas_fp16", weight_format="fp16", M=1, K=4096, N=4096),
         dict(method="tiny_gemm", weight_format="int4", M=1, K=4096, N=4096),
         dict(method="cublas_fp16", weight_format="fp16", M=16, K=4096, N=4096)]


def test_parse_units_commas_and_na():
    kernels = roofline.parse_ncu_csv(SAMPLE)
    assert [k["id"] for k in kernels] == list(range(7))
    gemv = kernels[1]
    assert gemv["kernel"].startswith("gemv2T_kernel_val<int, int, __half")   # commas inside quotes
    assert gemv["grid_x"] == 1
    assert gemv["dram_throughput_pct"] == pytest.approx(81.37)
    assert gemv["sm_throughput_pct"] == pytest.approx(23.55)
    assert gemv["ncu_time_us"] == pytest.approx(24.096)                     # nsecond -> us
    assert kernels[5]["ncu_time_us"] == pytest.approx(1512.0)               # "1,512,000" ns
    assert kernels[5]["sm_throughput_pct"] is None                          # "n/a"
    assert [k["grid_x"] for k in kernels if roofline.MARKER in k["kernel"]] == [1, 2, 3]


def test_parse_other_time_unit_and_application_output_in_between():
    text = SAMPLE.replace('"%","nsecond","%"', '"%","usecond","%"')
    text = text.replace('"2","4242"', 'something the application printed\n"2","4242"')
    kernels = roofline.parse_ncu_csv(text)
    assert len(kernels) == 7 and kernels[1]["ncu_time_us"] == pytest.approx(24096.0)


@pytest.mark.parametrize("text, match", [
    ("==PROF== Connected to process 1\n==ERROR== ERR_NVGPUCTRPERM\n", "no ncu CSV header"),
    ('"ID","Kernel Name","gpu__time_duration.sum"\n"0","k","1"\n', "lacks the columns"),
    (SAMPLE.replace('"nsecond"', '"cycle"'), "unknown unit"),
])
def test_parse_rejects_what_it_cannot_read(text, match):
    with pytest.raises(ValueError, match=match):
        roofline.parse_ncu_csv(text)


def test_attribution_by_marker_grid():
    rows = roofline.attribute(roofline.parse_ncu_csv(SAMPLE), CASES, "roofline", "Nsight Compute 2025.3.1.0")
    kernels = [r for r in rows if r.get("kernel")]
    assert [(r["method"], r["M"], r["kernel"].split("<")[0]) for r in kernels] == [
        ("cublas_fp16", 1, "gemv2T_kernel_val"), ("tiny_gemm", 1, "_w4a16_splitk_kernel"),
        ("cublas_fp16", 16, "gemmSN_TN_kernel"), ("cublas_fp16", 16, "splitKreduce_kernel")]
    assert all(r["part"] == "ncu" and r["status"] == "ok" and r["note"] == "Nsight Compute 2025.3.1.0"
               for r in kernels)
    assert len(rows) == len(kernels)            # every case has a kernel: no note rows


def test_attribution_of_a_case_with_no_kernel_and_of_stray_kernels():
    kernels = roofline.parse_ncu_csv(SAMPLE)
    stray = dict(kernels[1], id=-1)
    # case 1 (tiny_gemm) lost its kernel; a kernel came before any marker
    rows = roofline.attribute([stray] + kernels[:3] + kernels[4:], CASES, "roofline")
    notes = [r for r in rows if not r.get("kernel")]
    assert [(r.get("method"), r["note"]) for r in notes] == [
        ("tiny_gemm", "ncu profiled no kernel of this case"),
        (None, "1 profiled kernels followed no case marker; left out")]


def test_attribution_by_order_without_grid_column():
    kernels = [dict(k, grid_x=None) for k in roofline.parse_ncu_csv(SAMPLE)]
    rows = roofline.attribute(kernels, CASES, "roofline")
    assert [(r["method"], r["M"]) for r in rows] == [("cublas_fp16", 1), ("tiny_gemm", 1),
                                                      ("cublas_fp16", 16), ("cublas_fp16", 16)]


def test_find_ncu(monkeypatch, tmp_path):
    monkeypatch.setattr(roofline.shutil, "which", lambda name: None)
    monkeypatch.setattr(roofline, "NCU_GLOBS", (str(tmp_path / "nsight-compute" / "*" / "ncu"),))
    assert roofline.find_ncu("off") == (None, "ncu: off in the config")
    path, why = roofline.find_ncu("auto")
    assert path is None and "not found" in why
    for version in ("2024.3.2", "2025.3.1"):
        exe = tmp_path / "nsight-compute" / version / "ncu"
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    assert roofline.find_ncu("auto") == (str(exe), "")          # the newest version
    assert roofline.find_ncu(str(exe)) == (str(exe), "")
    assert roofline.find_ncu(str(tmp_path / "nope"))[0] is None


def _fake_ncu(tmp_path, body: str) -> str:
    exe = tmp_path / "ncu"
    exe.write_text("#!/bin/sh\n"
                   'if [ "$1" = --version ]; then echo "Version 2025.3.1.0 (build 1)"; exit 0; fi\n' + body)
    exe.chmod(0o755)
    return str(exe)


def test_ncu_rows_from_a_fake_ncu(tmp_path):
    (tmp_path / "out.csv").write_text(SAMPLE)
    ncu = _fake_ncu(tmp_path, f"cat {tmp_path / 'out.csv'}\n")
    rows = roofline.ncu_rows("roofline", CASES, ncu, 60)
    assert len(rows) == 4 and all(r["note"] == "Nsight Compute 2025.3.1.0" for r in rows)


@pytest.mark.parametrize("body, timeout, match", [
    ('echo "==ERROR== ERR_NVGPUCTRPERM - no permission"; exit 1\n', 60, "ERR_NVGPUCTRPERM"),
    ("exec sleep 30\n", 1, "ran past 1 s"),
])
def test_ncu_rows_when_ncu_fails(tmp_path, body, timeout, match):
    rows = roofline.ncu_rows("roofline", CASES, _fake_ncu(tmp_path, body), timeout)
    assert len(rows) == 1 and rows[0]["part"] == "ncu" and rows[0]["status"] == "ok"
    assert match in rows[0]["note"] and not rows[0].get("kernel")


def test_ncu_rows_without_ncu():
    rows = roofline.ncu_rows("roofline", CASES, "off", 60)
    assert rows == [{"experiment": "roofline", "part": "ncu", "status": "ok", "note": "ncu: off in the config"}]


def test_run_experiment_rows_without_gpu(monkeypatch):
    """The runner's rows with bench_w4a16's measurement faked and ncu off: every row has the
    CSV's columns, bench rows their bytes and achieved bandwidth, ncu a note."""
    hydra = pytest.importorskip("hydra")
    with hydra.initialize_config_dir(version_base=None, config_dir=str(ROOT / "conf")):
        cfg = hydra.compose(config_name="config", overrides=["experiment=roofline", "experiment.ncu=off"])
    bandwidth = 4e12

    def fake_bench_shape(K, N, Ms, bw, replays, with_gemlite, experiment, names):
        nbytes = 2 * N * K
        return [dict(experiment=experiment, method=m, M=M, K=K, N=N, group_size=128, dtype="fp16",
                     time_us=2 * nbytes / bw * 1e6, floor_us=nbytes / bw * 1e6, pct_floor=50.0,
                     status="ok") for M in Ms for m in names]

    monkeypatch.setattr(roofline, "bench_shape", fake_bench_shape)
    rows, columns = roofline.run_experiment(cfg, bandwidth)
    assert columns == roofline.COLUMNS and all(tuple(r) == columns for r in rows)
    bench = [r for r in rows if r["part"] == "bench"]
    assert len(bench) == 4 * 2 * 3                      # llama3_8b's 4 distinct shapes, M 1 and 16
    assert all(r["achieved_tb_s"] == pytest.approx(2.0) for r in bench)
    assert {r["weight_format"] for r in bench if r["method"] == "cublas_fp16"} == {"fp16"}
    assert {r["weight_format"] for r in bench if r["method"] != "cublas_fp16"} == {"int4"}
    assert [r["note"] for r in rows if r["part"] == "ncu"] == ["ncu: off in the config"]
