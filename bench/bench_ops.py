"""Per-op timings of the compiled fasp_ext kernels against fasp_ext/reference.py and baselines.

    python bench/bench_ops.py [--device cpu|cuda] [--sizes opt125m,llama7b] [--repeats 3]

Sizes (the W2 of an MLP: out x m, tokens per calibration batch):
  opt125m : m = 3072,  out = 768,  2048 tokens
  llama7b : m = 11008, out = 4096, 2048 tokens (restore with k = 80 % of m)
Baselines: statistics vs the bare GEMM it contains (H.addmm_(X^T, X)); restoration vs
torch.linalg.lstsq on the calibration tokens (the least-squares problem restore solves through H)
and vs a plain Cholesky solve of the undamped-form normal equations (cholesky + cholesky_solve).
Writes bench/results/ops_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fasp_ext  # noqa: E402
from fasp_ext import reference as ref  # noqa: E402

SIZES = {
    "opt125m": dict(m=3072, out=768, tokens=2048, batches=2, kfrac=0.8),
    "llama7b": dict(m=11008, out=4096, tokens=2048, batches=4, kfrac=0.8),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats, warmup=1, min_sample_s=0.25):
    """Median ms per call. Fast calls are looped inside each sample (some clocks tick in ms)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t
    inner = 1 if first >= min_sample_s else min(1000, int(min_sample_s / max(first, 1e-4)) + 1)
    times = [first] if inner == 1 else []
    while len(times) < repeats:
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        times.append((time.perf_counter() - t) / inner)
    times.sort()
    return times[len(times) // 2] * 1e3


def machine_info(device):
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--", "csrc", "fasp_ext"],
                                             cwd=ROOT, text=True).strip())
    except Exception:
        commit, dirty = "unknown", None
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty_sources": dirty,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "build_info": fasp_ext.build_info(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def bench_size(name, cfg, device, repeats, ops):
    g = torch.Generator(device="cpu").manual_seed(0)
    m, out, T = cfg["m"], cfg["out"], cfg["tokens"]
    big = m > 8000
    rows = []

    def row(op, what, ms_c, ms_r, base_name=None, ms_b=None):
        r = {"size": name, "op": op, "case": what, "compiled_ms": ms_c, "reference_ms": ms_r,
             "speedup_vs_reference": ms_r / ms_c if ms_c else None}
        if base_name:
            r["baseline"] = base_name
            r["baseline_ms"] = ms_b
            r["compiled_over_baseline"] = ms_c / ms_b
        rows.append(r)
        print(f"  {op:17s} {what:28s} compiled {ms_c:9.1f} ms  reference {ms_r:9.1f} ms  "
              f"x{ms_r / ms_c:5.2f}" + (f"   {base_name} {ms_b:9.1f} ms ({ms_c / ms_b:4.2f}x)" if base_name else ""),
              flush=True)

    # ---- statistics: one batch of T tokens, fp32 and bf16 activations
    X32 = torch.randn(T, m, generator=g).to(device)
    s = torch.zeros(m, device=device)
    H = torch.zeros(m, m, device=device)
    for dt in (torch.float32, torch.bfloat16):
        X = X32.to(dt)
        rep = repeats if not big else max(1, repeats - 1)
        ms_c = timeit(lambda: ops.accumulate_stats(X, s, H), device, rep)
        ms_r = timeit(lambda: ref.accumulate_stats(X, s, H), device, rep)
        ms_b = timeit(lambda: H.addmm_(X32.t(), X32), device, rep)
        row("accumulate_stats", f"X {T}x{m} {str(dt)[6:]} +H", ms_c, ms_r, "addmm fp32", ms_b)
        ms_c = timeit(lambda: ops.accumulate_stats(X, s, None), device, repeats)
        ms_r = timeit(lambda: ref.accumulate_stats(X, s, None), device, repeats)
        row("accumulate_stats", f"X {T}x{m} {str(dt)[6:]} s only", ms_c, ms_r)

    # calibration H over a few batches (rank min(tokens, m): damped below)
    Xcal = torch.randn(cfg["batches"] * T, m, generator=g).to(device)
    Xcal = Xcal * (0.5 + torch.rand(m, generator=g).to(device))
    H = torch.zeros(m, m, device=device)
    s = torch.zeros(m, device=device)
    ops.accumulate_stats(Xcal, s, H)
    W = (torch.randn(out, m, generator=g) * 0.02).to(device)
    k = int(round(cfg["kfrac"] * m))

    # ---- scoring + selection
    for dt in (torch.float32, torch.bfloat16):
        Wd = W.to(dt)
        ms_c = timeit(lambda: ops.score_select(Wd, s, k, None, 1), device, repeats)
        ms_r = timeit(lambda: ref.score_select(Wd, s, k), device, repeats)
        row("score_select", f"W {out}x{m} {str(dt)[6:]} k={k}", ms_c, ms_r)
    kept = ops.score_select(W, s, k, None, 1)

    # ---- restoration (damp 0.01), vs lstsq on the tokens and vs a plain Cholesky solve
    rep = 1 if big else repeats
    warm = 0 if big else 1
    ms_c = timeit(lambda: ops.restore(W, H, kept, 0.01, False, 4), device, rep, warm)
    ms_r = timeit(lambda: ref.restore(W, H, kept, 0.01), device, rep, warm)

    def plain_cholesky():
        Hss = H[kept][:, kept]
        lam = 0.01 * float(Hss.diagonal().mean())
        L = torch.linalg.cholesky(Hss + lam * torch.eye(k, device=device))
        return torch.cholesky_solve((W @ H[:, kept]).t(), L).t()

    ms_chol = timeit(plain_cholesky, device, rep, warm)
    row("restore", f"W {out}x{m} k={k} fp32", ms_c, ms_r, "cholesky_solve", ms_chol)

    def lstsq():
        Xs = Xcal[:, kept]
        return torch.linalg.lstsq(Xs, Xcal @ W.t()).solution

    ms_lstsq = timeit(lstsq, device, 1, 0)
    rows[-1]["baseline2"] = f"lstsq on {Xcal.shape[0]} tokens"
    rows[-1]["baseline2_ms"] = ms_lstsq
    rows[-1]["compiled_over_baseline2"] = ms_c / ms_lstsq
    print(f"  {'':17s} {'':28s} lstsq ({Xcal.shape[0]} tokens) {ms_lstsq:9.1f} ms ({ms_c / ms_lstsq:4.2f}x)")
    return rows


def to_markdown(info, rows):
    lines = [
        f"# fasp_ext op benchmark ({info['device']})",
        "",
        f"- CPU: {info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads)"
        + (f"; GPU: {info['gpu']}" if "gpu" in info else ""),
        f"- torch {info['torch']}, python {info['python']}, git {info['git_commit'][:12]}"
        + (" (sources modified)" if info.get("git_dirty_sources") else ""),
        f"- load average at start: {info.get('load_average_at_start') or 0:.1f} (other work on the machine skews timings)",
        f"- {info['date']}; times are medians in ms; speedup = reference / compiled;"
        " 'compiled / baseline' < 1 means the op is faster than the baseline",
        "",
        "| size | op | case | compiled ms | reference ms | speedup | baseline | baseline ms | compiled / baseline |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        b = r.get("baseline", "")
        bm = f"{r['baseline_ms']:.1f}" if "baseline_ms" in r else ""
        br = f"{r['compiled_over_baseline']:.2f}" if "compiled_over_baseline" in r else ""
        lines.append(
            f"| {r['size']} | {r['op']} | {r['case']} | {r['compiled_ms']:.1f} | {r['reference_ms']:.1f} | "
            f"{r['speedup_vs_reference']:.2f} | {b} | {bm} | {br} |"
        )
        if "baseline2" in r:
            lines.append(f"| {r['size']} | {r['op']} | (same) | {r['compiled_ms']:.1f} | | | {r['baseline2']} | "
                         f"{r['baseline2_ms']:.1f} | {r['compiled_over_baseline2']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="opt125m,llama7b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    device = torch.device(args.device)
    ops = fasp_ext._loader.compiled_ops_for(device)
    if ops is None:
        sys.exit(f"no compiled fasp_ext kernels for {device}: {fasp_ext.build_info()}")
    info = machine_info(device)
    print(json.dumps({k: v for k, v in info.items() if k != "build_info"}))
    rows = []
    for name in args.sizes.split(","):
        print(f"== {name}: {SIZES[name]}", flush=True)
        rows += bench_size(name, SIZES[name], device, args.repeats, ops)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ops_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "results": rows}, indent=1) + "\n")
    md = to_markdown(info, rows)
    (out / f"{stem}.md").write_text(md)
    print()
    print(md)


if __name__ == "__main__":
    main()
