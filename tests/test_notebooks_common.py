"""notebooks/common.py: which version of a result the notebooks read."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("pandas")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "notebooks"))
import common  # noqa: E402


def _result(d: Path, stem: str, time_utc: str) -> None:
    (d / f"{stem}.csv").write_text("method,time_us,status\nx,1.0,ok\n")
    (d / f"{stem}.json").write_text(json.dumps({"provenance": {"time_utc": time_utc}}))


def test_the_newest_version_of_a_result_is_read(tmp_path, capsys):
    _result(tmp_path, "int4_vs_fp16", "2026-11-21T16:51:03+00:00")
    assert common.result_csv("int4_vs_fp16", tmp_path).name == "int4_vs_fp16.csv"
    # a rerun that found the committed file wrote a timestamped one beside it
    _result(tmp_path, "int4_vs_fp16.20261122T090000", "2026-11-22T09:00:00+00:00")
    _result(tmp_path, "int4_vs_fp16_extra", "2026-11-23T09:00:00+00:00")    # another result
    assert common.result_csv("int4_vs_fp16", tmp_path).name == "int4_vs_fp16.20261122T090000.csv"
    assert "reading int4_vs_fp16.20261122T090000.csv" in capsys.readouterr().out
    assert common._experiments(tmp_path) == {"int4_vs_fp16", "int4_vs_fp16_extra"}
    assert common.has_result("int4_vs_fp16", tmp_path) and not common.has_result("roofline", tmp_path)
    with pytest.raises(FileNotFoundError, match="roofline"):
        common.result_csv("roofline", tmp_path)


def test_load_takes_the_provenance_of_the_version_it_reads(tmp_path):
    _result(tmp_path, "bench_w4a16", "2026-11-21T00:00:00+00:00")
    _result(tmp_path, "bench_w4a16.20261122T090000", "2026-11-22T09:00:00+00:00")
    df, meta = common.load("bench_w4a16", tmp_path)
    assert len(df) == 1 and meta["provenance"]["time_utc"].startswith("2026-11-22")


def test_load_raw_keeps_the_failed_rows_that_load_leaves_out(tmp_path):
    (tmp_path / "ffn_fusion.csv").write_text("method,M,K,N,time_us,status\nx,1,8,8,1.0,ok\ny,1,8,8,,FAILED\n")
    (tmp_path / "ffn_fusion.json").write_text(json.dumps({"time_utc": "2026-11-21T00:00:00+00:00"}))
    raw, meta = common.load_raw("ffn_fusion", tmp_path)
    assert list(raw.status) == ["ok", "FAILED"] and meta["provenance"]["time_utc"].startswith("2026")
    df, _ = common.load("ffn_fusion", tmp_path)
    assert list(df.method) == ["x"]
