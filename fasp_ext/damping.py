"""Choosing the restoration's ridge damping per matrix from held-out calibration tokens.

The restoration is fitted on part of the calibration windows (Gram ``H_fit``) and each candidate
lambda is judged by the output error it leaves on the rest (Gram ``H_val``):

    err(lam) = tr(D H_val D^T),  D = W - pad_S(W'(lam)),
    W'(lam)  = W[:, S] + W[:, R] H_fit[R, S] (H_fit[S, S] + lam I)^-1.

One eigendecomposition of ``H_fit[S, S]`` serves every lambda. The chosen value is returned as a
damp (lambda relative to the mean diagonal of ``H_fit[S, S]``), to be applied to the full Gram.
"""

from __future__ import annotations

import torch

DEFAULT_GRID = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


@torch.no_grad()
def choose_damp(W: torch.Tensor, H_fit: torch.Tensor, H_val: torch.Tensor, kept: torch.Tensor,
                grid=DEFAULT_GRID) -> tuple[float, dict[float, float]]:
    """Return (best damp, {damp: held-out error}); ``inf`` marks 'no restoration' (damp -> infinity)."""
    m = W.shape[1]
    dt = torch.float64
    mask = torch.ones(m, dtype=torch.bool, device=W.device)
    mask[kept] = False
    removed = torch.nonzero(mask).flatten()
    Wf = W.to(dt)
    WS, WR = Wf[:, kept], Wf[:, removed]
    Hf = H_fit.to(dt)
    Hv = H_val.to(dt)
    A = Hf[kept][:, kept]
    md = float(A.diagonal().mean())
    base = float(torch.einsum("ij,jk,ik->", WR, Hv[removed][:, removed], WR))  # error with C = 0
    errors: dict[float, float] = {float("inf"): base}
    if md <= 0 or removed.numel() == 0 or kept.numel() == 0:
        return float(grid[0]), errors
    d, Q = torch.linalg.eigh(A)
    P = (WR @ Hf[removed][:, kept]) @ Q  # B Q
    M = Q.t() @ Hv[kept][:, kept] @ Q  # Q^T Hv_SS Q
    N = (WR @ Hv[removed][:, kept]) @ Q  # W_R Hv_RS Q
    best, best_err = float(grid[0]), float("inf")
    for damp in grid:
        E = P / (d + damp * md)  # C = E Q^T
        # D[:, S] = -C, D[:, R] = W_R: err = base - 2 tr(C Hv_SR W_R^T) + tr(C Hv_SS C^T)
        err = base - 2.0 * float((E * N).sum()) + float(((E @ M) * E).sum())
        errors[float(damp)] = err
        if err < best_err:
            best, best_err = float(damp), err
    return best, errors
