"""Error-aware (OBS) selection against a brute-force greedy on the damped least-squares objective."""

from __future__ import annotations

import pytest
import torch

from fasp_ext import reference
from fasp_ext.selection import obs_select


def _problem(out=5, m=12, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, m, generator=g, dtype=torch.float64) @ torch.randn(m, m, generator=g, dtype=torch.float64)
    W = torch.randn(out, m, generator=g, dtype=torch.float64)
    return W, X.T @ X


def _error(W, Hd, cols):
    """tr(W Hd W^T) - tr(W Hd[:, S] Hd[S, S]^-1 Hd[S, :] W^T): the damped restored error."""
    full = (W @ Hd * W).sum()
    if len(cols) == 0:
        return float(full)
    B = W @ Hd[:, cols]
    return float(full - (B @ torch.linalg.solve(Hd[cols][:, cols], B.T)).trace())


def _brute_greedy(W, H, k, groups, segments, damp):
    m = W.shape[1]
    Hd = H + damp * H.diagonal().mean() * torch.eye(m, dtype=H.dtype)
    units = torch.arange(m).view(m, 1) if groups is None else groups
    G = units.shape[0]
    per = G // segments
    alive = list(range(G))
    quota = {s: per - k // segments for s in range(segments)}
    while len(alive) > k:
        best, best_e = None, None
        for u in alive:
            if quota[u // per] == 0:
                continue
            rest = [v for v in alive if v != u]
            cols = units[rest].reshape(-1).sort().values if rest else torch.empty(0, dtype=torch.long)
            e = _error(W, Hd, cols)
            if best_e is None or e < best_e - 1e-12:
                best, best_e = u, e
        alive.remove(best)
        quota[best // per] -= 1
    return torch.tensor(sorted(alive)), Hd


@pytest.mark.parametrize("k", [0, 3, 7, 11, 12])
@pytest.mark.parametrize("damp", [0.0, 0.1])
def test_one_at_a_time_equals_brute_force_greedy(k, damp):
    W, H = _problem()
    kept, (ks, errs) = obs_select(W.float(), H.float(), k, damp=damp, chunk=1, return_curve=True)
    ref, Hd = _brute_greedy(W, H, k, None, 1, damp)
    assert torch.equal(kept, ref)
    # the curve's last point is the exact restored error of the kept set
    assert ks[-1] == k
    assert errs[-1] == pytest.approx(_error(W, Hd, ref), rel=1e-3, abs=1e-3)
    assert all(b >= a - 1e-9 for a, b in zip(errs, errs[1:]))


def test_groups_and_segments_equal_brute_force():
    # 2 segments (kv heads) x 3 channels, each unit = 2 columns (query heads sharing the kv head)
    W, H = _problem(out=4, m=12, seed=3)
    groups = torch.arange(12).view(2, 2, 3).permute(0, 2, 1).reshape(6, 2)
    kept = obs_select(W.float(), H.float(), 2, groups=groups, segments=2, damp=0.05, chunk=1)
    ref, _ = _brute_greedy(W, H, 2, groups, 2, 0.05)
    assert torch.equal(kept, ref)
    assert (kept < 3).sum() == 1 and (kept >= 3).sum() == 1


def test_redundant_twin_is_removed_where_the_score_keeps_both():
    # columns 0 and 1 carry the same strong signal: after restoration one of them is free to drop,
    # but each scores high on its own
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g)
    X[:, 1] = X[:, 0] + 1e-3 * torch.randn(200, generator=g)
    X[:, 0] *= 5
    X[:, 1] *= 5
    W = torch.randn(4, 6, generator=g)
    H = X.T @ X
    s = (X * X).sum(0)
    by_score = reference.score_select(W, s, 5)
    by_obs = obs_select(W, H, 5, damp=1e-4)
    assert 0 in by_score.tolist() and 1 in by_score.tolist()
    assert not (0 in by_obs.tolist() and 1 in by_obs.tolist())

    def err(kept):
        Wn, _ = reference.restore(W, H, kept, 1e-4)
        D = W.clone()
        D[:, kept] -= Wn
        return float((D @ H * D).sum())

    assert err(by_obs) < 0.1 * err(by_score)


def test_chunked_is_close_to_exact():
    W, H = _problem(out=8, m=40, n=200, seed=5)
    _, (_, e1) = obs_select(W.float(), H.float(), 20, chunk=1, return_curve=True)
    _, (_, e4) = obs_select(W.float(), H.float(), 20, chunk=4, return_curve=True)
    assert e4[-1] <= 1.5 * e1[-1] + 1e-6


def test_bad_arguments():
    W, H = _problem()
    with pytest.raises(ValueError, match="k must be"):
        obs_select(W, H, 13)
    with pytest.raises(ValueError, match="do not match"):
        obs_select(W, H[:5, :5], 3)
    with pytest.raises(ValueError, match="segments"):
        obs_select(W, H, 3, segments=5)


# ----------------------------------------------------------------------------- SPAP-style penalty selection
from fasp_ext.selection import penalty_select  # noqa: E402


def _restored_error(W, H, kept, damp=1e-4):
    Wn, _ = reference.restore(W, H, kept, damp)
    D = W.clone()
    D[:, kept] -= Wn
    return float((D @ H * D).sum())


def test_penalty_select_on_uncorrelated_inputs_keeps_the_top_diagonal_costs():
    # with a diagonal H no column can take over another's work: the kept set is the top-k of
    # ||W[:, c]||^2 (H_cc + lam), whatever the penalty does
    g = torch.Generator().manual_seed(2)
    W = torch.randn(5, 16, generator=g, dtype=torch.float64)
    H = torch.diag(torch.rand(16, generator=g, dtype=torch.float64) * 4 + 0.1)
    lam = 0.1 * float(H.diagonal().mean())
    cost = W.pow(2).sum(0) * (H.diagonal() + lam)
    ref = torch.sort(torch.topk(cost, 10).indices).values
    kept, hist = penalty_select(W, H, 10, damp=0.1, rounds=4, return_history=True)
    assert torch.equal(kept, ref) and len(hist) == 4
    assert all(torch.equal(h, ref) for h in hist)


def test_penalty_select_drops_a_redundant_twin_the_score_keeps():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g)
    X[:, 1] = X[:, 0] + 1e-3 * torch.randn(200, generator=g)
    X[:, :2] *= 5
    W = torch.randn(4, 6, generator=g)
    H = X.T @ X
    by_score = reference.score_select(W, (X * X).sum(0), 5)
    assert {0, 1} <= set(by_score.tolist())
    by_pen = penalty_select(W, H, 5, damp=1e-4, start=by_score)
    assert not {0, 1} <= set(by_pen.tolist())
    assert _restored_error(W, H, by_pen) < 0.1 * _restored_error(W, H, by_score)


def test_penalty_select_groups_segments_and_no_worse_than_its_start():
    W, H = _problem(out=6, m=24, n=60, seed=4)
    groups = torch.arange(24).view(2, 2, 6).permute(0, 2, 1).reshape(12, 2)  # 2 kv heads x 6 channels x 2
    start = torch.tensor([0, 1, 2, 6, 7, 8])
    kept = penalty_select(W.float(), H.float(), 6, groups=groups, segments=2, damp=0.05, start=start)
    assert kept.dtype == torch.int64 and torch.equal(kept, torch.sort(kept).values)
    assert (kept < 6).sum() == 3 and (kept >= 6).sum() == 3

    def err(units):
        return _restored_error(W, H, torch.sort(groups[units].reshape(-1)).values, damp=0.05)

    assert err(kept) <= err(start) + 1e-9
    assert torch.equal(penalty_select(W, H, 12, groups=groups, segments=2), torch.arange(12))


def test_penalty_select_bad_arguments():
    W, H = _problem()
    with pytest.raises(ValueError, match="k must be"):
        penalty_select(W, H, 13)
    with pytest.raises(ValueError, match="rounds must be"):
        penalty_select(W, H, 3, rounds=0)
    with pytest.raises(ValueError, match="segments"):
        penalty_select(W, H, 3, segments=5)


# ----------------------------------------------------------------------------- score-order error curve
from fasp_ext.selection import score_order_curve  # noqa: E402


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("damp", [0.0, 0.1])
def test_score_order_curve_is_the_restored_error_of_score_select(grouped, damp):
    # every point of the curve is the exact damped restored error (a direct solve) of the set
    # score_select keeps at that count, per segment where units come in segments
    W, H = _problem(out=4, m=12, n=60, seed=7)
    s = H.diagonal().clone()
    groups, segments = (torch.arange(12).view(2, 2, 3).permute(0, 2, 1).reshape(6, 2), 2) if grouped else (None, 1)
    G = 6 if grouped else 12
    units = torch.arange(12).view(12, 1) if groups is None else groups
    curve = score_order_curve(W, s, H, groups, segments, damp=damp)
    assert curve.shape == (G + 1,) and curve.dtype == torch.float64
    Hd = H + damp * H.diagonal().mean() * torch.eye(12, dtype=H.dtype)
    for n in range(0, G + 1, segments):
        kept = reference.score_select(W.float(), s.float(), G - n, groups, segments)
        cols = units[kept].reshape(-1).sort().values if len(kept) else torch.empty(0, dtype=torch.long)
        assert float(curve[n]) == pytest.approx(_error(W, Hd, cols), rel=1e-4, abs=1e-6)
    assert float(curve[0]) == 0.0
    assert all(float(b) >= float(a) - 1e-9 for a, b in zip(curve, curve[1:]))


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("upto", [0, 1, 3, 6, 100])
def test_score_order_curve_upto_is_the_head_of_the_full_curve(grouped, upto):
    """``upto`` computes e[0..upto] from the trailing block of the Cholesky factor only: the same
    values as the full curve's head (to fp64 rounding); past the last unit it is the full curve."""
    W, H = _problem(out=5, m=12, n=60, seed=3)
    s = H.diagonal().clone()
    groups, segments = (torch.arange(12).view(2, 2, 3).permute(0, 2, 1).reshape(6, 2), 2) if grouped else (None, 1)
    G = 6 if grouped else 12
    full = score_order_curve(W, s, H, groups, segments, damp=0.1)
    head = score_order_curve(W, s, H, groups, segments, damp=0.1, upto=upto)
    assert head.shape == (min(upto, G) + 1,)
    torch.testing.assert_close(head, full[: min(upto, G) + 1], rtol=1e-12, atol=1e-12)


def test_score_order_curve_removes_ties_from_the_higher_index_first():
    # equal scores: score_select keeps the lower index, so the curve must drop the higher one first
    W = torch.ones(3, 4, dtype=torch.float64)
    H = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    s = torch.ones(4, dtype=torch.float64)
    curve = score_order_curve(W, s, H, damp=0.0)
    # H diagonal: removing column j costs 3 * H_jj on its own; the highest index (4.0) leaves first
    assert [float(c) for c in curve] == pytest.approx([0.0, 12.0, 21.0, 27.0, 30.0])


def test_score_order_curve_survives_a_singular_gram_without_damping():
    # 5 tokens, 12 inputs: H is singular; damp 0 must not fail the allocation (it damps more)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(5, 12, generator=g, dtype=torch.float64)
    W = torch.randn(4, 12, generator=g, dtype=torch.float64)
    curve = score_order_curve(W, (X * X).sum(0), X.T @ X, damp=0.0)
    assert bool(torch.isfinite(curve).all()) and float(curve[-1]) > 0
    with pytest.raises(RuntimeError, match="not positive definite"):
        score_order_curve(W, (X * X).sum(0), torch.full((12, 12), float("nan"), dtype=torch.float64))


# ----------------------------------------------------------------------------- in-place Cholesky (fasp_ext/_lapack.py)
def _lapack_or_skip():
    """LAPACK's dpotrf_ from libtorch_cpu, which torch's x86-64 Linux wheels (MKL) must provide."""
    import os
    import platform

    from fasp_ext import _lapack

    if os.environ.get("FASP_EXT_POTRF") == "0":
        pytest.skip("FASP_EXT_POTRF=0")
    _lapack.cholesky_upper_(torch.eye(2, dtype=torch.float64))  # resolves it
    if not _lapack._POTRF:
        import ctypes

        try:  # the symbol is there, but its factor is not torch's bit for bit on this CPU (MKL picks
            # other kernels on AMD than on Intel): _find refuses it and the curves use torch's Cholesky
            ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).dpotrf_
            cpu = platform.processor() or platform.machine()
            pytest.skip(f"dpotrf_ does not give torch's factor bit for bit on this CPU ({cpu}); torch's Cholesky is used")
        except AttributeError:
            pass
        assert not (platform.machine() == "x86_64" and torch.backends.mkl.is_available()), \
            "torch ships MKL here but dpotrf_ was not found in libtorch_cpu"
        pytest.skip("no dpotrf_ in this torch build")
    return _lapack


@pytest.fixture(params=["lapack", "torch"])
def potrf_backend(request, monkeypatch):
    """The curves' Cholesky: LAPACK's dpotrf_ from libtorch_cpu where found, torch's otherwise."""
    from fasp_ext import _lapack

    if request.param == "torch":
        monkeypatch.setattr(_lapack, "_POTRF", False)
    else:
        _lapack_or_skip()
    return request.param


@pytest.mark.parametrize("n", [1, 7, 300])
def test_cholesky_upper_is_torchs_factor(potrf_backend, n):
    from fasp_ext._lapack import cholesky_upper_

    g = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    A = X.t() @ X + 0.1 * torch.eye(n, dtype=torch.float64)
    U = A.clone()
    assert cholesky_upper_(U) == 0
    assert torch.equal(U.triu(), torch.linalg.cholesky(A).t())  # bit for bit, either backend
    # a matrix that is not positive definite: info > 0, as torch.linalg.cholesky_ex reports
    B = A.clone()
    B[n // 2, n // 2] = -1.0
    assert cholesky_upper_(B.clone()) == int(torch.linalg.cholesky_ex(B).info) > 0


def test_cholesky_upper_other_inputs_use_torch():
    # float32 and non-contiguous inputs are factorised by torch, with the same contract
    from fasp_ext._lapack import cholesky_upper_

    X = torch.randn(40, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A = X.t() @ X
    U = A.float().clone()
    assert cholesky_upper_(U) == 0
    torch.testing.assert_close(U.triu(), torch.linalg.cholesky(A.float()).t())
    wide = torch.zeros(12, 24, dtype=torch.float64)
    wide[:, ::2] = A
    V = wide[:, ::2]
    assert cholesky_upper_(V) == 0 and torch.equal(V.triu(), torch.linalg.cholesky(A).t())


def test_score_order_curve_same_with_either_cholesky():
    _lapack = _lapack_or_skip()
    W, H = _problem(out=6, m=40, n=200, seed=11)
    s = H.diagonal().clone()
    curve = score_order_curve(W, s, H, damp=0.01)
    saved, _lapack._POTRF = _lapack._POTRF, False
    try:
        want = score_order_curve(W, s, H, damp=0.01)
    finally:
        _lapack._POTRF = saved
    torch.testing.assert_close(curve, want, rtol=1e-12, atol=1e-12)
