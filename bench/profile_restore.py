"""Where the restore op's time goes, next to the plain-torch pipeline with its formulation.

    python bench/profile_restore.py [--device cuda|cpu] [--sizes smollm2,opt125m] [--calls 20]

For each size of bench/bench_ops.py (the same problem: W, H from calibration tokens, 20 % of the
columns removed by score), runs ``--calls`` calls of ``fasp_ext.ops.restore`` and of the "torch
R-RHS" pipeline (gather, damping, cholesky, cholesky_solve with the |R| columns of H[S, R] as
right-hand sides, one GEMM) under torch.profiler, after a warm-up, and writes per size and function:
the wall time per call, the host-device synchronisations and copies per call, and the operators and
kernels that take the most time (device time on a GPU, CPU time otherwise). On a GPU this says
whether the op's gap to torch is its synchronisations, its launches or its solver calls.
Writes bench/results/restore_profile_<device>.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_ops import SIZES, machine_info, restore_problem, sync, torch_restore_baselines  # noqa: E402

from fasp_ext import ops  # noqa: E402

#: runtime calls that make the host wait for the device, or copy between them
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COPY_NAMES = ("cudaMemcpyAsync", "cudaMemcpy")
LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def profile_fn(fn, device, calls: int, top: int) -> dict:
    for _ in range(3):
        fn()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        wall = time.perf_counter() - t
    events = prof.key_averages()
    count = {e.key: e.count for e in events}
    per_call = lambda names: sum(count.get(n, 0) for n in names) / calls  # noqa: E731
    on_device = device.type == "cuda"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"

    def self_time(e):
        v = getattr(e, key, None)
        if v is None and on_device:  # older torch names it after CUDA
            v = getattr(e, "self_cuda_time_total", 0)
        return float(v or 0)

    rows = sorted(events, key=self_time, reverse=True)[:top]
    return {
        "wall_ms_per_call": wall / calls * 1e3,
        "syncs_per_call": per_call(SYNC_NAMES),
        "copies_per_call": per_call(COPY_NAMES),
        "launches_per_call": per_call(LAUNCH_NAMES),
        "time_kind": "device" if on_device else "cpu",
        "top": [{"name": e.key, "calls_per_call": e.count / calls, "self_us_per_call": self_time(e) / calls}
                for e in rows],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="smollm2,opt125m")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--top", type=int, default=12, help="operators and kernels listed per function")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        ap.error(f"--sizes: unknown size(s) {', '.join(bad)}; choose from {', '.join(SIZES)}")
    if args.calls < 1:
        ap.error(f"--calls must be >= 1, got {args.calls}")
    info = machine_info(device)
    info["command"] = "python bench/profile_restore.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {}
    for name in sizes:
        cfg = SIZES[name]
        g = torch.Generator(device="cpu").manual_seed(0)
        _, s, H, W = restore_problem(cfg, device, g, ops)
        kept = ops.score_select(W, s, cfg["k"], None, 1)
        fns = {"op": lambda: ops.restore(W, H, kept, 0.01, False, 4),
               "torch R-RHS": torch_restore_baselines(W, H, kept, ops)["torch R-RHS"]}
        results[name] = {fn_name: profile_fn(fn, device, args.calls, args.top) for fn_name, fn in fns.items()}
        for fn_name, r in results[name].items():
            print(f"{name:8s} {fn_name:12s} {r['wall_ms_per_call']:.2f} ms/call, {r['syncs_per_call']:.1f} syncs, "
                  f"{r['copies_per_call']:.1f} copies, {r['launches_per_call']:.1f} launches per call", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"restore_profile_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    lines = [f"# Where restore's time goes ({device.type})", "",
             f"- {info.get('gpu') or info['cpu']}; torch {info['torch']}; git {info['git_commit'][:12]}"
             f"{' (sources changed)' if info['git_dirty_sources'] else ''}; {info['date']}",
             f"- command: `{info['command']}`; {args.calls} profiled calls per function after 3 warm-up calls;"
             " one run under the profiler (its overhead is in the wall times): indications, not medians", ""]
    for name, per_fn in results.items():
        c = SIZES[name]
        lines += [f"## {name}: W {c['out']}x{c['m']}, {c['k']} kept, fp32", "",
                  "| function | wall ms / call | syncs / call | copies / call | launches / call |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {fn} | {r['wall_ms_per_call']:.2f} | {r['syncs_per_call']:.1f} | {r['copies_per_call']:.1f} | "
                  f"{r['launches_per_call']:.1f} |" for fn, r in per_fn.items()]
        for fn, r in per_fn.items():
            lines += ["", f"{fn}: the {len(r['top'])} largest by self {r['time_kind']} time", "",
                      f"| operator or kernel | calls / call | self {r['time_kind']} us / call |",
                      "| --- | ---: | ---: |"]
            lines += [f"| `{t['name'][:90]}` | {t['calls_per_call']:.1f} | {t['self_us_per_call']:.1f} |"
                      for t in r["top"]]
        lines.append("")
    (out / f"{stem}.md").write_text("\n".join(lines))
    print(f"wrote {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
