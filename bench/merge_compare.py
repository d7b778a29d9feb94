"""Merge `fasp-ext compare` results taken with the same model, calibration and evaluation settings.

    python bench/merge_compare.py OUT_STEM a.json b.json ... [--out bench/results]

Long comparisons are run in parts (a CPU prunes SmolLM2 in minutes per row); this joins the parts
into one table, plot and JSON, keeping the last row of each (method, sparsity), one dense row,
and the list of source files (``merged_from``: paths relative to ``--out``, e.g. the screens in
``bench/results/screens/``). Refuses parts whose settings differ. Once merged, pieces that are
nothing but a share of one comparison are removed (git keeps them; bench/results/INDEX.md says
where); screens stay in ``screens/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = ("model", "calib", "nsamples", "seqlen", "seed", "evals", "eval_windows")


#: windows the allocation's dense pass used by default in rows from before the rows recorded it
#: (``allocation_windows``): error-am's dense pass used 16 then, 12 now (docs/decisions.md)
LEGACY_SAMPLES = {"error-am": 16}


def explicit(row: dict, weighted: bool = False, nsamples: int | None = None) -> dict:
    """A row labelled as today's defaults read it: a spec that leaves the allocation to the method's
    default spells out the allocation the row was run with where today's default differs (rows from
    before the field existed ran uniform), and a window count equal to today's default for the
    row's allocation is dropped, as is an allocation equal to today's default. With ``weighted``
    (the model is one where FASP weighs tokens by the sublayer output norms, as some row of the
    merge says), a FASP row run without the weighting (rows from before the field existed) says
    token_weighting=none. A row whose allocation pass used another window count than today's default
    on ``nsamples`` calibration windows (recorded as ``allocation_windows``; ``LEGACY_SAMPLES`` for
    rows from before) says allocation_samples=N. So "fasp" always means FASP as it prunes today."""
    from fasp_ext.pipeline import ALLOCATION_SAMPLES, DEFAULT_ALLOCATION

    if row["method"] == "dense":
        return row
    head, _, suffix = row["method"].partition(" ")  # "fasp (cap 2x)": the spec, then a free note
    name, _, opts = head.partition(":")
    parts = [o for o in opts.split(",") if o]
    given = dict(o.split("=", 1) for o in parts if "=" in o)
    rec = row.get("allocation", given.get("allocation", "uniform"))
    default = DEFAULT_ALLOCATION.get(name, "uniform")
    if "allocation" not in given and rec != default:
        parts.append(f"allocation={rec}")
    if given.get("allocation_samples") == str(ALLOCATION_SAMPLES.get(rec)):  # that allocation's default
        parts = [o for o in parts if not o.startswith("allocation_samples=")]
    if rec == default:
        parts = [o for o in parts if o != f"allocation={rec}"]
    used = row.get("allocation_windows", LEGACY_SAMPLES.get(rec)) if "allocation_samples" not in given else None
    if used is not None and rec in ALLOCATION_SAMPLES and nsamples:
        if min(int(used), nsamples) != min(ALLOCATION_SAMPLES[rec], nsamples):
            parts.append(f"allocation_samples={min(int(used), nsamples)}")
    tw = row.get("token_weighting", "none")
    if weighted and name == "fasp" and tw == "none" and "token_weighting" not in given:
        parts.append("token_weighting=none")
    label = name + (":" + ",".join(parts) if parts else "") + (" " + suffix if suffix else "")
    out = dict(row, allocation=rec, method=label)
    # the window count read here stays in the row, so merging a merged file again labels it the same
    if "allocation_windows" not in row and rec in ALLOCATION_SAMPLES and nsamples:
        windows = int(given["allocation_samples"]) if "allocation_samples" in given else used
        if windows is not None:
            out["allocation_windows"] = min(windows, nsamples) if windows else nsamples
    return out


def merge(parts: list[dict], sources: list[str]) -> dict:
    base = parts[0]
    for p, src in zip(parts[1:], sources[1:]):
        diff = [k for k in SETTINGS if p.get(k) != base.get(k)]
        if diff:
            raise SystemExit(f"{src}: settings differ from {sources[0]} in {', '.join(diff)}")
    rows: dict[tuple, dict] = {}
    weighted = any(r.get("token_weighting") == "auto" for p in parts for r in p["rows"])
    for p in parts:
        for r in (explicit(r, weighted, p.get("nsamples")) for r in p["rows"]):
            rows[(r["method"], round(r["sparsity"], 6))] = r
    dense = [r for k, r in rows.items() if k[0] == "dense"]
    rest = sorted((r for k, r in rows.items() if k[0] != "dense"), key=lambda r: (r["sparsity"], r["method"]))
    out = {k: base[k] for k in base if k != "rows"}
    out["rows"] = dense[-1:] + rest
    out["merged_from"] = [src for p, own in zip(parts, sources) for src in p.get("merged_from", [own])]
    return out


def source_name(part: str, out: str) -> str:
    """How ``merged_from`` names a part: its path relative to the output folder when it lies inside
    it (``screens/alloc12_smollm2.json``), else its file name."""
    p, o = Path(part).resolve(), Path(out).resolve()
    return p.relative_to(o).as_posix() if p.is_relative_to(o) else p.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stem")
    ap.add_argument("parts", nargs="+")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ns = ap.parse_args()
    from fasp_ext.compare import write

    parts = [json.loads(Path(p).read_text()) for p in ns.parts]
    for path in write(merge(parts, [source_name(p, ns.out) for p in ns.parts]), ns.out, ns.stem):
        print("wrote", path)


if __name__ == "__main__":
    main()
