"""Error-aware selection: greedy removal by exact least-squares cost (Optimal Brain Surgeon, structured),
and SPAP-style alternating minimisation with a penalty (``penalty_select``, at the end).

FASP's default selection ranks units by a score (activation norm x column weight mass) that sees
each unit alone. Two correlated units can both score high although one of them is redundant once
the other is kept and the weights are restored. ``obs_select`` removes units greedily by the exact
increase of the restored calibration error,

    cost(U) = tr( W[:, U] (Hinv[U, U])^-1 W[:, U]^T ),   Hinv = (H + lam I)^-1,

and after each removal applies the Optimal Brain Surgeon update to W and Hinv, so the next cost is
computed with the surviving units already re-fitted (docs/how-it-works.md, "Restoration": the same damped
objective the restoration solves). Removed columns become exact zeros of W and of Hinv.

The running sum of the chunk costs is the restored error at every kept count, which makes the
greedy run also the error curve ``err(k)`` that non-uniform allocation needs (fasp_ext/allocation.py).
"""

from __future__ import annotations

import torch


def _segment_quota(G: int, k: int, segments: int) -> tuple[torch.Tensor, int]:
    if G % segments or k % segments:
        raise ValueError(f"obs_select: {G} units and k={k} must both divide into {segments} segments")
    per = G // segments
    return torch.arange(G) // per, per - k // segments


def _check_units(name: str, W: torch.Tensor, H: torch.Tensor, k: int, groups, segments: int):
    """Validate the arguments shared by the selections; return (units (G, r) int64, segment of each unit)."""
    if W.dim() != 2 or H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] != W.shape[1]:
        raise ValueError(f"{name}: W (out, m) and H (m, m) do not match: {tuple(W.shape)}, {tuple(H.shape)}")
    m = W.shape[1]
    units = (torch.arange(m, device=W.device).view(m, 1) if groups is None else groups.to(W.device)).long()
    G = units.shape[0]
    if not 0 <= k <= G:
        raise ValueError(f"{name}: k must be in [0, {G}], got {k}")
    seg_of, quota = _segment_quota(G, k, segments)
    return units, seg_of.to(W.device), quota


def removal_costs(W: torch.Tensor, Hinv: torch.Tensor, units: torch.Tensor, columns: bool) -> torch.Tensor:
    """Per unit U (a row of ``units``), ``tr(W_U (Hinv_UU)^-1 W_U^T)``: the exact increase of the quadratic
    ``tr((W' - W) M (W' - W)^T)`` at its minimum W' = W when unit U is forced to zero and the other
    columns re-fit, with Hinv = M^-1 (Optimal Brain Surgeon). ``columns``: every unit is one column."""
    if columns:  # no gather needed
        return W.pow(2).sum(0) / Hinv.diagonal().clamp_min(1e-300)
    r = units.shape[1]
    Wu = W[:, units]                                                      # (out, G, r)
    Hu = Hinv[units.unsqueeze(2), units.unsqueeze(1)]                     # (G, r, r)
    Hu = Hu + 1e-12 * torch.eye(r, dtype=Hu.dtype, device=Hu.device)
    return torch.einsum("ogi,gij,ogj->g", Wu, torch.linalg.inv(Hu), Wu)


@torch.no_grad()
def obs_select(W: torch.Tensor, H: torch.Tensor, k: int, groups: torch.Tensor | None = None,
               segments: int = 1, damp: float = 0.1, chunk: int | None = None,
               return_curve: bool = False):
    """Kept unit indices (ascending, int64) after greedily removing ``G - k`` units of ``W`` (out, m).

    ``groups`` (G, r): unit g is the columns ``groups[g]`` (None: unit g is column g). With
    ``segments`` > 1 the units form that many equal contiguous segments and each keeps k/segments.
    ``damp`` is relative to mean(diag H), as in the restoration. ``chunk`` units are removed per
    OBS update (None: about 64 updates in all; 1 is the exact one-at-a-time greedy).
    With ``return_curve``, also returns ``(kept_counts, errors)``: the restored (damped) error
    tr(dW (H + lam I) dW^T) after each update, starting with (G, 0).
    """
    units, seg_of, quota = _check_units("obs_select", W, H, k, groups, segments)
    m, dev, G = W.shape[1], W.device, units.shape[0]
    left = torch.full((segments,), quota, dtype=torch.long, device=dev)
    Wd = W.detach().double().clone()
    Hd = H.detach().double()
    lam = float(damp) * float(Hd.diagonal().mean().clamp_min(1e-30))
    Hd = Hd + lam * torch.eye(m, dtype=torch.float64, device=dev)
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:  # not positive definite even after damping: fall back to a pseudo-inverse
        Hinv = torch.linalg.pinv(Hd, hermitian=True)
    else:
        Hinv = torch.cholesky_inverse(L)
    alive = torch.ones(G, dtype=torch.bool, device=dev)
    n_remove = G - k
    if chunk is None:
        chunk = max(1, -(-n_remove // 64))
    curve_k, curve_e, err = [G], [0.0], 0.0
    removed = 0
    while removed < n_remove:
        cost = removal_costs(Wd, Hinv, units, groups is None)
        eligible = alive & (left[seg_of] > 0)
        cost = torch.where(eligible, cost, torch.full_like(cost, float("inf")))
        order = torch.argsort(cost, stable=True)
        take, used = [], torch.zeros_like(left)
        for u in order.tolist():
            if len(take) >= min(chunk, n_remove - removed) or not bool(eligible[u]):
                break
            sgm = int(seg_of[u])
            if used[sgm] < left[sgm]:
                take.append(u)
                used[sgm] += 1
        take_t = torch.tensor(take, dtype=torch.long, device=dev)
        cols = units[take_t].reshape(-1)
        Hcc = Hinv[cols][:, cols]
        Hcc_inv = torch.linalg.pinv(Hcc, hermitian=True)
        Wc = Wd[:, cols]
        err += float((Wc @ Hcc_inv * Wc).sum())
        # OBS update: the surviving columns absorb the removed ones; removed rows/cols become 0
        Wd -= Wc @ Hcc_inv @ Hinv[cols]
        Hinv -= Hinv[:, cols] @ Hcc_inv @ Hinv[cols]
        Wd[:, cols] = 0.0
        Hinv[cols] = 0.0
        Hinv[:, cols] = 0.0
        alive[take_t] = False
        left -= used
        removed += len(take)
        curve_k.append(G - removed)
        curve_e.append(err)
    kept = torch.nonzero(alive).flatten()
    if return_curve:
        return kept, (curve_k, curve_e)
    return kept


@torch.no_grad()
def score_order_curve(W: torch.Tensor, s: torch.Tensor, H: torch.Tensor, groups: torch.Tensor | None = None,
                      segments: int = 1, damp: float = 0.1, upto: int | None = None) -> torch.Tensor:
    """Restored (damped) error after removing the n lowest-scoring units, for every n at once.

    Units are removed in the order the default selection drops them (``score_select``: the lowest
    ``sqrt(s) * sum |W|`` first, one rank of every segment at a time, ties leaving the higher index
    first), so at every n that is a multiple of ``segments`` the removed set is exactly the
    complement of ``score_select(W, s, G - n, groups, segments)``. Returns ``e`` (G + 1,) float64 with
    ``e[n] = min tr((W' - W) Hd (W' - W)^T)`` over W' zero on the n removed units, Hd = H + lam I,
    lam = ``damp`` * mean(diag H) (docs/how-it-works.md, "Restoration"; raised as ``restore`` does where H + lam I is
    singular, e.g. ``damp`` 0 with fewer tokens than inputs).

    One Cholesky instead of a greedy run: with the columns ordered kept-longest first, Hd = L L^T
    and R the last r columns, the minimum is ``tr(W_R L_RR L_RR^T W_R^T)`` (the Schur complement of
    the kept block is L_RR L_RR^T), and the last r rows of ``L^T W^T`` are exactly ``L_RR^T W_R^T``;
    so e[n] is a suffix sum of the squared row norms of one triangular product.

    ``upto``: only e[0..upto] (upto + 1 values). The last q units' rows of ``L^T W^T`` involve only
    the trailing q-unit block of L (L^T is upper triangular), so the product shrinks to that block.
    """
    from ._lapack import cholesky_upper_
    from .reference import column_scores, next_lambda

    units, _, _ = _check_units("score_order_curve", W, H, 0, groups, segments)
    G, r = units.shape
    per = G // segments
    score = column_scores(W, s.to(W.device), units).view(segments, per)
    keep_rank = torch.sort(score, dim=1, descending=True, stable=True).indices  # kept-longest first
    base = torch.arange(segments, device=W.device).view(-1, 1) * per
    order = (keep_rank + base).t().reshape(-1)  # rank-major: the last entries leave first
    cols = units[order].reshape(-1)
    mean_diag = float(H.detach().diagonal().double().mean().clamp_min(1e-30))
    lam = float(damp) * mean_diag
    for _ in range(5):  # singular H (fewer tokens than inputs) with damp 0: damp more, as restore does
        U = H.detach().index_select(0, cols).index_select(1, cols).double()  # H permuted, in fp64
        U.diagonal().add_(lam)
        info = cholesky_upper_(U)  # in place: U's upper triangle becomes L^T
        if info == 0:
            break
        lam = next_lambda(lam, mean_diag)
    if info != 0:
        raise RuntimeError("score_order_curve: H + damping is not positive definite (NaN or Inf in H?)")
    q = G if upto is None else max(0, min(G, int(upto)))      # units that may leave
    c = q * r                                                    # their columns, last in the order
    Uq = U[U.shape[0] - c:, U.shape[0] - c:].triu()              # trailing block of L^T
    Y = Uq @ W.detach()[:, cols[cols.numel() - c:]].double().t()  # the last c rows of L^T W^T
    per_unit = Y.pow(2).sum(1).view(q, r).sum(1)                 # in kept-longest-first order
    removed = torch.cumsum(torch.flip(per_unit, (0,)), 0)        # removed[n - 1]: the last n units
    return torch.cat([torch.zeros(1, dtype=torch.float64, device=W.device), removed])


def _keep_top(cost: torch.Tensor, k: int, segments: int) -> torch.Tensor:
    """The k highest-cost units (k/segments per contiguous segment), ascending; ties go to the lower index."""
    G = cost.shape[0]
    per = G // segments
    order = torch.argsort(-cost.view(segments, per), dim=1, stable=True)[:, : k // segments]
    kept = (order + torch.arange(segments, device=cost.device).view(-1, 1) * per).reshape(-1)
    return torch.sort(kept).values


@torch.no_grad()
def penalty_select(W: torch.Tensor, H: torch.Tensor, k: int, groups: torch.Tensor | None = None,
                   segments: int = 1, damp: float = 0.1, rounds: int = 5, start: torch.Tensor | None = None,
                   rho: tuple[float, ...] | None = None, return_history: bool = False):
    """Kept unit indices (ascending, int64) by SPAP-style alternating minimisation with a penalty.

    The mixed-integer problem ``min tr((W' - W) Hd (W' - W)^T)``, Hd = H + lam I (docs/how-it-works.md,
    "Restoration": the damped objective the restoration solves), over W' whose columns outside k kept units are zero,
    is relaxed: the removed units R are penalised instead of zeroed, and two steps alternate for
    ``rounds`` rounds under a growing penalty rho_t (relative to mean(diag H); default 0.1 .. 10):

    - weights: ``W' = argmin tr((W' - W) Hd (W' - W)^T) + rho_t sum_{c in R} ||W'[:, c]||^2``
      ``= W Hd M^-1`` with M = Hd + rho_t P_R (P_R: diagonal indicator of R's columns), so the kept
      units absorb what the penalised ones can no longer carry;
    - kept set: the k units whose forced removal would raise that penalised objective most (the exact
      Optimal Brain Surgeon cost ``tr(W'_U (M^-1_UU)^-1 W'_U^T)``, k/segments per segment), so a unit
      whose work the others can take over leaves the kept set, and a penalised unit that still
      carries what nobody else can comes back.

    ``start``: the first kept set (ascending unit indices; None: the k units of highest
    ``sum_c ||W[:, c]||^2 Hd_cc``). The caller restores the final kept set exactly (``ops.restore``).
    With ``return_history``, also returns the kept set after every round.
    """
    if rounds < 1:
        raise ValueError(f"penalty_select: rounds must be >= 1, got {rounds}")
    units, _, _ = _check_units("penalty_select", W, H, k, groups, segments)
    m, dev, G = W.shape[1], W.device, units.shape[0]
    if k == G:
        return torch.arange(G, device=dev)
    Wd = W.detach().double()
    Hd = H.detach().double()
    scale = float(Hd.diagonal().mean().clamp_min(1e-30))
    Hd = Hd + float(damp) * scale * torch.eye(m, dtype=torch.float64, device=dev)
    if rho is None:
        rho = tuple(10.0 ** (-1.0 + 2.0 * t / max(rounds - 1, 1)) for t in range(rounds))
    if start is None:
        start = _keep_top((Wd.pow(2).sum(0) * Hd.diagonal())[units].sum(1), k, segments)
    kept = start.to(dev)
    rhs = (Wd @ Hd).t()  # (m, out): M W'^T = Hd W^T
    history = []
    for r in rho[:rounds]:
        removed = torch.ones(G, dtype=torch.bool, device=dev)
        removed[kept] = False
        M = Hd.clone()
        cols = units[removed].reshape(-1)
        M[cols, cols] += r * scale
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) == 0:
            Minv = torch.cholesky_inverse(L)
        else:  # M is positive definite once damped; only a damp of 0 on a singular H lands here
            Minv = torch.linalg.pinv(M, hermitian=True)
        Wp = (Minv @ rhs).t()
        kept = _keep_top(removal_costs(Wp, Minv, units, groups is None), k, segments)
        history.append(kept)
    if return_history:
        return kept, history
    return kept
