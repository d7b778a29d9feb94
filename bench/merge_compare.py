"""Merge `fasp-ext compare` results taken with the same model, calibration and evaluation settings.

    python bench/merge_compare.py OUT_STEM a.json b.json ... [--out bench/results]

Long comparisons are run in parts (a CPU prunes SmolLM2 in minutes per row); this joins the parts
into one table, plot and JSON, keeping the last row of each (method, sparsity), one dense row,
and the list of source files. Refuses parts whose settings differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = ("model", "calib", "nsamples", "seqlen", "seed", "evals", "eval_windows")


def explicit(row: dict) -> dict:
    """A row from before allocation defaults depended on the method (no "allocation" field: every
    method then pruned blocks uniformly unless its spec said otherwise) gets that field, and its
    spec spells out ``allocation=uniform`` where today's default for the method differs."""
    from fasp_ext.pipeline import DEFAULT_ALLOCATION

    if row["method"] == "dense" or "allocation" in row:
        return row
    name, _, opts = row["method"].partition(":")
    given = dict(o.split("=", 1) for o in opts.split(",") if "=" in o)
    row = dict(row, allocation=given.get("allocation", "uniform"))
    if "allocation" not in given and DEFAULT_ALLOCATION.get(name, "uniform") != "uniform":
        row["method"] = f"{row['method']}{',' if opts else ':'}allocation=uniform"
    return row


def merge(parts: list[dict], sources: list[str]) -> dict:
    base = parts[0]
    for p, src in zip(parts[1:], sources[1:]):
        diff = [k for k in SETTINGS if p.get(k) != base.get(k)]
        if diff:
            raise SystemExit(f"{src}: settings differ from {sources[0]} in {', '.join(diff)}")
    rows: dict[tuple, dict] = {}
    for p in parts:
        for r in map(explicit, p["rows"]):
            rows[(r["method"], round(r["sparsity"], 6))] = r
    dense = [r for k, r in rows.items() if k[0] == "dense"]
    rest = sorted((r for k, r in rows.items() if k[0] != "dense"), key=lambda r: (r["sparsity"], r["method"]))
    out = {k: base[k] for k in base if k != "rows"}
    out["rows"] = dense[-1:] + rest
    out["merged_from"] = [src for p, own in zip(parts, sources) for src in p.get("merged_from", [own])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stem")
    ap.add_argument("parts", nargs="+")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ns = ap.parse_args()
    from fasp_ext.compare import write

    parts = [json.loads(Path(p).read_text()) for p in ns.parts]
    for path in write(merge(parts, [Path(p).name for p in ns.parts]), ns.out, ns.stem):
        print("wrote", path)


if __name__ == "__main__":
    main()
