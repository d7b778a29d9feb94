"""Saving pruned models atomically and rebuilding their architecture on load."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .adapters import adapter_for


def save_pruned(model, out_dir: str | os.PathLike, tokenizer=None, report: dict | None = None,
                overwrite: bool = False) -> Path:
    """Write ``model`` (safetensors + config), ``tokenizer`` and ``report.json`` to ``out_dir``.

    Everything is written to a temporary folder next to ``out_dir`` and renamed at the end, so a
    failure leaves nothing half-written.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"out: {out} already exists (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / "fasp_report.json").write_text(json.dumps(report, indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a model saved by fasp_ext, rebuilding per-block sizes (value head size, MLP width).

    Models whose config has no ``fasp_ext`` section are ordinary checkpoints and load with
    ``AutoModelForCausalLM.from_pretrained``.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"path: no config.json in {p}")
    config = AutoConfig.from_pretrained(p)
    meta = getattr(config, "fasp_ext", None)
    if not meta:
        return AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device)
    adapter = adapter_for(config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    blocks = adapter.blocks(model)
    if len(meta["v_head_dim"]) != len(blocks) or len(meta["mlp_width"]) != len(blocks):
        raise ValueError(f"path: {p} config.fasp_ext lists sizes for a different number of blocks")
    for block, dv, w in zip(blocks, meta["v_head_dim"], meta["mlp_width"]):
        adapter.resize_block(block, config, int(dv), int(w))
    for name in meta.get("added_bias", []):  # biases fitted by the pruning (intercept, FLAP)
        lin = model.get_submodule(name)
        lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype))
    state = {}
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"path: no .safetensors weights in {p}")
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied and not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"path: weights do not match the recorded architecture "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def load_model_and_tokenizer(spec: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """(model, tokenizer) for a fasp_ext output folder (rebuilt by load_pruned) or any model spec
    that :func:`fasp_ext.models.load_model` accepts (a local folder, 'smollm2')."""
    p = Path(spec).expanduser()
    cfg_file = p / "config.json"
    if cfg_file.is_file() and "fasp_ext" in json.loads(cfg_file.read_text()):
        from transformers import AutoTokenizer

        return load_pruned(p, dtype=dtype, device=device), AutoTokenizer.from_pretrained(p)
    from . import models

    return models.load_model(spec, dtype=dtype, device=device)
