"""Pruning checkpoints bigger than memory: time and peak RSS against checkpoint size, 1 vs 2 processes.

    python bench/bench_scaling.py                           # 1, 2, 4 GB checkpoints (fp32)
    python bench/bench_scaling.py --layers 2 4 --nsamples 8  # quicker

Synthetic LLaMA-shaped checkpoints (hidden 2048, MLP 5504, 16 heads / 4 kv heads, 32000-token
vocabulary, untied head) of growing depth are written to disk as sharded safetensors, tensor by
tensor (never a whole model in memory). Each is then pruned at 20 % with the default settings by
``fasp_ext.lazy.prune_checkpoint`` (blocks loaded at their turn) in a fresh process:

* 1 process x 2 threads, and
* 2 processes x 1 thread under ``torch.distributed.run`` (gloo; every rank reads every block and
  runs half of the calibration windows).

Peak RSS is each process's own (VmHWM of the worker). Writes bench/results/scaling_cpu.{json,md,png}.
Timings only, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=2048, intermediate_size=5504, num_attention_heads=16, num_key_value_heads=4,
             vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> int:
    """A random LLaMA-shaped checkpoint of ``layers`` blocks, written tensor by tensor; returns bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fasp_ext.lazy import ShardWriter

    cfg = LlamaConfig(num_hidden_layers=layers, **SHAPE)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    w = ShardWriter(folder, max_bytes=1 << 30)
    for name, p in skeleton.state_dict().items():
        if name.endswith("norm.weight") or "layernorm" in name:
            t = torch.ones(p.shape)
        else:
            t = torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5)
        w.add({name: t})
    w.finish()
    cfg.save_pretrained(folder)
    return w.total


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, which starts afresh at exec (getrusage's
    ru_maxrss would also count the parent's pages at fork time)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> None:
    import torch

    from fasp_ext import distributed
    from fasp_ext.lazy import prune_checkpoint
    from fasp_ext.pipeline import PruneConfig

    torch.set_num_threads(args.threads)
    distributed.init_from_env("cpu")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SHAPE["vocab_size"], (args.nsamples, args.seqlen), generator=g)
    t0 = time.perf_counter()
    rep = prune_checkpoint(args.ckpt, args.out, tokens, PruneConfig(sparsity=0.2, progress=False))
    wall = time.perf_counter() - t0
    rss = peak_rss()
    print("RESULT " + json.dumps({"rank": distributed.rank(), "wall": wall, "rss": rss,
                                  "times": rep.get("times", {})}), flush=True)
    if distributed.active():
        torch.distributed.destroy_process_group()


def run(ckpt: Path, out: Path, procs: int, threads: int, nsamples: int, seqlen: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    script = [str(Path(__file__).resolve()), "--worker", "--ckpt", str(ckpt), "--out", str(out),
              "--threads", str(threads), "--nsamples", str(nsamples), "--seqlen", str(seqlen)]
    cmd = [sys.executable, *script] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *script]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"worker failed:\n{r.stderr[-3000:]}")
    res = [json.loads(line[7:]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    shutil.rmtree(out, ignore_errors=True)
    return {"procs": procs, "threads": threads, "wall": wall, "prune_wall": max(x["wall"] for x in res),
            "peak_rss_per_process": max(x["rss"] for x in res), "times_rank0": res[0]["times"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 7, 18], help="depths (18 blocks: 4.2 GB)")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--workdir", default=None, help="where the synthetic checkpoints go (default: a temp folder)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.out = args.out
        return worker(args)
    import torch

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fasp_scaling_"))
    rows = []
    try:
        for layers in args.layers:
            ckpt = work / f"llama-l{layers}"
            nbytes = write_checkpoint(ckpt, layers)
            for procs, threads in ((1, 2), (2, 1)):
                for rep in range(args.repeats):
                    r = run(ckpt, work / "out", procs, threads, args.nsamples, args.seqlen)
                    r.update({"layers": layers, "checkpoint_bytes": nbytes, "repeat": rep,
                              "rss_over_size": r["peak_rss_per_process"] / nbytes})
                    rows.append(r)
                    print(f"{layers:3d} blocks {nbytes / 1e9:5.2f} GB  {procs} proc x {threads} thr: "
                          f"{r['prune_wall']:7.1f} s, peak RSS {r['peak_rss_per_process'] / 1e9:5.2f} GB "
                          f"({r['rss_over_size']:.2f}x)", flush=True)
            shutil.rmtree(ckpt)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "git": git, "load_after": os.getloadavg(), "nsamples": args.nsamples, "seqlen": args.seqlen,
            "shape": SHAPE}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Pruning bigger-than-memory checkpoints block by block (CPU, fp32)\n",
             f"torch {meta['torch']}, {meta['cpus']} cores, git {git}, load average (1, 5, 15 min) when the runs ended {meta['load_after']}; "
             f"{args.nsamples} x {args.seqlen} calibration tokens, 20 %, default settings, "
             f"`python bench/bench_scaling.py`.\n",
             "| blocks | checkpoint | processes x threads | prune time (s) | peak RSS / process | RSS / size |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['checkpoint_bytes'] / 1e9:.2f} GB | {r['procs']} x {r['threads']} | "
                     f"{r['prune_wall']:.1f} | {r['peak_rss_per_process'] / 1e9:.2f} GB | {r['rss_over_size']:.2f}x |")
    (out / "scaling_cpu.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for procs, threads in ((1, 2), (2, 1)):
            sel = [r for r in rows if r["procs"] == procs]
            xs = [r["checkpoint_bytes"] / 1e9 for r in sel]
            ax[0].plot(xs, [r["prune_wall"] for r in sel], "o-", label=f"{procs} proc x {threads} thr")
            ax[1].plot(xs, [r["peak_rss_per_process"] / 1e9 for r in sel], "o-", label=f"{procs} proc x {threads} thr")
        ax[1].plot(xs, [0.35 * x for x in xs], "k--", label="0.35 x size")
        ax[0].set(xlabel="checkpoint (GB)", ylabel="prune time (s)")
        ax[1].set(xlabel="checkpoint (GB)", ylabel="peak RSS per process (GB)")
        for a in ax:
            a.legend()
        fig.tight_layout()
        fig.savefig(out / "scaling_cpu.png", dpi=100)
    except ImportError:  # pragma: no cover
        pass


if __name__ == "__main__":
    main()
