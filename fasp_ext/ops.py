"""Typed wrappers over the compiled ``torch.ops.fasp_ext`` ops, with the plain-torch fallback.

Every function here validates its arguments with a clear message naming the argument, then calls
the compiled kernel for the tensor's device when the extension was built with one, and the
reference implementation (``fasp_ext.reference``) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference as ref
from ._loader import compiled_ops_for


@dataclass(frozen=True)
class RestoreReport:
    """What the restoration solve did: ``path`` is one of cholesky, cholesky+damping, eigen, trivial."""

    path: str
    lam: float
    attempts: int

    @staticmethod
    def from_tensor(t: torch.Tensor) -> "RestoreReport":
        v = t.detach().to("cpu", torch.float64).tolist()
        return RestoreReport(ref.PATH_NAMES[int(v[0])], float(v[1]), int(v[2]))


def accumulate_stats(X: torch.Tensor, s: torch.Tensor, H: torch.Tensor | None = None) -> None:
    """In place: ``s += sum_tokens x**2`` and, if ``H`` is given, ``H += X^T X`` (fp32 accumulation).

    X: (..., m) float32/float16/bfloat16. s: (m,) float32. H: (m, m) float32 or None.
    """
    ref.check_stats_args(X, s, H)
    ops = compiled_ops_for(X.device, "accumulate_stats")
    if ops is None:
        return ref.accumulate_stats(X, s, H)
    ops.accumulate_stats(X, s, H)


def score_select(
    W: torch.Tensor,
    s: torch.Tensor,
    k: int,
    groups: torch.Tensor | None = None,
    segments: int = 1,
) -> torch.Tensor:
    """Kept indices (int64, ascending) of the k best-scoring columns (or column groups) of W.

    score_j = sqrt(s_j) * sum_i |W[i, j]|. ``groups`` (G, r) int64 scores the r columns listed in
    each row as one unit (their scores summed) and makes the result index groups. ``segments``
    splits the G units into that many contiguous equal segments and keeps k/segments in each.
    Ties go to the lower index.
    """
    ref.check_score_args(W, s, k, groups, segments)
    ops = compiled_ops_for(W.device, "score_select")
    if ops is None:
        return ref.score_select(W, s, k, groups, segments)
    return ops.score_select(W, s, k, groups, segments)


def restore(
    W: torch.Tensor,
    H: torch.Tensor,
    kept: torch.Tensor,
    damp: float = 0.01,
    use_fp64: bool = False,
    max_retries: int = 4,
) -> tuple[torch.Tensor, RestoreReport]:
    """Least-squares restoration of W after keeping only columns ``kept``.

    Returns ``W' = W[:, S] + W[:, ~S] H[~S, S] (H[S, S] + lam I)^-1`` with
    ``lam = damp * mean(diag H[S, S])`` in W's dtype, and a :class:`RestoreReport`.
    """
    ref.check_restore_args(W, H, kept, damp, max_retries)
    ops = compiled_ops_for(W.device, "restore")
    if ops is None:
        out, rep = ref.restore(W, H, kept, damp, use_fp64, max_retries)
    else:
        out, rep = ops.restore(W, H, kept, float(damp), bool(use_fp64), int(max_retries))
    return out, RestoreReport.from_tensor(rep)
