"""fasp_ext: fast structured pruning of LLMs by FASP (arXiv 2501.09412).

The numeric core is a compiled op library (``torch.ops.fasp_ext``, wrappers in ``fasp_ext.ops``);
``prune`` walks a model block by block; ``save_pruned`` / ``load_pruned`` write and rebuild it.
Heavy imports (transformers) happen only when the pipeline is used.
"""

from ._loader import build_info
from .ops import RestoreReport, accumulate_stats, restore, score_select

__version__ = "0.1.0"


def prune(model, calibration, config=None):
    """Prune ``model`` in place on calibration tokens; see :func:`fasp_ext.pipeline.prune`."""
    from .pipeline import prune as _prune

    return _prune(model, calibration, config)


def __getattr__(name):
    if name == "PruneConfig":
        from .pipeline import PruneConfig

        return PruneConfig
    if name in ("save_pruned", "load_pruned"):
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module 'fasp_ext' has no attribute {name!r}")


__all__ = ["accumulate_stats", "score_select", "restore", "RestoreReport", "build_info", "prune",
           "PruneConfig", "save_pruned", "load_pruned"]
