"""What the notebooks share: which results set they read, where figures and the numbers the
paper quotes go, and the LaTeX macro names of those numbers.

The results set is $TINY_GEMM_RESULTS (the Makefile's RESULTS=results/<gpu>), else the most
complete set under results/ (the most experiments; of equals, the one measured last), so that
a GPU with only a bench run does not take the paper away from the set that has every experiment.

In a set, a rerun that found a result in place wrote <name>.<YYYYmmddTHHMMSS>.csv beside it
(bench_w4a16.write_results keeps the committed one unless forced). The notebooks read the
newest version of each file by its provenance time, so that `make all` on a GPU shows what it
has just measured, while the committed file stays as it was.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "paper" / "figures"
GENERATED = ROOT / "paper" / "generated"
MAX_REL_ERR = 1e-2          # the bench's bound against the float64 reference
_DIGITS = "Zero One Two Three Four Five Six Seven Eight Nine".split()


def _time_utc(path: Path) -> str:
    """The provenance time of a result (its JSON, or the JSON beside its CSV); '' without one."""
    path = path.with_suffix(".json")
    if not path.exists():
        return ""
    meta = json.loads(path.read_text())
    return (meta.get("provenance") or meta).get("time_utc") or ""


def _newest(d: Path) -> str:
    return max((_time_utc(p) for p in d.glob("*.json")), default="")


# <name>.csv, or a rerun's <name>.<YYYYmmddTHHMMSS>.csv (bench_w4a16.write_results' stamp)
_VERSION = re.compile(r"(?P<name>.+?)(\.\d{8}T\d{6})?\.csv")


def _experiments(d: Path) -> set[str]:
    """The result names in a set, each once however many versions it holds."""
    return {m["name"] for p in d.glob("*.csv") if (m := _VERSION.fullmatch(p.name))}


def has_result(name: str, results: Path | None = None) -> bool:
    return name in _experiments(results or results_dir())


def result_csv(name: str, results: Path | None = None) -> Path:
    """The newest version (by provenance time) of <name>.csv in a results set (default:
    results_dir()): the file itself or a timestamped rerun beside it."""
    d = results or results_dir()
    versions = [p for p in d.glob(f"{name}*.csv") if (m := _VERSION.fullmatch(p.name)) and m["name"] == name]
    if not versions:
        raise FileNotFoundError(f"no {name}.csv in {d}")
    newest = max(versions, key=lambda p: (_time_utc(p), p.name))
    if newest.name != f"{name}.csv":
        print(f"{name}: reading {newest.name}, the newest version in {d.name}")
    return newest


def results_dir() -> Path:
    env = os.environ.get("TINY_GEMM_RESULTS")
    if env:
        path = Path(env) if Path(env).is_absolute() else ROOT / env
        if not path.is_dir():
            raise FileNotFoundError(f"TINY_GEMM_RESULTS={env}: no such folder")
        return path
    sets = results_sets()
    if not sets:
        raise FileNotFoundError("no results under results/: run `make experiments` on a GPU")
    return max(sets, key=lambda d: (len(_experiments(d)), _newest(d)))


def results_sets(name: str | None = None) -> list[Path]:
    """Every results set under results/ that holds <name>.csv (any version; by default, any
    result), by folder."""
    return sorted(d for d in (ROOT / "results").iterdir()
                  if d.is_dir() and (name in _experiments(d) if name else _experiments(d)))


def results_set_with(name: str) -> Path:
    """The chosen results set if it holds <name>.csv, else the newest set that does (for files
    that make experiments does not write on every GPU)."""
    chosen = results_dir()
    if has_result(name, chosen):
        return chosen
    sets = results_sets(name)
    if not sets:
        raise FileNotFoundError(f"no {name}.csv in any results set under results/")
    return max(sets, key=_newest)


def load_raw(name: str, results: Path | None = None) -> tuple[pd.DataFrame, dict]:
    """Every row of the newest <name>.csv (failed ones too, for notebooks that report them)
    and the provenance beside it, from the results set (default: results_dir()). A JSON that
    holds the provenance at its top level (older runs) is wrapped the same way."""
    csv = result_csv(name, results)
    meta = json.loads(csv.with_suffix(".json").read_text())
    if "provenance" not in meta:
        meta = {"provenance": meta}
    return pd.read_csv(csv), meta


def load(name: str, results: Path | None = None) -> tuple[pd.DataFrame, dict]:
    """Rows of <name>.csv that passed their check, and the provenance beside them (load_raw)."""
    df, meta = load_raw(name, results)
    if "status" not in df.columns:      # files written before the status column: the bench's check
        df["status"] = ["ok" if e <= MAX_REL_ERR else "FAILED" for e in df.rel_err]
    bad = df[df.status != "ok"]
    if len(bad):
        print(f"{name}: {len(bad)} rows failed their check and are left out:\n{bad[['method', 'M', 'K', 'N']]}")
    return df[df.status == "ok"].copy(), meta


def macro_name(*parts) -> str:
    """A LaTeX macro name (letters only) from parts: ('speedup', 'cublas', 1) -> speedupCublasOne."""
    words = []
    for p in parts:
        for w in re.findall(r"[A-Za-z]+|\d", str(p)):
            words.append(_DIGITS[int(w)] if w.isdigit() else w)
    name = "".join(w[:1].upper() + w[1:] for w in words)
    return name[:1].lower() + name[1:]


def write_macros(stem: str, values: dict[str, str], meta: dict | None = None,
                 notebook: str | None = None, source: str | None = None) -> Path:
    """paper/generated/<stem>.tex: one \\newcommand per value, with the provenance it came from
    (notebook: the writer when it is not <stem>.ipynb; source: the file read, when it is not
    the results set)."""
    GENERATED.mkdir(parents=True, exist_ok=True)
    src = results_dir()
    src = source or (src.relative_to(ROOT) if src.is_relative_to(ROOT) else src)
    lines = [f"% generated by notebooks/{notebook or stem}.ipynb from {src}; do not edit"]
    if meta:
        p = meta["provenance"]
        lines.append(f"% {p['gpu']}, driver {p['driver']}, torch {p['torch']}, triton {p['triton']}, "
                     f"commit {str(p['git_commit'])[:8]}, {p['time_utc']}")
    lines += [f"\\newcommand{{\\{k}}}{{{v}}}" for k, v in values.items()]
    out = GENERATED / f"{stem}.tex"
    out.write_text("\n".join(lines) + "\n")
    return out


def save_figure(fig, name: str) -> Path:
    FIGURES.mkdir(parents=True, exist_ok=True)
    out = FIGURES / f"{name}.pdf"
    fig.savefig(out, bbox_inches="tight")
    return out


def shape_label(K: int, N: int) -> str:
    return f"{K}x{N}"


def config_table(gpu: str) -> tuple[dict | None, Path]:
    """The tuned W4A16 table shipped for a GPU (kernels/tiny_gemm/configs/<slug>.json), or None.
    The slug is tiny_gemm.w4a16.gpu_slug's, rebuilt here so that the notebooks need no torch."""
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    path = ROOT / "kernels" / "tiny_gemm" / "configs" / f"{slug}.json"
    return (json.loads(path.read_text()) if path.exists() else None), path
