"""fasp_ext: fast structured pruning of LLMs by FASP (arXiv 2501.09412)."""

from ._loader import build_info
from .ops import RestoreReport, accumulate_stats, restore, score_select

__all__ = ["accumulate_stats", "score_select", "restore", "RestoreReport", "build_info"]
__version__ = "0.1.0"
