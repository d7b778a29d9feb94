"""fasp_ext: fast structured pruning of LLMs by FASP (arXiv 2501.09412).

The numeric core is a compiled op library (``torch.ops.fasp_ext``, wrappers in ``fasp_ext.ops``);
``prune`` walks a model block by block; ``save_pruned`` / ``load_pruned`` write and rebuild it.

The quickstart needs nothing else (README "## Python")::

    model, tokenizer = fasp_ext.load_model("smollm2")        # the embedded SmolLM2-135M-Instruct
    calib = fasp_ext.calibration_windows(tokenizer, fasp_ext.load_text("austen:emma"), 32, 256)
    report = fasp_ext.prune(model, calib, fasp_ext.PruneConfig(sparsity=0.2))

Heavy imports (transformers) happen only when the pipeline or a model is used.
"""

from ._loader import build_info
from .ops import RestoreReport, accumulate_stats, restore, score_select

__version__ = "0.1.0"

#: top-level name -> (submodule, attribute), imported on first use
_LAZY = {
    "PruneConfig": ("pipeline", "PruneConfig"),
    "PruneReport": ("pipeline", "PruneReport"),
    "save_pruned": ("io", "save_pruned"),
    "load_pruned": ("io", "load_pruned"),
    # the embedded models and the texts / windows / perplexity of the quickstart
    "load_model": ("models", "load_model"),
    "MODEL_ALIASES": ("models", "MODEL_ALIASES"),
    "load_text": ("data", "load_text"),
    "calibration_windows": ("data", "calibration_windows"),
    "eval_windows": ("data", "eval_windows"),
    "perplexity": ("data", "perplexity"),
    "write_model_card": ("card", "write_model_card"),
    "export_gguf": ("export_gguf", "export_gguf"),
}


def prune(model, calibration, config=None):
    """Prune ``model`` in place on calibration tokens; see :func:`fasp_ext.pipeline.prune`."""
    from .pipeline import prune as _prune

    return _prune(model, calibration, config)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'fasp_ext' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["accumulate_stats", "score_select", "restore", "RestoreReport", "build_info", "prune",
           *_LAZY]
