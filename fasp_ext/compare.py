"""Rank pruning methods side by side on the same model, calibration data and evaluation texts.

A method spec is ``name`` or ``name:key=value,key=value``, where ``name`` is a registered method
(fasp_ext/methods.py: the built-in ones, or one registered with ``register_method``) and keys are
PruneConfig fields, e.g.
``fasp``, ``fasp:damp=auto``, ``fasp:intercept=true``, ``wanda-sp``, ``magnitude``, ``fasp:one_pass=true``,
``fasp:allocation=uniform`` (FASP as the paper runs it: every block pruned alike), ``fasp:selection=spap``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from .pipeline import PruneConfig, count_params, prune


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_method(spec: str, base: PruneConfig) -> PruneConfig:
    """PruneConfig for ``name[:key=value,...]`` on top of ``base``."""
    name, _, opts = spec.partition(":")
    cfg = dataclasses.replace(base, method=name.strip())
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise ValueError(f"methods: unknown option {key!r} in {spec!r}; options are PruneConfig fields")
        setattr(cfg, key, _parse_value(val) if eq else True)
    cfg.validate()
    return cfg


def compare(model_spec: str, methods: list[str], sparsities: list[float], calib: str, evals: list[str],
            nsamples: int = 128, seqlen: int = 512, eval_windows: int | None = None, seed: int = 0,
            device: str | None = None, base: PruneConfig | None = None, progress: bool = True,
            log=print, on_row=None, bos: str = "auto") -> dict:
    """Prune a fresh copy of the model once per (method, sparsity); measure perplexity on each text.
    ``on_row(result so far)`` is called after every row (e.g. to save partial results). ``bos``:
    whether calibration and evaluation windows start with BOS (``data.bos_token``)."""
    from . import data, models

    base = base or PruneConfig(progress=progress, seed=seed)
    configs = [(m, parse_method(m, base)) for m in methods]  # fail on a bad spec before any work
    for s in sparsities:
        PruneConfig(sparsity=s).validate()
    data.bos_token(None, bos)  # a bad value fails before the model is loaded
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    calib_text = data.load_text(calib, split="calib", max_chars=data.calibration_char_budget(nsamples, seqlen))
    eval_texts = {e: data.load_text(e, max_chars=data.eval_char_budget(seqlen, eval_windows)) for e in evals}
    model, tok = models.load_model(model_spec, device="cpu")  # the checkpoint's own dtype
    tokens = data.calibration_windows(tok, calib_text, nsamples, seqlen, seed, bos=bos)
    windows = {e: data.eval_windows(tok, t, seqlen, eval_windows, bos=bos) for e, t in eval_texts.items()}
    del calib_text, eval_texts
    rows = []
    dense = {"method": "dense", "sparsity": 0.0, "params": count_params(model), "prune_seconds": 0.0,
             **attention_sizes(model)}
    for e, w in windows.items():
        dense[e] = data.perplexity(model.to(device), w, device=device, progress=progress)
    model.to("cpu")
    rows.append(dense)
    log(_row_text(dense, evals))

    def result() -> dict:
        return {"model": model_spec, "calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                "device": device, "evals": evals, "bos": bos,
                "eval_windows": {e: int(w.shape[0]) for e, w in windows.items()}, "rows": rows}

    del model
    for s in sparsities:
        for name, cfg in configs:
            m, _ = models.load_model(model_spec, device="cpu")
            cfg = dataclasses.replace(cfg, sparsity=s, device=device, progress=progress)
            t = time.perf_counter()
            rep = prune(m, tokens, cfg)
            row = {"method": name, "sparsity": s, "params": rep.params_after,
                   "prune_seconds": time.perf_counter() - t, "allocation": rep.allocation,
                   "allocation_windows": rep.allocation_windows,
                   "token_weighting": rep.token_weighting, **attention_sizes(m)}
            for e, w in windows.items():
                row[e] = data.perplexity(m.to(device), w, device=device, progress=progress)
            rows.append(row)
            log(_row_text(row, evals))
            if on_row is not None:
                on_row(result())
            del m
    return result()


def attention_sizes(model) -> dict:
    """The attention's size in ``model``: its projections' parameters (q, k, v, o with biases), the
    KV-cache entries one token adds over all blocks (keys and values), and the kv heads per block."""
    from .adapters import adapter_for

    adapter = adapter_for(model)
    lm = adapter.lm_config(model.config)
    hd = adapter.head_geometry(lm)[2]
    params, cache, kv_heads = 0, 0, []
    for b in adapter.blocks(model):
        a = adapter.attention(b)
        lins = {id(m): m for m in a.modules() if isinstance(m, torch.nn.Linear)}.values()
        params += sum(p.numel() for m in lins for p in m.parameters(recurse=False))
        _, kv = adapter.block_heads(b, lm)
        kv_heads.append(kv)
        cache += kv * hd + adapter.value_pair(b)[0].out_features
    return {"attn_params": int(params), "kv_cache_per_token": int(cache), "kv_heads": kv_heads}


def _row_text(r: dict, evals) -> str:
    ppl = "  ".join(f"{e}={r[e]:.2f}" for e in evals)
    return f"{r['method']:<28} {r['sparsity']:>4.0%}  {ppl}  params={r['params']:,}  time={r['prune_seconds']:.1f}s"


def to_markdown(result: dict) -> str:
    evals = result["evals"]
    sizes = any("attn_params" in r for r in result["rows"])  # rows from before these were recorded: "-"
    head = "| method | allocation | sparsity | " + " | ".join(f"ppl {e}" for e in evals) + " | params | " + \
        ("attn params | KV cache / token | " if sizes else "") + "prune s |"
    lines = [head, "|" + "---|" * (len(evals) + 5 + 2 * sizes)]
    for r in result["rows"]:
        extra = ""
        if sizes:
            extra = f" | {r['attn_params']:,} | {r['kv_cache_per_token']:,}" if "attn_params" in r else " | - | -"
        lines.append(f"| {r['method']} | {r.get('allocation', '-')} | {r['sparsity']:.0%} | "
                     + " | ".join(f"{r[e]:.2f}" for e in evals)
                     + f" | {r['params']:,}{extra} | {r['prune_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = result["evals"]
    fig, axes = plt.subplots(1, len(evals), figsize=(5 * len(evals), 4), squeeze=False)
    dense = next(r for r in result["rows"] if r["method"] == "dense")
    methods = list(dict.fromkeys(r["method"] for r in result["rows"] if r["method"] != "dense"))
    for ax, e in zip(axes[0], evals):
        for i, m in enumerate(methods):  # past the colour cycle's 10 colours, another line style
            rs = sorted((r for r in result["rows"] if r["method"] == m), key=lambda r: r["sparsity"])
            ax.plot([0] + [r["sparsity"] for r in rs], [dense[e]] + [r[e] for r in rs], marker="o", label=m,
                    linestyle=("-", "--", ":", "-.")[(i // 10) % 4])
        ax.set_title(f"perplexity on {e}")
        ax.set_xlabel("sparsity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['model']}: calibration {result['calib']} ({result['nsamples']} x {result['seqlen']})")
    fig.tight_layout()
    # beside the plots, so a long list of methods hides no curve
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write(result: dict, out_dir: str | Path, stem: str = "compare", with_plot: bool = True) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"] + ([out / f"{stem}.png"] if with_plot else [])
    for path, text in zip(paths, (json.dumps(result, indent=2), to_markdown(result))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)  # never a half-written results file
    if with_plot:
        plot(result, paths[2])
    return paths
