"""Inference speed of pruned SmolLM2-135M versus dense, reloaded from disk as a user would.

    python bench/bench_inference.py [--sparsities 0 0.1 0.2 0.3] [--device cpu]

For each sparsity the model is pruned (MLP + value channels; a small calibration set suffices for
shapes and speed), saved, reloaded with fasp_ext.load_pruned, and timed: prefill tokens/s at batch
1 and 8 with 512 tokens, and greedy decode ms/token with the KV cache. Medians of repeated runs.
Writes bench/results/inference_<device>.json and .md. Timings only, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def prefill_tps(model, batch: int, seqlen: int, dev, repeats: int, last_logits: bool = False) -> float:
    """Tokens/s of one forward over ``batch`` x ``seqlen`` tokens. ``last_logits``: only the last
    position's logits, as ``generate`` computes them at prefill; otherwise logits at every position."""
    x = torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(0)).to(dev)
    kw = {"logits_to_keep": 1} if last_logits else {}
    model(input_ids=x, use_cache=False, **kw)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        model(input_ids=x, use_cache=False, **kw)
        _sync(dev)
        times.append(time.perf_counter() - t)
    return batch * seqlen / statistics.median(times)


@torch.no_grad()
def decode_ms(model, prompt: int, new: int, dev, repeats: int) -> float:
    x = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1)).to(dev)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    model.generate(x, **kw)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        t1 = time.perf_counter()
        model.generate(x, **kw)
        _sync(dev)
        t2 = time.perf_counter()
        times.append(((t2 - t1) - (t1 - t0)) / (new - 1))  # per generated token, prefill excluded
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.1, 0.2, 0.3])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    from bench_ops import machine_info

    from fasp_ext import data, load_pruned, models, save_pruned
    from fasp_ext.pipeline import PruneConfig, prune

    dev = torch.device(ns.device)
    _, tok = models.load_model("smollm2")
    calib = data.calibration_windows(tok, data.load_text("austen:emma", split="calib"), 8, 128, 0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sp in ns.sparsities:
            model, _ = models.load_model("smollm2")
            if sp > 0:
                prune(model, calib, PruneConfig(sparsity=sp, progress=False))
            path = save_pruned(model, Path(tmp) / f"s{sp}")
            del model
            model = load_pruned(path).to(dev).eval()
            attn = model.config._attn_implementation
            r = {"sparsity": sp, "params": sum(p.numel() for p in model.parameters()), "attn_impl": attn,
                 "v_head_dim": getattr(model.config, "fasp_ext", {}).get("v_head_dim", [None])[0],
                 "mlp_width": model.config.intermediate_size}
            for b in (1, 8):
                r[f"prefill_tps_b{b}"] = prefill_tps(model, b, ns.seqlen, dev, ns.repeats, last_logits=True)
                r[f"forward_tps_b{b}"] = prefill_tps(model, b, ns.seqlen, dev, ns.repeats)
            r["decode_ms_per_token"] = decode_ms(model, 64, 33, dev, ns.repeats)
            rows.append(r)
            print(json.dumps(r), flush=True)
            del model
    dense = rows[0]
    for r in rows:
        for k in ("prefill_tps_b1", "prefill_tps_b8", "forward_tps_b1", "forward_tps_b8"):
            r[k.replace("tps", "speedup")] = r[k] / dense[k]
        r["decode_speedup"] = dense["decode_ms_per_token"] / r["decode_ms_per_token"]
    info = machine_info(dev)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"inference_{dev.type}"
    (out / f"{stem}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    lines = [f"# Inference of pruned SmolLM2-135M ({dev.type})", "",
             f"- machine: {info['cpu']}, {info['cores']} cores, {ns.threads} threads; torch {info['torch']}; "
             f"git {info['git_commit'][:12]}; attention {rows[0]['attn_impl']}", "",
             "Prefill computes the last position's logits only, as `generate` does; full forward computes logits at",
             "every position (the 49152 x 576 lm_head, never pruned, then costs a fifth of the FLOPs).", "",
             "| sparsity | params | value head | MLP | prefill tok/s b1 (x) | prefill tok/s b8 (x) "
             "| full forward tok/s b1 (x) | full forward tok/s b8 (x) | decode ms/tok (x) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sparsity']:.0%} | {r['params']:,} | {r['v_head_dim'] or 64} | {r['mlp_width']} | "
                     f"{r['prefill_tps_b1']:.0f} ({r['prefill_speedup_b1']:.2f}) | "
                     f"{r['prefill_tps_b8']:.0f} ({r['prefill_speedup_b8']:.2f}) | "
                     f"{r['forward_tps_b1']:.0f} ({r['forward_speedup_b1']:.2f}) | "
                     f"{r['forward_tps_b8']:.0f} ({r['forward_speedup_b8']:.2f}) | "
                     f"{r['decode_ms_per_token']:.2f} ({r['decode_speedup']:.2f}) |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
