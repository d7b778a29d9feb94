"""What token weighting costs: Gemma3-270M pruned with token_weighting auto and none, timed.

    python bench/quiet.py -- python bench/bench_token_weighting.py [--repeats 2] [--nsamples 32]

Each run prunes a fresh copy in its own process (the modes interleaved) at 20 % with the default
settings on NSAMPLES x 512 windows of Emma, and prints the pruning's wall time and its phases.
Writes bench/results/screens/token_weighting_time.json. Timings only; the accuracy is in
bench/results/screens/token_weighting_screen.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(mode: str, nsamples: int) -> None:
    sys.path.insert(0, str(ROOT))
    from fasp_ext import data, models
    from fasp_ext.pipeline import PruneConfig, prune

    model, tok = models.load_model("gemma3-270m")
    calib = data.calibration_windows(tok, data.load_text("austen:emma", split="calib"), nsamples, 512, seed=0)
    t = time.perf_counter()
    rep = prune(model, calib, PruneConfig(sparsity=0.2, progress=False, token_weighting=mode))
    print(json.dumps({"mode": mode, "seconds": time.perf_counter() - t,
                      "phases": {k: round(v, 2) for k, v in rep.times.items()}}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.nsamples)
    runs = []
    for _ in range(a.repeats):
        for mode in ("auto", "none"):
            out = subprocess.run([sys.executable, __file__, "--worker", mode, "--nsamples", str(a.nsamples)],
                                 check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    summary = {m: statistics.median(r["seconds"] for r in runs if r["mode"] == m) for m in ("auto", "none")}
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    res = {"nsamples": a.nsamples, "median_seconds": summary, "runs": runs, "load_at_end": load}
    (ROOT / "bench" / "results" / "screens" / "token_weighting_time.json").write_text(json.dumps(res, indent=2))
    print(f"median: auto {summary['auto']:.1f} s, none {summary['none']:.1f} s "
          f"({summary['auto'] / summary['none']:.2f}x)")


if __name__ == "__main__":
    main()
