"""Extra rows for a `fasp-ext compare` result without re-measuring the dense model.

    python bench/compare_rows.py BASE.json OUT.json METHOD_SPEC... --sparsities 0.2 [0.1 ...]

Takes the settings and the dense row from BASE.json (a compare result), prunes a fresh copy of the
model once per (method, sparsity) with the same calibration windows and evaluation windows (BOS as
the tokenizer adds it), and writes a compare result that bench/merge_compare.py can merge. On a
shared 2-core CPU the dense evaluation of Gemma3-270M (262k-token vocabulary) alone takes minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("methods", nargs="+")
    ap.add_argument("--sparsities", nargs="+", type=float, required=True)
    a = ap.parse_args()
    from fasp_ext import compare as cmp, data, models
    from fasp_ext.pipeline import PruneConfig, prune

    base = json.loads(Path(a.base).read_text())
    dense = next(r for r in base["rows"] if r["method"] == "dense")
    cfgs = [(m, cmp.parse_method(m, PruneConfig(progress=False, seed=base["seed"]))) for m in a.methods]
    _, tok = models.load_model(base["model"], device="cpu")
    bos = base.get("bos", "auto")  # results from before the --bos flag used auto
    tokens = data.calibration_windows(tok, data.load_text(base["calib"], split="calib"), base["nsamples"],
                                      base["seqlen"], base["seed"], bos=bos)
    windows = {e: data.eval_windows(tok, data.load_text(e), base["seqlen"], base["eval_windows"][e], bos=bos)
               for e in base["evals"]}
    result = {k: base[k] for k in ("model", "calib", "nsamples", "seqlen", "seed", "device", "evals",
                                   "eval_windows")}
    result["bos"] = bos
    result["rows"] = [dense]
    for s in a.sparsities:
        for name, cfg in cfgs:
            m, _ = models.load_model(base["model"], device="cpu")
            t = time.perf_counter()
            rep = prune(m, tokens, dataclasses.replace(cfg, sparsity=s, device="cpu"))
            row = {"method": name, "sparsity": s, "params": rep.params_after,
                   "prune_seconds": time.perf_counter() - t, "allocation": rep.allocation,
                   "allocation_windows": rep.allocation_windows,
                   "token_weighting": rep.token_weighting, **cmp.attention_sizes(m)}
            for e, w in windows.items():
                row[e] = data.perplexity(m, w, progress=False)
            result["rows"].append(row)
            print(cmp._row_text(row, base["evals"]), flush=True)
            cmp.write(result, Path(a.out).parent, Path(a.out).stem, with_plot=False)
            del m
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
