"""One small adapter per model family; ``adapter_for(model)`` picks it from config.model_type."""

from __future__ import annotations

import json
import os

from .base import Adapter
from .llama import Gemma2Adapter, Gemma3Adapter, Gemma3TextAdapter, LlamaAdapter
from .opt import OPTAdapter
from .phi3 import Phi3Adapter

ADAPTERS: list[type[Adapter]] = [LlamaAdapter, Gemma2Adapter, Gemma3TextAdapter, Gemma3Adapter, OPTAdapter,
                                 Phi3Adapter]


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def _unsupported(mt) -> ValueError:
    return ValueError(f"model: unsupported architecture {mt!r}; fasp_ext supports "
                      f"{', '.join(supported_model_types())}")


def adapter_for(model_or_config) -> Adapter:
    config = getattr(model_or_config, "config", model_or_config)
    mt = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if mt in cls.model_types:
            return cls()
    raise _unsupported(mt)


def check_supported_config(config) -> str:
    """Refuse an unsupported family before any weight is read; return its model type.

    ``config``: a dict (the parsed config.json), a path to config.json or to a model folder holding
    one, or a transformers config. Raises ValueError (unsupported architecture, or a config.json
    without ``model_type``) or FileNotFoundError (no config.json there).
    """
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model: no config.json at {path}")
        with open(path, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"model: {path} is not valid JSON ({e})") from None
    mt = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if not mt:
        raise ValueError("model: config.json has no 'model_type'; cannot tell the architecture")
    adapter_for({"model_type": mt})
    return mt


__all__ = ["Adapter", "adapter_for", "check_supported_config", "supported_model_types", "LlamaAdapter",
           "Gemma2Adapter", "Gemma3TextAdapter", "OPTAdapter", "Phi3Adapter"]
