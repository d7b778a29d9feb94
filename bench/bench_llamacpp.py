"""Speed of pruned SmolLM2-135M in llama.cpp (llama-cpp-python), dense versus pruned GGUF exports.

    python bench/bench_llamacpp.py [--sparsities 0.2 0.3] [--types f16 q8_0] [--rounds 7]
        [--prompt 256] [--gen 128] [--threads 2] [--head 0.2] [--work DIR] [--out bench/results/llamacpp_cpu.md]

Prepares (once, kept in --work): the dense SmolLM2 and, per sparsity, the fasp_ext result with the
default settings (and with ``--attn-unit head`` for the ``--head`` sparsities), each exported with
``fasp-ext export`` (deci with per-layer widths, padded to multiples of 32 with zeros: the export's
default, which q8_0 needs). Then measures every GGUF in interleaved rounds in one process (round 1: every model once,
round 2: every model again, ...), so drift of the machine hits every model alike:

* prefill: tokens/s of one ``eval`` of --prompt tokens from an empty cache;
* decode: tokens/s of --gen single-token ``eval`` calls after that prompt (what generation does).

Reports median and spread (min-max) over the rounds, the decode speed-up over the dense export of
the same type, and the ideal speed-up of memory-bound decoding: the ratio of bytes read per token
(every tensor of the file, less the token embedding when a separate output matrix exists: decoding
reads one row of it). Value heads of a result are padded back to the key head size in the export,
so its attention and KV cache cost what the dense ones cost; that is in the ideal ratio too.

Timings only, never asserted. Run it on a quiet machine: it measures the CPU it shares.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def prepare(work: Path, sparsities, types, nsamples: int, seqlen: int, head: tuple = ()) -> list[dict]:
    """The GGUF files to time: [{name, sparsity, type, path}], built where missing. ``head``: the
    sparsities also pruned with ``--attn-unit head`` (whole kv-head groups: no padded value heads),
    timed in f16."""
    from fasp_ext import models

    work.mkdir(parents=True, exist_ok=True)
    fasp = [sys.executable, "-m", "fasp_ext"]
    dense_dir = Path(models.smollm2_path())
    runs = []
    todo = [(typ, s, False) for typ in types for s in [0.0, *sparsities]] + [("f16", s, True) for s in head]
    for typ, s, by_head in todo:
        name = "dense" if s == 0 else f"fasp{int(round(s * 100))}" + ("-head" if by_head else "")
        src = dense_dir
        if s:
            src = work / name
            if not (src / "config.json").is_file():
                sh([*fasp, "prune", "--model", "smollm2", "--calib", "austen:emma", "--sparsity", str(s),
                    "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--quiet", "--out", str(src)]
                   + (["--attn-unit", "head"] if by_head else []))
        gg = work / f"{name}-{typ}.gguf"
        if not gg.is_file():
            sh([*fasp, "export", "--format", "gguf", "--model", str(src), "--out", str(gg), "--outtype", typ])
        runs.append({"name": name, "sparsity": s, "type": typ, "path": str(gg)})
    return runs


def bytes_per_token(path: str) -> dict:
    """Bytes of the tensors a decode step reads, and the file's per-layer MLP widths."""
    import gguf

    r = gguf.GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    total = sum(sizes.values())
    read = total - (sizes["token_embd.weight"] if "output.weight" in sizes else 0)
    arch = r.fields["general.architecture"].contents()
    ffn = r.fields[f"{arch}.feed_forward_length"].contents()
    return {"file_bytes": total, "read_bytes": read, "arch": arch, "ffn": ffn if isinstance(ffn, list) else [ffn]}


def measure(llm, prompt_ids: list[int], gen: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one round."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    t1 = time.perf_counter()
    tok = prompt_ids[-1]
    for i in range(gen):
        tok = (tok * 7 + 13 + i) % 1000 + 100  # fixed inputs: the work does not depend on the text
        llm.eval([tok])
    t2 = time.perf_counter()
    return len(prompt_ids) / (t1 - t0), gen / (t2 - t1)


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.2, 0.3])
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"], choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt", type=int, default=256, help="prefill tokens")
    ap.add_argument("--gen", type=int, default=128, help="decoded tokens per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--head", nargs="*", type=float, default=[0.2],
                    help="sparsities also pruned with --attn-unit head (f16 rows; none: leave them out)")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows of the pruning runs")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (512 as in the quality results)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "fasp_ext" / "bench_llamacpp"),
                    help="folder for the pruned models and GGUF files (kept between runs)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "llamacpp_cpu.md"),
                    help="results (.md; a .json next to it)")
    a = ap.parse_args(argv)
    import llama_cpp

    runs = prepare(Path(a.work), a.sparsities, a.types, a.nsamples, a.seqlen, tuple(a.head))
    for r in runs:
        r.update(bytes_per_token(r["path"]))
        r["prefill"], r["decode"] = [], []
    llms = [llama_cpp.Llama(model_path=r["path"], n_ctx=a.prompt + a.gen + 8, n_batch=a.prompt, n_ubatch=a.prompt,
                            n_threads=a.threads, n_threads_batch=a.threads, verbose=False) for r in runs]
    prompt_ids = [(i * 31 + 7) % 1000 + 100 for i in range(a.prompt)]
    for llm in llms:  # warm-up: page the weights in
        measure(llm, prompt_ids[:16], 4)
    for rnd in range(a.rounds):
        for r, llm in zip(runs, llms):
            p, d = measure(llm, prompt_ids, a.gen)
            r["prefill"].append(p)
            r["decode"].append(d)
        print(f"round {rnd + 1}/{a.rounds}: " + ", ".join(f"{r['name']}-{r['type']} {r['decode'][-1]:.1f}"
                                                       for r in runs), flush=True)
    for llm in llms:
        llm.close()
    dense = {r["type"]: r for r in runs if r["sparsity"] == 0}
    lines = [
        "# SmolLM2-135M in llama.cpp: dense versus FASP-pruned GGUF exports (CPU)",
        "",
        f"`python bench/bench_llamacpp.py --rounds {a.rounds} --prompt {a.prompt} --gen {a.gen} --threads {a.threads}"
        f" --nsamples {a.nsamples} --seqlen {a.seqlen}` with llama-cpp-python {llama_cpp.__version__}, "
        f"{a.threads} threads, {os.cpu_count()} CPUs seen; {a.rounds} interleaved rounds, median [min-max].",
        "Pruned models: `fasp-ext prune --model smollm2 --calib austen:emma --sparsity S` (default settings), "
        "exported with `fasp-ext export --format gguf` (arch deci, per-layer MLP widths padded to multiples of 32 "
        "with zeros, the export's default; value heads padded back to 64, so attention and KV cache are the dense ones; "
        "`-head`: `--attn-unit head`, whole kv-head groups removed, per-layer head counts, no padding).",
        "Ideal decode speed-up: bytes read per token, dense / pruned (all tensors but the embedding's unread rows).",
        "",
        "| model | type | arch | MB read/token | prefill tok/s | decode tok/s | decode speed-up | ideal | measured/ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        d = dense[r["type"]]
        up = statistics.median(r["decode"]) / statistics.median(d["decode"])
        ideal = d["read_bytes"] / r["read_bytes"]
        r.update(decode_speedup=up, ideal_speedup=ideal)
        lines.append(f"| {r['name']} | {r['type']} | {r['arch']} | {r['read_bytes'] / 1e6:.1f} | {spread(r['prefill'])} | "
                     f"{spread(r['decode'])} | {up:.3f}x | {ideal:.3f}x | {up / ideal:.2f} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, "\n".join(lines) + "\n"),
                       (out.with_suffix(".json"), json.dumps({"args": vars(a), "runs": runs}, indent=1))):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    print("\n".join(lines))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
