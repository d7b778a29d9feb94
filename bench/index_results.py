"""Write bench/results/INDEX.md: every file under bench/results, the command that makes it and the
commit that last changed it.

    python bench/index_results.py            # rewrite bench/results/INDEX.md
    python bench/index_results.py --check    # exit 1 if INDEX.md does not list exactly the files there

Files are grouped by stem (``compare_smollm2.json`` / ``.md`` / ``.png`` are one comparison). The
top level holds what ``bench/run_all.sh`` and ``bench/gpu_check.sh`` make (their commands are in
``PRODUCED`` below); ``screens/`` holds the screening studies behind docs/decisions.md. A screen's
``fasp-ext compare`` results record their settings, from which the command is rebuilt (run it at the
commit named: a bare ``fasp`` means the default of that commit); the study pages
(``*_screen.md``, ``damping_study.md``) carry their own commands and name their files. The commit is
``git log --follow --diff-filter=AM -1 -- FILE``: the last commit that changed the file's content
(a move into ``screens/`` does not count), so the code that made it is that commit or its parent;
files that record their own ``git_commit`` (the timings) say it as well.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
INDEX = RESULTS / "INDEX.md"

Q = "python bench/quiet.py -- "
_SMOL = ("--calib austen:emma --eval austen:prideprejudice jargon --nsamples 128 --seqlen 512 "
         "--eval-windows 32 --out bench/results")
#: stem -> (what it is, the command that makes it); the commands of bench/run_all.sh and gpu_check.sh
PRODUCED = {
    "ops_cpu": ("the three ops against their reference and plain-torch baselines (docs/results.md: Ops)",
                Q + "python bench/bench_ops.py --sizes smollm2,opt125m --repeats 9 --merge; "
                + Q + "python bench/bench_ops.py --sizes llama7b --repeats 5 --merge"),
    "gram_cpu": ("the Gram update against the fp32 GEMM, blocked GEMMs (the earlier AMD EPYC)",
                 Q + "python bench/bench_gram.py"),
    "gram_backends_cpu": ("MKL's SYRK against the blocked GEMMs", Q + "python bench/bench_gram_backends.py"),
    "scaling_cpu": ("--lazy on synthetic checkpoints, 1x2 and 2x1 processes x threads (docs/memory.md)",
                    Q + "python bench/bench_scaling.py"),
    "e2e_cpu": ("pruning time against one dense forward, 128 x 512 (docs/results.md: Pruning time)",
                Q + "python bench/bench_e2e.py --models smollm2 --nsamples 128 --repeats 2 "
                "--variant allocation_replan,allocation_samples=4"),
    "e2e_cpu_32": ("pruning time against one dense forward, 32 x 512",
                   Q + "python bench/bench_e2e.py --models smollm2 --nsamples 32 --repeats 3 "
                   "--variant allocation_replan,allocation_samples=4 --stem e2e_cpu_32"),
    "inference_cpu": ("prefill/decode speed of the reloaded pruned SmolLM2 (docs/results.md: Inference)",
                      Q + "python bench/bench_inference.py"),
    "compare_smollm2": ("SmolLM2 quality, the baselines and FASP at 10/20/30 % (docs/results.md)",
                        "python -m fasp_ext compare --model smollm2 --quiet --methods magnitude wanda-sp "
                        "flap:allocation=uniform flap depth2 fasp:allocation=uniform fasp --sparsities 0.1 0.2 0.3 "
                        + _SMOL + " --stem compare_smollm2"),
    "options30_screen_smollm2": ("the stronger options at 30 %, small calibration (docs/results.md: Options)",
                                 "the second compare of bench/run_all.sh (--nsamples 32 --eval-windows 16 "
                                 "--stem options30_screen_smollm2)"),
    "options30_smollm2": ("the promising options at 30 %, full calibration",
                          "the third compare of bench/run_all.sh (--stem options30_smollm2)"),
    "compare_gemma3": ("Gemma3-270M quality, the baselines and FASP at 10/20/30 %, and the 20 % screen rows",
                       "python -m fasp_ext compare --model gemma3-270m --quiet --bos auto --methods wanda-sp flap "
                       "fasp:allocation=uniform fasp --sparsities 0.1 0.2 0.3 --calib austen:emma --eval "
                       "austen:prideprejudice jargon --nsamples 32 --seqlen 512 --eval-windows 16 --out bench/results "
                       "--stem compare_gemma3; then bench/compare_rows.py ... compare_gemma3_screen.json (run_all.sh)"),
    "screen20_smollm2": ("SmolLM2 settings screened at 20 % (docs/decisions.md)",
                         "python bench/compare_rows.py bench/results/compare_smollm2.json "
                         "bench/results/screen20_smollm2.json fasp:allocation_samples=16 fasp:one_pass "
                         "fasp:max_block_sparsity=0.25 --sparsities 0.2"),
    "magnitude_diagnosis": ("why magnitude pruning destroys SmolLM2", "python bench/magnitude_diagnosis.py"),
    "gram_precision_screen": ("tf32 and bf16 against fp32 Gram inputs, both real models at 20/30 % (docs/gpu.md)",
                              "its own page names the commands (the gram_precision_* compares)"),
    "gram_precision_smollm2": ("the screen's SmolLM2 rows, 20 and 30 %", "see gram_precision_screen.md"),
    "gram_precision_gemma3": ("the screen's Gemma3-270M rows at 20 %", "see gram_precision_screen.md"),
    "gram_precision_gemma3_30": ("the screen's Gemma3-270M rows at 30 %", "see gram_precision_screen.md"),
    "attn_unit_screen": ("value channels against whole kv-head groups (--attn-unit head), both real models at "
                         "20/30 % (docs/decisions.md)", "its own page names the commands (the attn_unit_* compares)"),
    "attn_unit_smollm2": ("the attention-unit screen's SmolLM2 rows, 20 and 30 %", "see attn_unit_screen.md"),
    "attn_unit_gemma3": ("the attention-unit screen's Gemma3-270M rows, 20 and 30 %", "see attn_unit_screen.md"),
    "gram_precision_tf32_smollm2": ("the screen's SmolLM2 tf32 rows, 20 and 30 %", "see gram_precision_screen.md"),
    "gram_precision_tf32_gemma3": ("the screen's Gemma3-270M tf32 rows, 20 and 30 % (bench/compare_rows.py)",
                                   "see gram_precision_screen.md"),
    "llamacpp_cpu": ("SmolLM2 in llama.cpp: prefill and decode tokens/s of the dense and pruned GGUF exports "
                     "(f16, q8_0, --attn-unit head), measured against the ideal memory-bound speed-up (issue 26)",
                     "python bench/bench_llamacpp.py --rounds 7 --prompt 256 --gen 128 --threads 2 --head 0.2 "
                     "(a venv with llama-cpp-python)"),
    "mlp_multiple_smollm2": ("what MLP widths in multiples of 32 (q8_0 GGUF) cost SmolLM2 at 20 % (docs/serving.md)",
                             "the fasp-ext compare command in docs/serving.md (fasp:mlp_multiple=32)"),
    "e2e_cpu_ab": ("CPU pruning time before and after the GPU-path changes, A/B on SmolLM2 (issue 28)",
                   "python bench/bench_e2e.py --models smollm2 --nsamples 32 --repeats 1, alternating 80cd33f and ffdd694"),
    "inputs_cpu": ("peak memory of hostile and huge inputs (/dev/zero, a binary file, a FIFO, a 5 GB text) "
                   "and of block-by-block pruning of a 4 GB checkpoint (docs/memory.md)",
                   "python bench/bench_inputs.py --cases lazy dev-zero binary fifo text-5mb text-5gb"),
    "ops_cuda": ("the ops on a GPU", "bash bench/gpu_check.sh (python bench/bench_ops.py --device cuda)"),
    "e2e_cuda": ("pruning time on a GPU, SmolLM2's shapes at 128 x 512", "bash bench/gpu_check.sh"),
    "e2e_cuda_2048": ("pruning time on a GPU, OPT-125M's shape at 128 x 2048", "bash bench/gpu_check.sh"),
    "gpu_check_cuda": ("the GPU check: each step, pass/fail, seconds", "bash bench/gpu_check.sh"),
    "restore_profile_cuda": ("the CUDA restore under torch.profiler", "bash bench/gpu_check.sh "
                             "(python bench/profile_restore.py --device cuda)"),
}
#: pieces merged into a whole file and then removed (git keeps them): stem -> the commit that last held them
REMOVED_PIECES = {
    "compare_gemma3": ("compare_gemma3_part_a..h.json", "1c99f86"),
    "options30_screen_smollm2": ("options30_screen_part_a..e.json", "1c99f86"),
}


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit_of(path: Path) -> str:
    return git("log", "--follow", "--diff-filter=AM", "--format=%h", "-1", "--", str(path.relative_to(ROOT)))


def files() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*") if p.is_file() and p != INDEX)


def stem_of(p: Path) -> str:
    rel = p.relative_to(RESULTS)
    return rel.parent.as_posix() if rel.parent.name == "gpu_check_logs" else rel.with_suffix("").as_posix()


def expand(text: str) -> set[str]:
    """File names a page mentions, with shell braces expanded (``alloc12_{gemma3,smollm2}.json``)."""
    names = set()
    for m in re.finditer(r"[\w.{},*-]+\.(?:json|md|png)", text):
        tok = m.group(0)
        b = re.search(r"\{([^}]*)\}", tok)
        if b:
            names.update(tok[:b.start()] + alt + tok[b.end():] for alt in b.group(1).split(","))
        else:
            names.add(tok)
    return names


def compare_command(d: dict, stem: str) -> str | None:
    """The ``fasp-ext compare`` command of a compare result, from the settings it records."""
    methods = [r["method"] for r in d["rows"] if r["method"] != "dense"]
    if not methods or any(" " in m for m in methods):
        return None
    methods = list(dict.fromkeys(methods))
    sparsities = sorted({round(r["sparsity"], 6) for r in d["rows"] if r["method"] != "dense"})
    ew = d.get("eval_windows")
    ew = sorted(set(ew.values()))[0] if isinstance(ew, dict) and len(set(ew.values())) == 1 else ew
    cmd = (f"python -m fasp_ext compare --model {d['model']} --methods {' '.join(methods)} --sparsities "
           f"{' '.join(f'{s:g}' for s in sparsities)} --calib {d['calib']} --eval {' '.join(d['evals'])} "
           f"--nsamples {d['nsamples']} --seqlen {d['seqlen']} --seed {d['seed']}")
    if isinstance(ew, int):
        cmd += f" --eval-windows {ew}"
    if d.get("bos"):
        cmd += f" --bos {d['bos']}"
    parent = Path(stem).parent.as_posix()
    return cmd + f" --out bench/results{'' if parent == '.' else '/' + parent} --stem {Path(stem).name}"


def build() -> str:
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in files():
        groups[stem_of(p)].append(p)
    pages = {p: p.read_text(errors="replace") for p in (RESULTS / "screens").glob("*.md")}
    named_by: dict[str, list[str]] = defaultdict(list)
    screen_names = [p.name for p in (RESULTS / "screens").iterdir()]
    for page, text in pages.items():
        for pattern in expand(text):
            for n in fnmatch.filter(screen_names, pattern):
                if n != page.name:
                    named_by[n].append(page.name)
    merged_into: dict[str, list[str]] = defaultdict(list)
    for p in RESULTS.glob("*.json"):
        try:
            for src in json.loads(p.read_text()).get("merged_from", []):
                merged_into[Path(src).name].append(p.name)
        except (ValueError, AttributeError):
            pass
    lines = ["# bench/results", "",
             "Written by `python bench/index_results.py` (tests/test_bench_results.py checks it lists every file).",
             "The top level is what `bash bench/run_all.sh` (CPU) and `bash bench/gpu_check.sh` (GPU) make;",
             "`screens/` holds the screening studies behind docs/decisions.md. *Commit*: the last commit that",
             "changed the file (the code that made it is that commit or its parent; run a command at that",
             "commit to get the same numbers, since defaults have moved since: a bare `fasp` means the default",
             "of that commit). Timing files also record the commit they ran at (`git_commit`).", ""]
    for title, top in (("Made by bench/run_all.sh and bench/gpu_check.sh", True), ("screens/", False)):
        lines += [f"## {title}", "", "| files | what | command | commit |", "|---|---|---|---|"]
        for stem in sorted(s for s in groups if (not s.startswith("screens/")) == top):
            ps = groups[stem]
            exts = ",".join(sorted({p.suffix.lstrip(".") for p in ps}))
            label = f"`{stem}/` ({len(ps)} logs)" if stem.endswith("gpu_check_logs") else f"`{stem}.{{{exts}}}`" \
                if "," in exts else f"`{stem}.{exts}`"
            commits = sorted({c for c in (commit_of(p) for p in ps) if c})
            data = next((p for p in ps if p.suffix == ".json"), None)
            d = {}
            if data is not None:
                try:
                    d = json.loads(data.read_text())
                except ValueError:
                    d = {}
            recorded = (d.get("info") or d.get("machine") or d.get("meta") or {}) if isinstance(d, dict) else {}
            run_at = recorded.get("git_commit", "") if isinstance(recorded, dict) else ""
            name = Path(stem).name
            base = name.replace("gpu_check_logs", "gpu_check_cuda")
            if top:
                what, cmd = PRODUCED.get(base, ("", ""))
                if base == "gpu_check_cuda" and name == "gpu_check_logs":
                    what = "the GPU check's logs, one per step"
            else:
                pages_naming = sorted({pg for p in ps for pg in named_by.get(p.name, [])})
                if data is None:
                    what = "study page"
                elif pages_naming:
                    what = "rows of " + ", ".join(f"`screens/{pg}`" for pg in pages_naming)
                else:
                    into = merged_into.get(name + ".json", [])
                    what = ("a comparison merged into " + ", ".join(f"`{m}`" for m in into)) if into else \
                        "a comparison (no study page names it)"
                cmd = compare_command(d, stem) if isinstance(d, dict) and "rows" in d and "model" in d else None
                if cmd is None:
                    cmd = "the commands in the page itself" if data is None else \
                        "see the study page" if pages_naming else "see the JSON"
            if isinstance(d, dict) and d.get("merged_from"):
                cmd = (cmd + "; " if cmd else "") + "merged: `python bench/merge_compare.py " + name + " " + \
                    " ".join(d["merged_from"]) + "`" + (" (the parts: in screens/, or the removed pieces below)"
                                                       if base in REMOVED_PIECES else " (the parts are in screens/)")
            if isinstance(d, dict) and recorded.get("command"):
                cmd = recorded["command"] if not cmd else cmd
            if base in REMOVED_PIECES and top:
                pieces, at = REMOVED_PIECES[base]
                cmd += f"; its pieces {pieces} were removed once merged (`git show {at}:bench/results/<piece>`)"
            commit = ", ".join(commits) + (f" (ran at {run_at[:7]})" if run_at else "")
            cell = (cmd or "").replace("|", "\\|")
            lines.append(f"| {label} | {what} | {cell} | {commit} |")
        lines.append("")
    return "\n".join(lines)


def listed(text: str) -> set[str]:
    """The stems INDEX.md lists."""
    return set(re.findall(r"^\| `([^`]+?)(?:\.\{?[a-z,]+\}?|/)` ", text, re.M))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that INDEX.md lists every file")
    a = ap.parse_args()
    if a.check:
        want = {stem_of(p) for p in files()}
        have = listed(INDEX.read_text()) if INDEX.is_file() else set()
        if want != have:
            print(f"INDEX.md is stale: missing {sorted(want - have)}, extra {sorted(have - want)}", file=sys.stderr)
            return 1
        return 0
    text = build()
    tmp = INDEX.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(INDEX)
    print("wrote", INDEX)
    return 0


if __name__ == "__main__":
    sys.exit(main())
