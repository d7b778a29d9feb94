"""PNG plots from the results files in bench/results (matplotlib, no display needed).

    python bench/plots.py [--results bench/results]

- inference_<dev>.json -> inference_<dev>.png: sparsity vs prefill/decode speed-up of reloaded models
- e2e_<dev>.json       -> e2e_<dev>.png: pruning time by phase next to one dense calibration forward
(the sparsity-vs-perplexity plot is written by ``fasp-ext compare`` itself: compare.png)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_inference(path: Path) -> Path:
    d = json.loads(path.read_text())
    rows = d["rows"]
    xs = [r["sparsity"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label in (("prefill_speedup_b1", "prefill, batch 1"), ("prefill_speedup_b8", "prefill, batch 8"),
                       ("forward_speedup_b1", "full-logits forward, batch 1"),
                       ("forward_speedup_b8", "full-logits forward, batch 8"),
                       ("decode_speedup", "decode (KV cache)")):
        if key in rows[0]:
            ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("sparsity (MLP + value channels)")
    ax.set_ylabel("speed-up vs dense")
    ax.set_title(f"SmolLM2-135M reloaded, {d['info']['device']} ({d['info']['cpu'][:30]})", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    out = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_e2e(path: Path) -> Path:
    d = json.loads(path.read_text())
    rows = d["rows"]
    phases = sorted({k for r in rows for k in r["sequential"]["phases"] if k != "total"})
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 3, 4))
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for ph in phases:
        vals = [r["sequential"]["phases"].get(ph, 0.0) / r["dense"]["seconds"] for r in rows]
        ax.bar([i - 0.2 for i in x], vals, 0.38, bottom=bottom, label=ph)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.bar([i + 0.2 for i in x], [r["ratio_one_pass"] for r in rows], 0.38, color="lightgray", label="one-pass total")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="dense calibration forward")
    ax.set_xticks(list(x), [r["model"] for r in rows], rotation=20, fontsize=8)
    ax.set_ylabel("time / dense calibration forward")
    ax.set_title("pruning time by phase (left: sequential, right: one-pass)", fontsize=9)
    ax.legend(fontsize=7)
    out = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    res = Path(ap.parse_args().results)
    for p in sorted(res.glob("inference_*.json")):
        print("wrote", plot_inference(p))
    for p in sorted(res.glob("e2e_*.json")):
        print("wrote", plot_e2e(p))


if __name__ == "__main__":
    main()
