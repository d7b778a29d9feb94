"""Per-op timings of the compiled fasp_ext kernels against fasp_ext/reference.py and plain-torch baselines.

    python bench/bench_ops.py [--device cpu|cuda] [--sizes smollm2,opt125m,llama7b] [--threads 1,2] [--repeats 5]

Sizes (the W2 of an MLP: out x m, 20 % of the columns removed, tokens per calibration batch):
  smollm2 : m = 1536,  out = 576,  k = 1228, 2048 tokens   (SmolLM2-135M down_proj)
  opt125m : m = 3072,  out = 768,  k = 2458, 2048 tokens   (OPT-125M fc2)
  llama7b : m = 11008, out = 4096, k = 8806, 2048 tokens   (LLaMA-7B down_proj)
Every case runs the op and its baselines interleaved in the same process (op, baseline, op, ...),
``--repeats`` times, and reports the median and the spread (min-max) of each; on CPU once per
torch thread count in ``--threads``. Baselines:
  accumulate_stats: the bare GEMM it contains (H.addmm_(X^T, X)) and the reference;
  score_select: the reference;
  restore: the plain-torch pipelines giving the same W' (gather, damping, torch.linalg.cholesky,
    torch.cholesky_solve): "torch out-RHS" solves with the out rows of W[:, R] H[R, S] as
    right-hand sides (the textbook form), "torch R-RHS" with the |R| columns of H[S, R] (the form
    the op uses, written in torch); plus the reference (fasp_ext/reference.py) and, at the small
    size, torch.linalg.lstsq on the calibration tokens.
Writes bench/results/ops_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
    "smollm2": dict(m=1536, out=576, k=1228, tokens=2048, batches=2),
    "opt125m": dict(m=3072, out=768, k=2458, tokens=2048, batches=2),
    "llama7b": dict(m=11008, out=4096, k=8806, tokens=2048, batches=4),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, device, repeats, warmup=1, min_sample_s=0.05):
    """{name: [ms per call, one per repeat]}, the functions run interleaved (a, b, c, a, b, c, ...).
    Calls faster than min_sample_s are looped inside each sample."""
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        first = time.perf_counter() - t
        inner[name] = 1 if first >= min_sample_s else min(1000, int(min_sample_s / max(first, 1e-5)) + 1)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t) / inner[name] * 1e3)
    return times


def stat(v):
    return {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "n": len(v)}


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
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty_sources": dirty,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "build_info": fasp_ext.build_info(),
        "cpu_gram_backend": fasp_ext.ops.cpu_gram_backend(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def restore_problem(cfg, device, g, ops):
    """A size's restoration problem: calibration tokens Xcal (``batches`` x ``tokens`` rows, columns of
    different scales), their s and H (by ``ops.accumulate_stats``) and a random W (out x m)."""
    m, out, T = cfg["m"], cfg["out"], cfg["tokens"]
    Xcal = torch.randn(cfg["batches"] * T, m, generator=g).to(device)
    Xcal = Xcal * (0.5 + torch.rand(m, generator=g).to(device))
    H = torch.zeros(m, m, device=device)
    s = torch.zeros(m, device=device)
    ops.accumulate_stats(Xcal, s, H)
    W = (torch.randn(out, m, generator=g) * 0.02).to(device)
    return Xcal, s, H, W


def torch_restore_baselines(W, H, kept, ops, damp=0.01) -> dict:
    """The plain-torch pipelines giving the op's W' (gather, damping, cholesky, cholesky_solve), by
    name, each checked once against ``ops.restore``: "torch out-RHS" solves with the out rows of
    W[:, R] H[R, S], "torch R-RHS" with the |R| columns of H[S, R] (the op's formulation)."""
    mask = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    mask[kept] = False
    removed = torch.nonzero(mask).flatten()

    def torch_out_rhs():
        Hk = H[:, kept]
        Hss = Hk[kept]
        Hss.diagonal().add_(damp * float(Hss.diagonal().mean()))
        L = torch.linalg.cholesky(Hss)
        B = W[:, removed] @ Hk[removed]  # (out, k)
        return W[:, kept] + torch.cholesky_solve(B.t(), L).t()

    def torch_r_rhs():
        Hk = H[:, kept]
        Hss = Hk[kept]
        Hss.diagonal().add_(damp * float(Hss.diagonal().mean()))
        L = torch.linalg.cholesky(Hss)
        Y = torch.cholesky_solve(Hk[removed].t(), L)  # (k, |R|)
        return torch.addmm(W[:, kept], W[:, removed], Y.t())

    got = ops.restore(W, H, kept, damp, False, 4)[0]
    for fn in (torch_out_rhs, torch_r_rhs):
        want = fn()
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-3, f"baseline {fn.__name__} disagrees with the op: {err}"
    return {"torch out-RHS": torch_out_rhs, "torch R-RHS": torch_r_rhs}


def bench_size(name, cfg, device, repeats, ops, threads):
    g = torch.Generator(device="cpu").manual_seed(0)
    m, out, T, k = cfg["m"], cfg["out"], cfg["tokens"], cfg["k"]
    big = m > 8000
    rows = []

    def case(op, what, fns, reps=repeats, warmup=1):
        times = interleaved(fns, device, reps, warmup)
        r = {"size": name, "threads": threads, "op": op, "case": what,
             "times": {n: stat(v) for n, v in times.items()},
             "date": time.strftime("%Y-%m-%d %H:%M"), "load_1min": os.getloadavg()[0]}
        first = next(iter(fns))
        med = r["times"][first]["median_ms"]
        r["ratios"] = {n: r["times"][n]["median_ms"] / med for n in fns if n != first}
        rows.append(r)
        parts = [f"{n} {st['median_ms']:.1f} [{st['min_ms']:.1f}-{st['max_ms']:.1f}]" for n, st in r["times"].items()]
        print(f"  t={threads} {op:16s} {what:30s} " + "; ".join(parts)
              + "  | " + ", ".join(f"{n}/{first} {x:.2f}" for n, x in r["ratios"].items()), flush=True)

    # ---- statistics: one batch of T tokens, fp32 and bf16 activations
    X32 = torch.randn(T, m, generator=g).to(device)
    s = torch.zeros(m, device=device)
    H = torch.zeros(m, m, device=device)
    for dt in (torch.float32, torch.bfloat16):
        X = X32.to(dt)
        case("accumulate_stats", f"X {T}x{m} {str(dt)[6:]} +H",
             {"op": lambda: ops.accumulate_stats(X, s, H), "addmm fp32": lambda: H.addmm_(X32.t(), X32),
              "reference": lambda: ref.accumulate_stats(X, s, H)}, reps=max(3, repeats - 2) if big else repeats)
        case("accumulate_stats", f"X {T}x{m} {str(dt)[6:]} s only",
             {"op": lambda: ops.accumulate_stats(X, s, None), "reference": lambda: ref.accumulate_stats(X, s, None)})

    Xcal, s, H, W = restore_problem(cfg, device, g, ops)

    # ---- scoring + selection
    for dt in (torch.float32, torch.bfloat16):
        Wd = W.to(dt)
        case("score_select", f"W {out}x{m} {str(dt)[6:]} k={k}",
             {"op": lambda: ops.score_select(Wd, s, k, None, 1), "reference": lambda: ref.score_select(Wd, s, k)})
    kept = ops.score_select(W, s, k, None, 1)

    # ---- restoration (damp 0.01): the op against plain-torch pipelines giving the same W'
    baselines = torch_restore_baselines(W, H, kept, ops)
    fns = {"op": lambda: ops.restore(W, H, kept, 0.01, False, 4)}
    if not big:
        fns["wrapper"] = lambda: fasp_ext.restore(W, H, kept, 0.01)
    fns.update(baselines)
    fns["reference"] = lambda: ref.restore(W, H, kept, 0.01)
    if not big:
        fns["lstsq"] = lambda: torch.linalg.lstsq(Xcal[:, kept], Xcal @ W.t()).solution
    case("restore", f"W {out}x{m} k={k} fp32", fns, reps=max(3, repeats - 2) if big else repeats,
         warmup=0 if big else 1)
    return rows


_RUN_KEYS = ("date", "git_commit", "command", "load_average_at_start", "load_average_at_end")


def _provenance(info) -> list[dict]:
    """The runs the kept rows of a merged file come from: [{sizes, date, git_commit, ...}] (files
    written before this list existed hold one ``merged_from`` dict and ``merged_sizes``)."""
    mf = info.get("merged_from")
    if not mf:
        return []
    return mf if isinstance(mf, list) else [{**mf, "sizes": info.get("merged_sizes", [])}]


def merge_rows(old: dict, rows: list, sizes: set) -> tuple[list, list]:
    """The old file's rows of sizes not run now, before ``rows``, and where each kept size was
    measured: its own run, or the run an earlier merge kept it from."""
    kept_rows = [r for r in old["results"] if r["size"] not in sizes]
    runs = []
    for size in sorted({r["size"] for r in kept_rows}):
        src = next((p for p in _provenance(old["machine"]) if size in p["sizes"]), None)
        src = {k: (src or old["machine"]).get(k) for k in _RUN_KEYS}
        same = next((p for p in runs if all(p.get(k) == src[k] for k in _RUN_KEYS)), None)
        if same:
            same["sizes"].append(size)
        else:
            runs.append({**src, "sizes": [size]})
    order = {n: i for i, n in enumerate(SIZES)}
    merged = sorted(kept_rows + rows, key=lambda r: (order.get(r["size"], 99), r["threads"]))
    return merged, runs


def to_markdown(info, rows):
    lines = [
        f"# fasp_ext op benchmark ({info['device']})",
        "",
        f"- CPU: {info['cpu']} ({info['cores']} cores)" + (f"; GPU: {info['gpu']}" if "gpu" in info else ""),
        f"- torch {info['torch']}, python {info['python']}, git {info['git_commit'][:12]}"
        + (" (sources modified)" if info.get("git_dirty_sources") else "")
        + f"; CPU Gram update: {info.get('cpu_gram_backend', 'blocked-gemm')}",
        f"- load average (1 min) at start {info.get('load_average_at_start') or 0:.1f}, at end "
        f"{info.get('load_average_at_end') or 0:.1f} (on a shared machine other work skews timings)",
        f"- {info['date']}; command: `{info['command']}`",
    ]
    for mf in _provenance(info):
        lines.append(f"- rows of {', '.join(mf['sizes'])} kept from an earlier run: {mf.get('date')}, git "
                     f"{(mf.get('git_commit') or '')[:12]}, `{mf.get('command')}`, load {mf.get('load_average_at_start') or 0:.1f}"
                     f" -> {mf.get('load_average_at_end') or 0:.1f}")
    lines += [
        "- every case ran its functions interleaved in one process; times are the median [min-max] in ms "
        "over the repeats; 'x / op' is the median of x divided by the op's (> 1: the op is faster)",
        "",
        "| size | threads | op | case | op ms | baseline | baseline ms | baseline / op | load (1 min) |",
        "| --- | ---: | --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        names = list(r["times"])
        o = r["times"][names[0]]
        first = True
        for n in names[1:]:
            b = r["times"][n]
            opcell = f"{o['median_ms']:.1f} [{o['min_ms']:.1f}-{o['max_ms']:.1f}]" if first else "(same)"
            lines.append(f"| {r['size']} | {r['threads']} | {r['op']} | {r['case']} | {opcell} | {n} | "
                         f"{b['median_ms']:.1f} [{b['min_ms']:.1f}-{b['max_ms']:.1f}] | {r['ratios'][n]:.2f} | "
                         + (f"{r['load_1min']:.1f} |" if "load_1min" in r else " |"))
            first = False
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="smollm2,opt125m,llama7b")
    ap.add_argument("--threads", default="1,2", help="torch CPU thread counts (CPU only)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the sizes not run now from the existing results file")
    args = ap.parse_args()
    device = torch.device(args.device)
    ops = fasp_ext._loader.compiled_ops_for(device)
    if ops is None:
        sys.exit(f"no compiled fasp_ext kernels for {device}: {fasp_ext.build_info()}")
    info = machine_info(device)
    info["command"] = "python bench/bench_ops.py " + " ".join(sys.argv[1:])
    print(json.dumps({k: v for k, v in info.items() if k != "build_info"}))
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    rows = []
    for name in args.sizes.split(","):
        for t in threads:
            torch.set_num_threads(t)
            print(f"== {name} threads={t}: {SIZES[name]}", flush=True)
            rows += bench_size(name, SIZES[name], device, args.repeats, ops, t)
    info["load_average_at_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ops_{device.type}"
    if args.merge and (out / f"{stem}.json").exists():
        old = json.loads((out / f"{stem}.json").read_text())
        rows, runs = merge_rows(old, rows, set(args.sizes.split(",")))
        if runs:
            info["merged_from"] = runs
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "results": rows}, indent=1) + "\n")
    md = to_markdown(info, rows)
    (out / f"{stem}.md").write_text(md)
    print()
    print(md)


if __name__ == "__main__":
    main()
