"""The CPU Gram update through MKL's SYRK against the blocked GEMMs it replaced.

    python bench/bench_gram_backends.py [--tokens 4096] [--widths 576,1536,2048] [--rounds 2]

``accumulate_stats`` picks its Gram update once per process (``fasp_ext.ops.cpu_gram_backend()``):
MKL's SYRK where torch ships MKL, or the blocked lower-triangle GEMMs with ``FASP_EXT_SYRK=0``. Each
(backend, threads) case runs in its own process, the cases interleaved, ``--rounds`` times; every case
times 9 calls and reports the median [min-max] in ms, and checks the result against fp64. Writes
bench/results/gram_backends_cpu.{json,md}. Timings only, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(widths: list[int], tokens: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from fasp_ext import ops

    torch.set_num_threads(threads)
    out = {"backend": ops.cpu_gram_backend(), "threads": threads, "cases": []}
    for m in widths:
        g = torch.Generator().manual_seed(m)
        X = torch.randn(tokens, m, generator=g)
        H = torch.randn(m, m, generator=g)
        s = torch.zeros(m)
        want = H.double() + X.double().t() @ X.double()
        ops.accumulate_stats(X, s, H)
        err = float((H.double() - want).abs().max() / want.abs().max())
        ts = []
        for _ in range(9):
            t = time.perf_counter()
            ops.accumulate_stats(X, s, H)
            ts.append((time.perf_counter() - t) * 1e3)
        ts.sort()
        out["cases"].append({"m": m, "median_ms": ts[4], "min_ms": ts[0], "max_ms": ts[-1], "rel_err": err})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--widths", default="576,1536,2048")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    widths = [int(w) for w in a.widths.split(",")]
    if a.worker:
        print(json.dumps(worker(widths, a.tokens, a.worker)))
        return
    runs = []
    load = os.getloadavg()[0]
    for rnd in range(a.rounds):
        for t in (int(x) for x in a.threads.split(",")):
            for env in ("1", "0"):
                res = subprocess.run([sys.executable, __file__, "--worker", str(t), "--tokens", str(a.tokens),
                                      "--widths", a.widths], capture_output=True, text=True, check=True,
                                     env={**os.environ, "FASP_EXT_SYRK": env})
                r = json.loads(res.stdout.strip().splitlines()[-1])
                r["round"] = rnd
                runs.append(r)
                print(json.dumps(r), flush=True)
    info = {"tokens": a.tokens, "rounds": a.rounds, "load_at_start": load, "load_at_end": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_count": os.cpu_count()}
    lines = ["# CPU Gram update: MKL's SYRK against the blocked GEMMs", "",
             f"- {a.tokens} tokens per call; each (backend, threads) in its own process, interleaved, "
             f"{a.rounds} round(s); median [min-max] of 9 calls in ms; {info['date']}; "
             f"1-minute load {load:.2f} at start, {info['load_at_end']:.2f} at end", "",
             "| threads | columns | round | mkl-syrk ms | blocked-gemm ms | blocked / syrk | max rel. error vs fp64 |",
             "|---|---|---|---|---|---|---|"]
    for rnd in range(a.rounds):
        for t in (int(x) for x in a.threads.split(",")):
            pair = {r["backend"]: r for r in runs if r["round"] == rnd and r["threads"] == t}
            if set(pair) != {"mkl-syrk", "blocked-gemm"}:
                continue
            for cs, cb in zip(pair["mkl-syrk"]["cases"], pair["blocked-gemm"]["cases"]):
                lines.append(f"| {t} | {cs['m']} | {rnd} | {cs['median_ms']:.1f} [{cs['min_ms']:.1f}-{cs['max_ms']:.1f}] | "
                             f"{cb['median_ms']:.1f} [{cb['min_ms']:.1f}-{cb['max_ms']:.1f}] | "
                             f"{cb['median_ms'] / cs['median_ms']:.2f} | {max(cs['rel_err'], cb['rel_err']):.1e} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gram_backends_cpu.json").write_text(json.dumps({"info": info, "runs": runs}, indent=2))
    (out / "gram_backends_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
