"""Typed wrappers over the compiled ``torch.ops.fasp_ext`` ops, with the plain-torch fallback.

Every function here checks what needs no data (shapes, dtypes, devices, scalars) with a clear
message naming the argument, then calls the compiled kernel for the tensor's device when the
extension was built with one; the kernel checks the values (index ranges, NaN/Inf) in the same pass
that reads them. Without a compiled kernel the reference implementation (``fasp_ext.reference``)
runs, wrapped as the custom ops ``torch.ops.fasp_ext_ref.*``. Either way a wrapper is one opaque op
call, so it traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from . import _fake
from . import reference as ref
from ._loader import compiled_ops_for

# --------------------------------------------------------------------------- fallback custom ops
_REF_LIB = torch.library.Library("fasp_ext_ref", "DEF")  # must live as long as the module
_REF_LIB.define("accumulate_stats(Tensor X, Tensor(a!) s, Tensor(b!)? H) -> ()")
_REF_LIB.define("score_select(Tensor W, Tensor s, int k, Tensor? groups, int segments) -> Tensor")
_REF_LIB.define(
    "restore(Tensor W, Tensor H, Tensor kept, float damp, bool use_fp64, int max_retries) -> (Tensor, Tensor)")
_REF_LIB.impl("accumulate_stats", ref.accumulate_stats, "CompositeExplicitAutograd")
_REF_LIB.impl("score_select", ref.score_select, "CompositeExplicitAutograd")
_REF_LIB.impl("restore", ref.restore, "CompositeExplicitAutograd")
_fake.register("fasp_ext_ref")
_REF_OPS = torch.ops.fasp_ext_ref


def _ops_for(device: torch.device, op: str):
    ops = compiled_ops_for(device, op)
    return _REF_OPS if ops is None else ops


class RestoreReport:
    """What the restoration solve did.

    ``path``: ``cholesky``, ``cholesky+damping`` (lambda raised), ``eigen`` (fallback), ``trivial``
    (nothing to solve: no kept or no removed column) or ``skipped: H not positive`` (mean diagonal of
    H[S, S] <= 0, i.e. no calibration signal; W[:, S] returned unchanged). ``lam``: the damping
    used; ``attempts``: factorisations tried. Built from the op's report tensor (``tensor``) and read
    lazily, so the wrapper involves no host synchronisation and traces under torch.compile.
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    @staticmethod
    def from_tensor(t: torch.Tensor) -> "RestoreReport":
        return RestoreReport(t)

    def _values(self):
        return self.tensor.detach().to("cpu", torch.float64).tolist()

    @property
    def path(self) -> str:
        return ref.PATH_NAMES[int(self._values()[0])]

    @property
    def lam(self) -> float:
        return float(self._values()[1])

    @property
    def attempts(self) -> int:
        return int(self._values()[2])

    @property
    def skipped(self) -> bool:
        """True when the solve was skipped because H is not positive on the kept columns."""
        return int(self._values()[0]) == ref.PATH_SKIPPED

    def __eq__(self, other):
        if not isinstance(other, RestoreReport):
            return NotImplemented
        return self._values() == other._values()

    def __repr__(self) -> str:
        return f"RestoreReport(path={self.path!r}, lam={self.lam!r}, attempts={self.attempts})"


#: Host waits each op's CUDA kernel (and its plain-torch fallback on a GPU) makes per call, the
#: same count the kernels declare line by line (``// HOST_SYNC: <name>``, listed in the table in
#: csrc/cuda/common.cuh; tests/test_sync_budget.py checks both and counts these per call during a
#: prune). ``accumulate_stats`` raises on NaN/Inf, so it reads its flag back; the pipeline calls
#: ``accumulate_stats_deferred`` on a GPU instead, whose flag stays on the device until the
#: statistics are used (``Stats.reduce``). ``restore``: one read of its checks with the first
#: factorisation's status (one more per retry). The plain-torch fallbacks (``fasp_ext_ref``, on a
#: GPU without the compiled library) read more, as fasp_ext/reference.py is written.
HOST_SYNCS = {
    "fasp_ext::accumulate_stats": 1,
    "fasp_ext::accumulate_stats_deferred": 0,
    "fasp_ext::accumulate_stats_lower": 0,
    "fasp_ext::score_select": 1,
    "fasp_ext::restore": 1,
    "fasp_ext_ref::accumulate_stats": 1,
    "fasp_ext_ref::score_select": 2,
    "fasp_ext_ref::restore": 9,
}

#: the message of a batch with NaN/Inf (the ops' own, reference.accumulate_stats)
NONFINITE_X = "accumulate_stats: X contains NaN or Inf (or values whose square overflows fp32)"


def defers(device) -> bool:
    """Whether work on ``device`` is queued behind the host (a GPU): the pipeline then keeps its
    checks and counters on the device and reads them back once, where they are used, instead of per
    batch. (tests/test_sync_budget.py turns this on for CPU runs to count what a GPU run waits for.)"""
    return torch.device(device).type == "cuda"


def accumulate_stats(X: torch.Tensor, s: torch.Tensor, H: torch.Tensor | None = None,
                     bad: torch.Tensor | None = None, lower: bool = False) -> None:
    """In place: ``s += sum_tokens x**2`` and, if ``H`` is given, ``H += X^T X`` (fp32 accumulation).

    X: (..., m) float32/float16/bfloat16. s: (m,) float32. H: (m, m) float32 or None.
    NaN/Inf in X raise ValueError, or, with ``bad`` (an int32 tensor of one element on X's device),
    set ``bad`` to nonzero instead, with no host synchronisation: the caller checks it once
    (``raise_if_bad``) before using s or H, which are then not to be trusted.

    ``lower`` (with ``bad`` only): only H's lower triangle is guaranteed to receive X^T X (the block
    lower triangle, about half the flops: ``reference.gram_lower_update_``, the CUDA op
    ``accumulate_stats_lower``); above the diagonal H is left unspecified until the caller runs
    ``mirror_lower_(H)`` once, after the last batch, before anything reads H.
    """
    ref.check_stats_args(X, s, H)
    if lower and bad is None:
        raise ValueError("accumulate_stats: lower=True needs the deferred flag bad (the GPU path)")
    if bad is None:
        _ops_for(X.device, "accumulate_stats").accumulate_stats(X, s, H)
        return
    if bad.dtype != torch.int32 or bad.numel() != 1 or bad.device != X.device:
        raise ValueError(f"accumulate_stats: bad must be an int32 tensor of one element on {X.device}, "
                         f"got {bad.dtype} {tuple(bad.shape)} on {bad.device}")
    lower = lower and H is not None
    kernel = _deferred_kernel(X.device, "accumulate_stats_lower" if lower else "accumulate_stats_deferred")
    if kernel is not None:
        kernel(X, s, H, bad)
        return
    m = X.shape[-1]  # plain torch, the reference's arithmetic with the flag kept on the device
    X2 = X.reshape(-1, m).to(torch.float32)
    part = (X2 * X2).sum(0)
    bad.bitwise_or_(torch.isfinite(part).all().logical_not().to(torch.int32))
    s.add_(part)
    if H is not None:
        if lower:  # the CUDA op's blocked algorithm, so the CPU runs of the GPU path test it
            ref.gram_lower_update_(H, X2)
        else:
            H.addmm_(X2.t(), X2)


def mirror_lower_(H: torch.Tensor) -> torch.Tensor:
    """In place: H's upper triangle from its lower one (``H[i, j] = H[j, i]`` for i < j), after the
    Gram updates with ``lower=True``. The one place that happens in a prune: ``Stats.reduce``.
    Returns H (no host synchronisation)."""
    return ref.mirror_lower_(H)


_DEFERRED: dict[tuple[str, str], object] = {}


def _deferred_kernel(device: torch.device, op: str = "accumulate_stats_deferred"):
    """The compiled ``op`` kernel (``accumulate_stats_deferred`` or ``accumulate_stats_lower``,
    declared by CUDA builds only) for ``device``, or None."""
    key = (device.type, op)
    if key not in _DEFERRED:
        kernel = None
        if compiled_ops_for(device, "accumulate_stats") is not None:
            try:
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"fasp_ext::{op}", device.type.upper()):
                    kernel = getattr(torch.ops.fasp_ext, op)
            except Exception:  # pragma: no cover - a build without the op
                kernel = None
        _DEFERRED[key] = kernel
    return _DEFERRED[key]


def raise_if_bad(bad: torch.Tensor | None) -> None:
    """Raise ``accumulate_stats``'s ValueError if ``bad`` (see there) was set: one host read."""
    if bad is not None and int(bad) != 0:
        raise ValueError(NONFINITE_X)


def cpu_gram_backend() -> str:
    """How ``accumulate_stats`` updates H on the CPU in this process: ``"mkl-syrk"`` (MKL's SYRK
    from torch's own library, half a GEMM's flops), ``"blocked-gemm"`` (block lower triangle by GEMMs:
    no MKL, or ``FASP_EXT_SYRK=0`` in the environment) or ``"reference"`` (no compiled library)."""
    ops = compiled_ops_for(torch.device("cpu"), "accumulate_stats")
    if ops is None or not hasattr(ops, "cpu_gram_backend"):
        return "reference"
    return str(ops.cpu_gram_backend())


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
    ref.check_score_meta(W, s, k, groups, segments)
    return _ops_for(W.device, "score_select").score_select(W, s, k, groups, segments)


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
    NaN/Inf in W or H, and kept indices out of range or not strictly increasing, raise ValueError.
    """
    ref.check_restore_meta(W, H, kept, damp, max_retries)
    out, rep = _ops_for(W.device, "restore").restore(W, H, kept, float(damp), bool(use_fp64), int(max_retries))
    return out, RestoreReport(rep)
