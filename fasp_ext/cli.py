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


def _add_prune_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    if not demo:
        p.add_argument("--model", required=True,
                       help="local model folder, or 'smollm2' / 'gemma3-270m' for the embedded models")
        p.add_argument("--calib", required=True,
                       help="calibration text: .txt file(s)/folder, austen:<book>, jargon, or wikitext2/c4/ptb")
        p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--sparsity", type=float, default=0.2, help="fraction of each structure removed (default 0.2)")
    p.add_argument("--mlp-sparsity", type=float, default=None, help="override the MLP sparsity")
    p.add_argument("--attn-sparsity", type=float, default=None, help="override the value-channel sparsity")
    p.add_argument("--mlp-only", action="store_true", help="prune MLP neurons only")
    p.add_argument("--method", default="fasp", help="fasp (default), wanda-sp, flap, depth2, magnitude, random")
    p.add_argument("--selection", default="score", choices=["score", "obs", "spap"],
                   help="fasp: choose removed units by score (default), by greedy least-squares cost (obs), or by "
                        "SPAP-style alternating re-selection and re-fit under a growing penalty (spap)")
    p.add_argument("--allocation", default=None, choices=["uniform", "error", "flap", "flap-am"],
                   help="per-block sparsity: uniform, by restored-error curves, FLAP's ranking across blocks (flap) "
                        "or across blocks and modules with a parameter budget (flap-am) (default: the method's own; "
                        "flap for fasp and flap, uniform for the others)")
    p.add_argument("--target", default="pruned", choices=["pruned", "dense"],
                   help="restore toward the pruned model's own outputs (default) or the dense model's")
    p.add_argument("--max-block-sparsity", type=float, default=None,
                   help="with non-uniform allocation, the most any block loses (default: 1.5x sparsity, <= 0.9)")
    p.add_argument("--damp", default=None,
                   help="ridge damping of the restoration (default 0.1), or 'auto' (chosen per matrix on held-out samples)")
    p.add_argument("--intercept", action="store_true", help="also fit a bias shift where the projection has a bias")
    p.add_argument("--one-pass", action="store_true",
                   help="statistics from the dense model only (faster, usually less accurate)")
    p.add_argument("--mlp-multiple", type=int, default=8, help="round kept MLP widths to this multiple")
    p.add_argument("--attn-multiple", type=int, default=1, help="round kept value head sizes to this multiple")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048 if not demo else 512, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", nargs="*", default=None, help="texts to measure perplexity on before and after")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate at most this many windows per text")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_bos_arg(p)


def _add_bos_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bos", default="auto", choices=["auto", "always", "never"],
                   help="start every calibration and perplexity window with BOS: auto (when the tokenizer adds "
                        "one, e.g. Gemma; default), always, never (plain slices of the token stream)")


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
    tokens = data.calibration_windows(tok, calib_text, args.nsamples, args.seqlen, args.seed, bos=args.bos)
    eval_sets = {e: data.eval_windows(tok, data.load_text(e), args.seqlen, args.eval_windows, bos=args.bos)
                 for e in evals}
    result = {"model": model_spec, "calib": calib, "device": device, "dtype": args.dtype, "bos": args.bos,
              "nsamples": args.nsamples, "seqlen": args.seqlen, "load_seconds": t_load}
    ppl_before = {}
    for name, win in eval_sets.items():
        ppl_before[name] = data.perplexity(model.to(device), win, device=device, progress=not args.quiet)
        model.to("cpu")
    dense_params = count_params(model)
    t1 = time.perf_counter()
    report = prune(model, tokens, cfg)
    t_prune = time.perf_counter() - t1
    ppl_after = {}
    for name, win in eval_sets.items():
        ppl_after[name] = data.perplexity(model.to(device), win, device=device, progress=not args.quiet)
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
    print_summary(r)
    print(f"  saved to {args.out}")
    return 0


def cmd_demo(args) -> int:
    evals = args.eval if args.eval is not None else ["austen:prideprejudice", "jargon"]
    if args.eval_windows is None:
        args.eval_windows = 32
    r = run_prune(args, args.model, "austen:emma", args.out, evals)
    print_summary(r)
    print(f"  saved to {args.out}; reload with fasp_ext.load_pruned({str(args.out)!r})")
    return 0


def cmd_eval(args) -> int:
    import torch

    from . import data
    from .io import load_model_and_tokenizer

    _check_positive("seqlen", args.seqlen)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model_and_tokenizer(args.model, dtype=_dtype(args.dtype), device=device)
    res = {}
    for spec in args.data:
        win = data.eval_windows(tok, data.load_text(spec), args.seqlen, args.eval_windows, bos=args.bos)
        res[spec] = data.perplexity(model, win, device=device, progress=not args.quiet)
        print(f"perplexity on {spec} ({win.shape[0]} x {args.seqlen} tokens): {res[spec]:.3f}")
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
    ap = argparse.ArgumentParser(prog="fasp-ext", description="Fast structured pruning of LLMs (FASP).")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prune", help="prune a model and save it")
    _add_prune_args(p)
    p.set_defaults(func=cmd_prune)
    d = sub.add_parser("demo", help="prune an embedded model (SmolLM2-135M by default) at 20%% on Austen text")
    _add_prune_args(d, demo=True)
    d.add_argument("--out", default="fasp_demo_out", help="output folder (default fasp_demo_out)")
    d.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3-270m"],
                   help="embedded model to prune (default smollm2)")
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser("compare", help="rank methods x sparsities by perplexity, time and size")
    c.add_argument("--model", default="smollm2")
    c.add_argument("--methods", nargs="+", default=["magnitude", "wanda-sp", "flap", "depth2", "fasp"],
                   help="method specs: name or name:key=value,... (PruneConfig fields)")
    c.add_argument("--sparsities", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    c.add_argument("--calib", default="austen:emma")
    c.add_argument("--eval", nargs="+", default=["austen:prideprejudice", "jargon"])
    c.add_argument("--nsamples", type=int, default=128)
    c.add_argument("--seqlen", type=int, default=512)
    c.add_argument("--eval-windows", type=int, default=64)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--damp", default=None, help="damping for every method (number or 'auto')")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default=None)
    c.add_argument("--out", default="bench/results", help="folder for compare.json/.md/.png")
    c.add_argument("--stem", default="compare", help="file name stem of the results")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compare)
    e = sub.add_parser("eval", help="perplexity of a (pruned) model on texts")
    e.add_argument("--model", required=True)
    e.add_argument("--data", nargs="+", required=True)
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--eval-windows", type=int, default=None)
    e.add_argument("--device", default=None)
    e.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.add_argument("--quiet", action="store_true")
    _add_bos_arg(e)
    e.set_defaults(func=cmd_eval)
    return ap


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
