"""Why magnitude pruning destroys SmolLM2: the weight-only criterion drops the most active neurons.

    python bench/magnitude_diagnosis.py [--sparsity 0.2]

For each block, the down projection input channel with the largest activation on a little
calibration text, the rank of its column norm (what magnitude pruning keeps by), whether
magnitude pruning at the given sparsity removes it, and the largest activation x column norm it
removes relative to the block's largest. Writes bench/results/magnitude_diagnosis.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ns = ap.parse_args()
    from fasp_ext import data, models
    from fasp_ext.adapters import adapter_for
    from fasp_ext.pipeline import kept_count

    model, tok = models.load_model("smollm2")
    ad = adapter_for(model)
    toks = data.calibration_windows(tok, data.load_text("austen:emma", split="calib"), 4, 256, 0)
    acts: dict[int, torch.Tensor] = {}
    blocks = ad.blocks(model)
    hooks = [ad.mlp_pair(b)[1].register_forward_pre_hook(
        lambda _m, a, i=i: acts.__setitem__(i, a[0].abs().amax((0, 1)))) for i, b in enumerate(blocks)]
    model(toks, use_cache=False)
    for h in hooks:
        h.remove()
    lines = [f"# Magnitude pruning on SmolLM2-135M at {ns.sparsity:.0%}: which active neurons it drops", "",
             "| block | max activation | its neuron | column-norm rank (0 = smallest) | removed by magnitude | "
             "largest removed act x norm / block max |", "|---|---|---|---|---|---|"]
    hit = 0
    for i, b in enumerate(blocks):
        W = ad.mlp_pair(b)[1].weight.float()
        a, norm = acts[i], W.norm(dim=0)
        j = int(a.argmax())
        removed = norm.argsort()[: W.shape[1] - kept_count(W.shape[1], ns.sparsity, 8)]
        gone = j in removed.tolist()
        hit += gone
        contrib = a * norm
        lines.append(f"| {i} | {float(a[j]):.1f} | {j} | {int((norm < norm[j]).sum())} / {W.shape[1]} | "
                     f"{'yes' if gone else 'no'} | {float(contrib[removed].max() / contrib.max()):.2f} |")
    lines += ["", f"Magnitude pruning removes the most active neuron of {hit} of {len(blocks)} blocks."]
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "magnitude_diagnosis.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
