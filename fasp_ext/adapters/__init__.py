"""One small adapter per model family; ``adapter_for(model)`` picks it from config.model_type."""

from __future__ import annotations

from .base import Adapter
from .llama import LlamaAdapter
from .opt import OPTAdapter

ADAPTERS: list[type[Adapter]] = [LlamaAdapter, OPTAdapter]


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_or_config) -> Adapter:
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if mt in cls.model_types:
            return cls()
    raise ValueError(
        f"model: unsupported architecture {mt!r}; fasp_ext supports {', '.join(supported_model_types())}"
    )


__all__ = ["Adapter", "adapter_for", "supported_model_types", "LlamaAdapter", "OPTAdapter"]
