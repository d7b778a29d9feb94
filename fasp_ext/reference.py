"""Plain-torch twins of the compiled ops.

These functions are the contract every kernel must meet (docs/how-it-works.md, "The ops") and are used
as the test oracle and as the fallback when the compiled library is absent. They validate their
arguments exactly as the compiled ops do (same messages), so behaviour does not depend on which
implementation runs.

Ops
---
accumulate_stats(X, s, H=None)                         -> None   (s, H updated in place)
score_select(W, s, k, groups=None, segments=1)         -> kept   (int64, sorted ascending)
restore(W, H, kept, damp, use_fp64=False, max_retries=4) -> (W', report)

The restoration report is a float64 CPU tensor ``[path, lambda, attempts]`` with
path 0 = Cholesky at the requested lambda, 1 = Cholesky after raising lambda,
2 = eigen-decomposition fallback, 3 = nothing to solve (k == 0 or nothing removed),
4 = skipped because H is not positive on the kept columns (mean(diag H[S, S]) <= 0, e.g. H == 0:
no calibration signal), W[:, S] returned unchanged and lambda reported as 0.
W or H holding NaN/Inf is an error (ValueError naming the tensor).

The restoration solves with min(|R|, out) right-hand sides (R = removed columns):
|R| <= out: Q = H[R, S] A^-1, W' = W[:, S] + W[:, R] Q; else B = W[:, R] H[R, S], W' = W[:, S] + B A^-1,
with A = H[S, S] + lambda I factored by Cholesky (its lower triangle is read).
"""

from __future__ import annotations

import torch

PATH_CHOLESKY = 0
PATH_CHOLESKY_RETRY = 1
PATH_EIGEN = 2
PATH_TRIVIAL = 3
PATH_SKIPPED = 4
PATH_NAMES = {
    PATH_CHOLESKY: "cholesky",
    PATH_CHOLESKY_RETRY: "cholesky+damping",
    PATH_EIGEN: "eigen",
    PATH_TRIVIAL: "trivial",
    PATH_SKIPPED: "skipped: H not positive",
}

_FLOAT_ACTS = (torch.float32, torch.float16, torch.bfloat16)


def _fail(msg: str):
    raise ValueError(msg)


# --------------------------------------------------------------------------- validation
def check_stats_args(X: torch.Tensor, s: torch.Tensor, H: torch.Tensor | None) -> int:
    if not isinstance(X, torch.Tensor) or X.dim() < 1:
        _fail("accumulate_stats: X must be a tensor with at least 1 dimension (..., m)")
    if X.dtype not in _FLOAT_ACTS:
        _fail(f"accumulate_stats: X must be float32, float16 or bfloat16, got {X.dtype}")
    m = X.shape[-1]
    if s.dtype != torch.float32 or s.dim() != 1 or s.shape[0] != m:
        _fail(f"accumulate_stats: s must be a float32 vector of length m={m}, got {s.dtype} {tuple(s.shape)}")
    if not s.is_contiguous():
        _fail("accumulate_stats: s must be contiguous")
    if s.device != X.device:
        _fail(f"accumulate_stats: s is on {s.device} but X is on {X.device}")
    if H is not None:
        if H.dtype != torch.float32 or H.dim() != 2 or tuple(H.shape) != (m, m):
            _fail(f"accumulate_stats: H must be a float32 ({m}, {m}) matrix, got {H.dtype} {tuple(H.shape)}")
        if not H.is_contiguous():
            _fail("accumulate_stats: H must be contiguous")
        if H.device != X.device:
            _fail(f"accumulate_stats: H is on {H.device} but X is on {X.device}")
    return m


def check_score_meta(W, s, k, groups, segments) -> tuple[int, int]:
    """The checks that need no data; return (number of groups G, kept per segment)."""
    if W.dim() != 2:
        _fail(f"score_select: W must be 2-D (out, m), got {W.dim()}-D")
    if W.dtype not in _FLOAT_ACTS:
        _fail(f"score_select: W must be float32, float16 or bfloat16, got {W.dtype}")
    m = W.shape[1]
    if s.dtype != torch.float32 or s.dim() != 1 or s.shape[0] != m:
        _fail(f"score_select: s must be a float32 vector of length m={m}, got {s.dtype} {tuple(s.shape)}")
    if s.device != W.device:
        _fail(f"score_select: s is on {s.device} but W is on {W.device}")
    if groups is None:
        G = m
    else:
        if groups.dtype != torch.int64 or groups.dim() != 2:
            _fail(f"score_select: groups must be an int64 (G, r) matrix, got {groups.dtype} {groups.dim()}-D")
        if groups.device != W.device:
            _fail(f"score_select: groups is on {groups.device} but W is on {W.device}")
        G = groups.shape[0]
    if segments < 1 or G % segments != 0:
        _fail(f"score_select: segments={segments} must be >= 1 and divide the number of groups {G}")
    if k < 0 or k > G:
        _fail(f"score_select: k={k} out of range [0, {G}]")
    if k % segments != 0:
        _fail(f"score_select: k={k} must be a multiple of segments={segments}")
    return G, k // segments


def check_score_args(W, s, k, groups, segments) -> tuple[int, int]:
    """All checks, the data-dependent group range included; return (G, kept per segment)."""
    G, per = check_score_meta(W, s, k, groups, segments)
    m = W.shape[1]
    if groups is not None and groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= m):
        _fail(f"score_select: groups entries must lie in [0, {m})")
    return G, per


def check_restore_meta(W, H, kept, damp, max_retries) -> int:
    """The checks that need no data (shapes, dtypes, devices, scalars); traceable by torch.compile."""
    if W.dim() != 2:
        _fail(f"restore: W must be 2-D (out, m), got {W.dim()}-D")
    if W.dtype not in _FLOAT_ACTS + (torch.float64,):
        _fail(f"restore: W must be a floating tensor, got {W.dtype}")
    m = W.shape[1]
    if H.dim() != 2 or tuple(H.shape) != (m, m):
        _fail(f"restore: H must be ({m}, {m}) to match W's columns, got {tuple(H.shape)}")
    if H.dtype not in (torch.float32, torch.float64):
        _fail(f"restore: H must be float32 or float64, got {H.dtype}")
    if kept.dtype != torch.int64 or kept.dim() != 1:
        _fail(f"restore: kept must be a 1-D int64 tensor, got {kept.dtype} {kept.dim()}-D")
    if kept.shape[0] > m:
        _fail(f"restore: kept has {kept.shape[0]} entries but W has only m={m} columns")
    for name, t in (("H", H), ("kept", kept)):
        if t.device != W.device:
            _fail(f"restore: {name} is on {t.device} but W is on {W.device}")
    if not (damp >= 0.0) or damp != damp or damp == float("inf"):
        _fail(f"restore: damp must be a finite number >= 0, got {damp}")
    if max_retries < 0:
        _fail(f"restore: max_retries must be >= 0, got {max_retries}")
    return m


def check_restore_args(W, H, kept, damp, max_retries) -> int:
    """All argument checks, the data-dependent ones included (index range, order, NaN/Inf)."""
    m = check_restore_meta(W, H, kept, damp, max_retries)
    if kept.numel():
        if int(kept.min()) < 0 or int(kept.max()) >= m:
            _fail(f"restore: kept indices must lie in [0, {m})")
        if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
            _fail("restore: kept must be strictly increasing (sorted, no duplicates)")
    if not bool(torch.isfinite(W).all()):
        _fail("restore: W contains NaN or Inf")
    if not bool(torch.isfinite(H).all()):
        _fail("restore: H contains NaN or Inf")
    return m


# --------------------------------------------------------------------------- ops
def accumulate_stats(X: torch.Tensor, s: torch.Tensor, H: torch.Tensor | None = None) -> None:
    """s += sum over tokens of x**2 and (optionally) H += X^T X, in fp32."""
    m = check_stats_args(X, s, H)
    X2 = X.reshape(-1, m).to(torch.float32)
    part = (X2 * X2).sum(0)
    if not bool(torch.isfinite(part).all()):
        _fail("accumulate_stats: X contains NaN or Inf (or values whose square overflows fp32)")
    s.add_(part)
    if H is not None:
        H.addmm_(X2.t(), X2)


def gram_lower_block(m: int) -> int:
    """Block width of the lower-triangle Gram update for m columns (csrc/fasp_math.h's twin): one
    block below 512 columns, else at most ~16 block columns of a multiple of 128 (256 at least)."""
    if m < 512:
        return max(m, 1)
    per = (m + 15) // 16
    return max((per + 127) // 128 * 128, 256)


def gram_lower_update_(H: torch.Tensor, X: torch.Tensor, block: int | None = None) -> None:
    """H's block lower triangle += X^T X for a (n, m) fp32 X, as the CUDA op
    ``accumulate_stats_lower`` computes it: for each block column [j0, j0 + w) of ``block`` columns
    (default ``gram_lower_block(m)``), ``H[j0:, j0:j0+w] += X[:, j0:]^T X[:, j0:j0+w]``. On and below
    the diagonal H then holds H + X^T X; above it only the diagonal blocks changed. ``mirror_lower_``
    makes the whole matrix from that."""
    m = X.shape[1]
    b = gram_lower_block(m) if block is None else int(block)
    if b < 1:
        _fail(f"gram_lower_update_: block must be >= 1, got {b}")
    for j0 in range(0, m, b):
        w = min(b, m - j0)
        H[j0:, j0:j0 + w].addmm_(X[:, j0:].t(), X[:, j0:j0 + w])


def mirror_lower_(H: torch.Tensor) -> torch.Tensor:
    """In place: H's strict upper triangle := its strict lower triangle transposed (H[i, j] = H[j, i]
    for i < j), so a matrix valid on and below its diagonal (``gram_lower_update_``) becomes the
    whole symmetric matrix. Returns H."""
    H.copy_(torch.tril(H) + torch.tril(H, -1).t())
    return H


def column_scores(W: torch.Tensor, s: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """score_j = sqrt(s_j) * sum_i |W[i, j]|; a group's score is the sum of its columns' scores."""
    col = torch.sqrt(s.clamp_min(0)) * W.to(torch.float32).abs().sum(0)
    if groups is None:
        return col
    return col[groups].sum(1)


def select_top(scores: torch.Tensor, k: int, segments: int = 1) -> torch.Tensor:
    """Indices of the k highest scores (k/segments per contiguous segment), sorted ascending.

    Ties go to the lower index (stable sort on descending score)."""
    G = scores.shape[0]
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    per = k // segments
    seg = scores.reshape(segments, G // segments)
    order = torch.sort(seg, dim=1, descending=True, stable=True).indices[:, :per]
    base = torch.arange(segments, device=scores.device).unsqueeze(1) * (G // segments)
    return torch.sort((order + base).reshape(-1)).values


def score_select(W, s, k: int, groups=None, segments: int = 1) -> torch.Tensor:
    check_score_args(W, s, k, groups, segments)
    if not bool(torch.isfinite(s).all()):
        _fail("score_select: s contains NaN or Inf")
    scores = column_scores(W, s, groups)
    if not bool(torch.isfinite(scores).all()):
        _fail("score_select: W contains NaN or Inf")
    return select_top(scores, k, segments)


def next_lambda(lam: float, mean_diag: float) -> float:
    """The damping of the next attempt after a failed factorisation (csrc/fasp_math.h's twin):
    ten times more, or 1e-6 * mean(diag H) after an undamped attempt."""
    return lam * 10.0 if lam > 0 else 1e-6 * mean_diag


def restore(W, H, kept, damp: float, use_fp64: bool = False, max_retries: int = 4):
    """W' = W[:, S] + W[:, R] H[R, S] (H[S, S] + lambda I)^-1, lambda = damp * mean(diag H[S, S]).

    Solved with min(|R|, out) right-hand sides (see the module docstring); same contract and
    report as the compiled kernels."""
    m = check_restore_args(W, H, kept, damp, max_retries)
    ct = torch.float64 if use_fp64 else torch.float32
    k = kept.numel()
    mask = torch.ones(m, dtype=torch.bool, device=W.device)
    mask[kept] = False
    removed = torch.nonzero(mask).flatten()
    r = removed.numel()
    Wc = W.to(ct)
    Wk = Wc[:, kept]
    Hc = H.to(ct)
    Hss = Hc[kept][:, kept]
    mean_diag = float(Hss.diagonal().mean()) if k else 0.0
    lam = damp * mean_diag
    report = lambda path, l, a: torch.tensor([path, l, a], dtype=torch.float64)  # noqa: E731
    if k == 0 or r == 0:
        return Wk.to(W.dtype).contiguous(), report(PATH_TRIVIAL, lam, 0)
    if not mean_diag > 0.0:
        return Wk.to(W.dtype).contiguous(), report(PATH_SKIPPED, 0.0, 0)
    Wr = Wc[:, removed]
    Hrs = Hc[removed][:, kept]  # H[R, S]; H is not assumed symmetric
    rhs_removed = r <= W.shape[0]
    rhs = Hrs if rhs_removed else Wr @ Hrs  # (|R| or out) x k, solved against A from the right

    def finish(X):
        return (Wk + Wr @ X) if rhs_removed else (Wk + X)

    eye = torch.eye(k, dtype=ct, device=W.device)
    attempts = 0
    for attempt in range(max_retries + 1):
        attempts += 1
        L, info = torch.linalg.cholesky_ex(Hss + lam * eye)
        if int(info) == 0:
            X = torch.cholesky_solve(rhs.t(), L).t()
            if bool(torch.isfinite(X).all()):
                path = PATH_CHOLESKY if attempt == 0 else PATH_CHOLESKY_RETRY
                return finish(X).to(W.dtype).contiguous(), report(path, lam, attempts)
        lam = next_lambda(lam, mean_diag)
    # eigen fallback: pseudo-inverse with eigenvalues below a relative floor dropped
    evals, evecs = torch.linalg.eigh(Hss + lam * eye)
    floor = evals.abs().max() * k * torch.finfo(ct).eps
    inv = torch.where(evals > floor, 1.0 / evals.clamp_min(floor), torch.zeros_like(evals))
    X = ((rhs @ evecs) * inv) @ evecs.t()
    return finish(X).to(W.dtype).contiguous(), report(PATH_EIGEN, lam, attempts + 1)
