"""Peak memory and time of `fasp-ext prune` on hostile and huge inputs, and of block-by-block loading.

Each case runs the command line in its own process and reads that process's peak RSS from the
kernel (``os.wait4``'s rusage). Cases:

* ``dev-zero``: ``--calib /dev/zero``; ``binary``: ``--calib`` on a 512 MiB binary file;
  ``fifo``: ``--eval`` on a FIFO -- each must be one line, exit 2, in seconds;
* ``text-5mb`` / ``text-5gb``: calibration (128 x 2048 tokens, the default) on a 5 MB and on a
  5 GB text file (Austen's novels repeated), with a tiny model carrying SmolLM2's tokenizer, so the
  text and its tokenisation are what the memory is about;
* ``lazy`` / ``in-memory``: a random LLaMA checkpoint of about 4 GB (fp32) pruned block by block
  (the default) and with ``--no-lazy``, peak RSS against the checkpoint's size, on
  ``--big-nsamples`` x ``--big-seqlen`` calibration tokens;
* ``2blocks-*``: two blocks of the same shape (0.54 GB) on 16 x 2048 tokens: the activations in
  memory with 8 windows per forward (the behaviour before ``--activations`` and the CPU's
  ``auto_batch_size``), on disk with 8, and the defaults (on disk, 2 windows of 2048 per forward);
* ``lazy-default``: the same checkpoint with every setting at its default (128 x 2048 calibration
  tokens), stopped (SIGTERM) once ``--stop-after-blocks`` blocks are pruned and written: a whole run
  takes hours on two cores, and the peak is reached by then (capture, the allocation's dense pass
  over all 60 blocks, then the pruning pass, whose blocks are all alike).

    python bench/bench_inputs.py [--work /tmp/fasp_inputs] [--cases ...] [--out bench/results/inputs_cpu.md]

The 5 GB text and the 4 GB checkpoint are written under ``--work`` and removed afterwards (about
9 GB of disk while it runs). Timings here are wall seconds of one run each: they show "seconds, not
minutes", not a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: the 2-block cases: (--activations, --batch-size) on 16 x 2048 tokens; "-" is the default
TWO_BLOCKS = {"2blocks-memory-b8": ("memory", "8"), "2blocks-disk-b8": ("disk", "8"), "2blocks-default": ("-", "-")}
CASES = ("dev-zero", "binary", "fifo", "text-5mb", "text-5gb", "lazy", "in-memory", "lazy-default", *TWO_BLOCKS)


def make(kind: str, folder: Path) -> Path:
    """Build a test model in a process of its own: the peak RSS the kernel reports for a child
    includes what it inherited at fork, so this process must never hold a model (a 4 GB model built
    here made a block-by-block prune of it read 4.4 GB instead of 1.0 GB)."""
    if kind.startswith("text:") or not (folder / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--make", kind, str(folder)], check=True,
                       stdout=subprocess.DEVNULL)
    return folder


def _written_blocks(out: Path) -> int:
    """Blocks a block-by-block prune has written so far: shards in its output's temporary folder."""
    return sum(len(list(d.glob("model-*.safetensors"))) for d in out.parent.glob(f".{out.name}*") if d.is_dir())


def run(cmd: list[str], stop_after: tuple[Path, int] | None = None) -> dict:
    """Run ``cmd``; its exit status, seconds and peak RSS. ``stop_after=(out, k)``: send it SIGTERM
    once k blocks of ``out`` are written (the exit status is then the signal's)."""
    import signal
    import tempfile

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True)
        stopped = None
        while stop_after is not None and p.poll() is None:
            time.sleep(2)
            if _written_blocks(stop_after[0]) >= stop_after[1]:
                stopped = time.perf_counter() - t0
                p.send_signal(signal.SIGTERM)
                break
        _, status, usage = os.wait4(p.pid, 0)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    r = {"rc": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t0,
         "peak_rss_gb": usage.ru_maxrss / 2**20,
         "stderr_lines": [ln for ln in err.splitlines() if ln.strip()][-3:], "stdout_tail": out.splitlines()[-3:]}
    if stop_after is not None:
        r["stopped_after_blocks"] = stop_after[1] if stopped is not None else None
    return r


def tiny_model(folder: Path) -> Path:
    """A 2-block LLaMA of hidden size 64 with SmolLM2's tokenizer (49152 tokens, byte-level BPE), so
    the memory measured is the text's and the tokenizer's, not the model's."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fasp_ext import models

    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(models.smollm2_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def words_file(path: Path, nbytes: int) -> Path:
    """English text (the six Austen novels, repeated) of ``nbytes`` bytes."""
    from fasp_ext import data

    block = (data.load_text("austen") + "\n\n").encode()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            f.write(block[: nbytes - written])
            written += len(block[: nbytes - written])
    return path


def big_checkpoint(folder: Path, layers: int = 60) -> Path:
    """A random LLaMA of about 1.0e9 parameters (4 GB in fp32): 60 blocks of hidden 1024, MLP 4096
    (``layers``: fewer of the same blocks)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    src = make("tiny", folder.parent / "tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096)
    LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="1GB")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / f).is_file():
            shutil.copy(src / f, folder / f)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/fasp_inputs", help="scratch folder (about 9 GB while running)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--out", default="bench/results/inputs_cpu.md")
    ap.add_argument("--big-nsamples", type=int, default=4, help="calibration windows of the 4 GB cases")
    ap.add_argument("--big-seqlen", type=int, default=256, help="tokens per window of the 4 GB cases")
    ap.add_argument("--stop-after-blocks", type=int, default=2, help="lazy-default: blocks pruned before it is stopped")
    ap.add_argument("--make", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)  # internal
    args = ap.parse_args(argv)
    if args.make:
        kind, where = args.make[0], Path(args.make[1])
        if kind.startswith("text:"):
            words_file(where, int(kind[5:]))
        else:
            if kind == "tiny":
                tiny_model(where)
            else:
                big_checkpoint(where, 2 if kind == "big2" else 60)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "fasp_ext", "prune", "--quiet"]
    tiny = make("tiny", work / "tiny")
    prev = Path(args.out).with_suffix(".json")
    rows = json.loads(prev.read_text()) if prev.is_file() else {}  # cases not run now keep their last row
    for case in args.cases:
        out = work / f"out-{case}"
        shutil.rmtree(out, ignore_errors=True)
        base = cli + ["--model", str(tiny), "--out", str(out)]
        extra = []
        if case == "dev-zero":
            cmd = base + ["--calib", "/dev/zero"]
        elif case == "binary":
            b = work / "binary.bin"
            with open(b, "wb") as f:
                for _ in range(512):
                    f.write(os.urandom(1 << 20))
            cmd = base + ["--calib", str(b)]
            extra.append(b)
        elif case == "fifo":
            fifo = work / "pipe.txt"
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo)
            cmd = base + ["--calib", str(make("text:200000", work / "small.txt")), "--eval", str(fifo)]
            extra.append(fifo)
        elif case in ("text-5mb", "text-5gb"):
            size = 5 * 10**6 if case == "text-5mb" else 5 * 10**9
            t = make(f"text:{size}", work / f"{case}.txt")
            cmd = base + ["--calib", str(t), "--nsamples", "128", "--seqlen", "2048"]
            extra.append(t)
        elif case in TWO_BLOCKS:
            act, batch = TWO_BLOCKS[case]
            cmd = cli + ["--model", str(make("big2", work / "big2")), "--out", str(out), "--calib",
                         str(make("text:5000000", work / "5mb.txt")), "--nsamples", "16", "--seqlen", "2048"]
            cmd += (["--activations", act] if act != "-" else []) + (["--batch-size", batch] if batch != "-" else [])
        elif case == "lazy-default":
            big = make("big", work / "big")
            cmd = cli + ["--model", str(big), "--out", str(out), "--calib", str(make("text:5000000", work / "5mb.txt"))]
        else:
            big = make("big", work / "big")
            cmd = cli + ["--model", str(big), "--out", str(out), "--calib", str(make("text:200000", work / "small.txt")),
                         "--nsamples", str(args.big_nsamples), "--seqlen", str(args.big_seqlen)]
            if case == "in-memory":
                cmd.append("--no-lazy")
        print(f"[bench_inputs] {case}: {' '.join(cmd[2:])}", flush=True)
        r = run(cmd, stop_after=(out, args.stop_after_blocks) if case == "lazy-default" else None)
        if case in ("lazy", "in-memory", "lazy-default"):
            r["checkpoint_gb"] = sum(f.stat().st_size for f in (work / "big").glob("*.safetensors")) / 2**30
            r["rss_over_size"] = r["peak_rss_gb"] / r["checkpoint_gb"]
        rows[case] = r
        print(json.dumps(r), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        for p in extra:
            p.unlink(missing_ok=True)
    shutil.rmtree(work / "big", ignore_errors=True)
    shutil.rmtree(work / "big2", ignore_errors=True)
    lines = ["# Hostile and huge inputs, block-by-block loading: peak memory (bench/bench_inputs.py)", "",
             f"`python bench/bench_inputs.py --cases CASE ...` (this time: {' '.join(args.cases)}); one run each; peak RSS of the "
             f"`fasp-ext prune` process from the kernel (rusage).", "",
             f"The `lazy` and `in-memory` cases (a random LLaMA of 4.13 GB, 60 blocks of hidden 1024, MLP 4096, fp32) "
             f"calibrate on {args.big_nsamples} x {args.big_seqlen} tokens; "
             + (f"`lazy-default` prunes the same checkpoint with every setting at its default (128 x 2048 tokens; "
                f"the hidden states on disk, 2 windows per forward on a CPU), stopped once "
                f"{args.stop_after_blocks} blocks are pruned and written; " if "lazy-default" in rows else "")
             + f"the `2blocks` "
             f"cases prune two such blocks (0.54 GB) on 16 x 2048 tokens, to show what the activations on disk "
             f"and the CPU's batch of 4096 tokens each save. Rows of cases not run keep their last values.", "",
             "| case | exit | seconds | peak RSS (GB) | note |", "| --- | --- | --- | --- | --- |"]
    for case, r in rows.items():
        note = " / ".join(r["stderr_lines"])[:160].replace("|", "\\|")
        if "rss_over_size" in r:
            note = f"checkpoint {r['checkpoint_gb']:.2f} GB, RSS {r['rss_over_size']:.2f}x its size"
            if r.get("stopped_after_blocks"):
                note += f"; default settings, stopped after {r['stopped_after_blocks']} pruned blocks"
        lines.append(f"| {case} | {r['rc']} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | {note} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
