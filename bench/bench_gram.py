"""The Gram update of ``accumulate_stats`` against one fp32 GEMM and against Python-side blocking.

    python bench/bench_gram.py            # CPU, 1 and 2 threads, 4096 tokens, widths 576..4096

For each width m: ``fasp_ext.ops.accumulate_stats(X, s, H)`` (squared norms + H += X^T X, lower block
triangle only), ``H.addmm_(X.t(), X)`` (the plain GEMM it replaces, without the norms) and the same
blocking written in Python with 2, 4 and 8 column blocks; the op and its baselines run interleaved,
median of 7 runs with [min-max]. Writes bench/results/gram_cpu.json and .md. Timings only.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))


def blocked(H: torch.Tensor, X: torch.Tensor, nb: int) -> None:
    m = X.shape[1]
    bs = -(-m // nb)
    for j0 in range(0, m, bs):
        w = min(bs, m - j0)
        blk = X[:, j0:].t() @ X[:, j0:j0 + w]
        H[j0:, j0:j0 + w] += blk
        if m - j0 - w > 0:
            H[j0:j0 + w, j0 + w:] += blk[w:].t()


def main() -> None:
    from bench_ops import machine_info
    from fasp_ext import ops

    torch.manual_seed(0)
    rows = []
    for th in (1, 2):
        torch.set_num_threads(th)
        for m in (576, 1536, 2048, 4096):
            X = torch.randn(4096, m)
            s, H = torch.zeros(m), torch.zeros(m, m)
            cases = {"op": lambda: ops.accumulate_stats(X, s, H), "addmm": lambda: H.addmm_(X.t(), X)}
            for nb in (2, 4, 8):
                cases[f"python_nb{nb}"] = lambda nb=nb: blocked(H, X, nb)
            times = {k: [] for k in cases}
            for _ in range(7):
                for k, f in cases.items():
                    t = time.perf_counter()
                    f()
                    times[k].append((time.perf_counter() - t) * 1e3)
            row = {"threads": th, "m": m, "tokens": 4096,
                   "ms": {k: [statistics.median(v), min(v), max(v)] for k, v in times.items()}}
            row["speedup_vs_addmm"] = row["ms"]["addmm"][0] / row["ms"]["op"][0]
            rows.append(row)
            print(f"threads {th} m {m}: " + "  ".join(f"{k} {v[0]:.1f}" for k, v in row["ms"].items()), flush=True)
    info = machine_info(torch.device("cpu"))
    out = ROOT / "bench" / "results"
    (out / "gram_cpu.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    keys = list(rows[0]["ms"])
    lines = ["# Gram update (accumulate_stats) on the CPU", "",
             f"- machine: {info.get('cpu', '')}, {info.get('cores', '')} cores; torch {info['torch']}; "
             f"git {info['git_commit'][:12]}; 4096 tokens; ms, median of 7 [min-max]", "",
             "| threads | m | " + " | ".join(keys) + " | op vs addmm |", "|---|---|" + "---|" * (len(keys) + 1)]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['m']} | " + " | ".join(
            f"{r['ms'][k][0]:.1f} [{r['ms'][k][1]:.1f}-{r['ms'][k][2]:.1f}]" for k in keys)
            + f" | {r['speedup_vs_addmm']:.2f}x |")
    (out / "gram_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
