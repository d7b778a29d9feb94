"""CPU tests of the op library: every op against fasp_ext/reference.py, against independent
closed forms (lstsq, ridge normal equations, fp64 sums), edge cases, errors and opcheck.

Each numeric test runs twice: on the compiled op (torch.ops.fasp_ext.*, skipped when the library
is not built) and on the fasp_ext.ops wrapper (which uses the compiled op when present, else the
reference). With FASP_EXT_REQUIRE_COMPILED=1 a missing library is a failure, not a skip.
"""

from __future__ import annotations

import os

import pytest
import torch

import fasp_ext
from fasp_ext import _loader
from fasp_ext import ops as fops
from fasp_ext import reference as ref

COMPILED_CPU = "cpu" in _loader.compiled_devices()
REQUIRE = os.environ.get("FASP_EXT_REQUIRE_COMPILED") == "1"
needs_lib = pytest.mark.skipif(not COMPILED_CPU, reason=f"compiled library not built: {_loader.load_error()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_compiled_library_loaded_when_required():
    info = fasp_ext.build_info()
    if not REQUIRE:
        pytest.skip("FASP_EXT_REQUIRE_COMPILED is not 1")
    assert info["compiled"], f"fasp_ext._C did not load: {info.get('load_error')}"
    assert "cpu" in info["devices"], info
    for op in _loader.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fasp_ext::{op}", "CPU"), op


def test_build_info_keys():
    info = fasp_ext.build_info()
    for key in ("compiled", "devices", "torch", "cuda_compiled"):
        assert key in info
    if info["compiled"]:
        assert info["torch_built_against"].split("+")[0] == torch.__version__.split("+")[0]
        assert info["build_system"] in ("setuptools", "cmake")


# --------------------------------------------------------------------------- implementations
class Impl:
    """Uniform calling convention over the compiled ops and the Python wrappers."""

    def __init__(self, name):
        self.name = name

    def stats(self, X, s, H=None):
        if self.name == "compiled":
            torch.ops.fasp_ext.accumulate_stats(X, s, H)
        else:
            fops.accumulate_stats(X, s, H)

    def select(self, W, s, k, groups=None, segments=1):
        if self.name == "compiled":
            return torch.ops.fasp_ext.score_select(W, s, k, groups, segments)
        return fops.score_select(W, s, k, groups, segments)

    def restore(self, W, H, kept, damp, use_fp64=False, max_retries=4):
        """(W', path, lambda, attempts)."""
        if self.name == "compiled":
            out, rep = torch.ops.fasp_ext.restore(W, H, kept, float(damp), use_fp64, max_retries)
            assert rep.dtype == torch.float64 and rep.device.type == "cpu" and rep.shape == (3,)
            path, lam, att = rep.tolist()
            return out, ref.PATH_NAMES[int(path)], lam, int(att)
        out, rep = fops.restore(W, H, kept, damp, use_fp64, max_retries)
        return out, rep.path, rep.lam, rep.attempts


@pytest.fixture(params=["compiled", "wrapper"])
def impl(request):
    if request.param == "compiled" and not COMPILED_CPU:
        pytest.skip(f"compiled library not built: {_loader.load_error()}")
    return Impl(request.param)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ref_stats(X, m, with_H=True):
    s = torch.zeros(m)
    H = torch.zeros(m, m) if with_H else None
    ref.accumulate_stats(X, s, H)
    return s, H


# --------------------------------------------------------------------------- accumulate_stats
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 37), (37,), (100, 100), (3, 5, 37), (2, 77, 200), (16, 4096)])
def test_stats_matches_reference(impl, dtype, shape):
    X = (torch.randn(shape, generator=gen(1)) * 3).to(dtype)
    m = shape[-1]
    with_H = m <= 200
    s = torch.full((m,), 0.5)
    H = torch.eye(m) if with_H else None
    impl.stats(X, s, H)
    s_ref = torch.full((m,), 0.5)
    H_ref = torch.eye(m) if with_H else None
    ref.accumulate_stats(X, s_ref, H_ref)
    torch.testing.assert_close(s, s_ref, rtol=2e-6, atol=1e-5)
    # independent fp64 oracle
    X64 = X.reshape(-1, m).double()
    torch.testing.assert_close(s.double(), 0.5 + (X64 * X64).sum(0), rtol=2e-6, atol=1e-5)
    if with_H:
        torch.testing.assert_close(H, H_ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(H.double(), torch.eye(m, dtype=torch.float64) + X64.t() @ X64, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(H.diagonal(), s - 0.5 + 1.0, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("m", [127, 128, 129, 191, 383, 500, 1100, 1537])
def test_stats_blocked_gram_is_exact_for_any_H(impl, m):
    """Widths on both sides of the kernel's thresholds (SYRK from 128 columns, 64-column tiles of its
    symmetric add; GEMM blocks from 384), with a last tile or block narrower than the others: the
    lower triangle added to both triangles gives H0 + X^T X exactly, for a starting H that is not
    symmetric."""
    X = torch.randn(300, m, generator=gen(7))
    H0 = torch.randn(m, m, generator=gen(8))
    s, H = torch.full((m,), 0.5), H0.clone()
    impl.stats(X, s, H)
    X64 = X.double()
    torch.testing.assert_close(H.double(), H0.double() + X64.t() @ X64, rtol=1e-5, atol=1e-3)
    # s: from its own pass over X, or (SYRK on one panel) the diagonal of the SYRK product
    torch.testing.assert_close(s.double(), 0.5 + (X64 * X64).sum(0), rtol=2e-6, atol=1e-5)


_GRAM_CHECK = r"""
import sys, torch
from fasp_ext import ops
out = [ops.cpu_gram_backend()]
for m in (128, 129, 500, 1537, 4100):  # 4100: past the SYRK path's 4096-column panel
    g = torch.Generator().manual_seed(m)
    X = torch.randn(300, m, generator=g); H0 = torch.randn(m, m, generator=g)
    H = H0.clone(); s = torch.zeros(m)
    ops.accumulate_stats(X, s, H)
    want = H0.double() + X.double().t() @ X.double()
    out.append(float(((H.double() - want).abs().max() / want.abs().max())))
    want_s = (X.double() ** 2).sum(0)
    out.append(float(((s.double() - want_s).abs() / want_s).max()))
print(" ".join(map(str, out)))
"""


@needs_lib
def test_stats_gram_backends_both_exact():
    """The CPU kernel's two Gram updates, chosen per process: MKL's SYRK where torch ships MKL (x86-64
    Linux wheels, in column panels of at most 4096), blocked GEMMs otherwise or with FASP_EXT_SYRK=0.
    Both give H0 + X^T X for a non-symmetric H0, each in its own process."""
    import subprocess
    import sys

    seen = {}
    for env in ("1", "0"):
        res = subprocess.run([sys.executable, "-c", _GRAM_CHECK], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "FASP_EXT_SYRK": env})
        assert res.returncode == 0, res.stderr[-2000:]
        backend, *errs = res.stdout.split()
        assert all(float(e) < 1e-6 for e in errs), (env, backend, errs)
        seen[env] = backend
    assert seen["0"] == "blocked-gemm"
    import platform
    if platform.machine() == "x86_64" and torch.backends.mkl.is_available():
        assert seen["1"] == "mkl-syrk", "torch ships MKL here but the kernel did not find its SYRK"


def test_stats_zero_tokens(impl):
    s = torch.ones(37)
    H = torch.ones(37, 37)
    impl.stats(torch.zeros(0, 37), s, H)
    assert torch.equal(s, torch.ones(37)) and torch.equal(H, torch.ones(37, 37))


@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_many_batches_equal_one(impl, dtype):
    m = 100
    X = torch.randn(40, 25, m, generator=gen(2)).to(dtype)
    s1, H1 = torch.zeros(m), torch.zeros(m, m)
    for b in range(X.shape[0]):
        impl.stats(X[b], s1, H1)
    s2, H2 = torch.zeros(m), torch.zeros(m, m)
    impl.stats(X, s2, H2)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(H1, H2, rtol=1e-5, atol=1e-3)


def test_stats_deterministic(impl):
    X = torch.randn(3000, 300, generator=gen(3))
    outs = []
    for _ in range(2):
        s, H = torch.zeros(300), torch.zeros(300, 300)
        impl.stats(X, s, H)
        outs.append((s, H))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_stats_non_contiguous_X(impl):
    X = torch.randn(64, 74, generator=gen(4))[:, ::2]  # (64, 37) strided view
    s, H = torch.zeros(37), torch.zeros(37, 37)
    impl.stats(X, s, H)
    s_ref, H_ref = ref_stats(X.contiguous(), 37)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(H, H_ref)


@pytest.mark.parametrize("m", [37, 300, 5000])  # own pass; SYRK's diagonal (one panel); SYRK in panels
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_stats_rejects_non_finite_without_mutating(impl, bad, m):
    X = torch.randn(10, m, generator=gen(5))
    X[3, m - 7] = bad
    s, H = torch.ones(m), torch.ones(m, m)
    with pytest.raises(ValueError, match="accumulate_stats: X contains NaN or Inf"):
        impl.stats(X, s, H)
    assert torch.equal(s, torch.ones(m)) and torch.equal(H, torch.ones(m, m))


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda: (torch.randn(4, 8, dtype=torch.float64), torch.zeros(8), None), "X must be float32"),
        (lambda: (torch.randn(4, 8).int(), torch.zeros(8), None), "X must be float32"),
        (lambda: (torch.tensor(1.0), torch.zeros(1), None), "X must be a tensor with at least 1 dimension"),
        (lambda: (torch.randn(4, 8), torch.zeros(7), None), "s must be a float32 vector of length m=8"),
        (lambda: (torch.randn(4, 8), torch.zeros(8, dtype=torch.float64), None), "s must be a float32"),
        (lambda: (torch.randn(4, 8), torch.zeros(8, 1), None), "s must be a float32 vector"),
        (lambda: (torch.randn(4, 8), torch.zeros(16)[::2], None), "s must be contiguous"),
        (lambda: (torch.randn(4, 8), torch.zeros(8), torch.zeros(8, 7)), r"H must be a float32 \(8, 8\)"),
        (lambda: (torch.randn(4, 8), torch.zeros(8), torch.zeros(8, 8, dtype=torch.float16)), "H must be a float32"),
        (lambda: (torch.randn(4, 8), torch.zeros(8), torch.zeros(8, 8).t()), "H must be contiguous"),
        (lambda: (torch.randn(4, 8), torch.zeros(8), torch.zeros(8, 16)[:, ::2]), "H must be contiguous"),
        (lambda: (torch.randn(4, 8), torch.zeros(8, device="meta"), None), "s is on meta but X is on cpu"),
        (lambda: (torch.randn(4, 8), torch.zeros(8), torch.zeros(8, 8, device="meta")), "H is on meta but X is on cpu"),
    ],
)
def test_stats_bad_arguments(impl, make, msg):
    X, s, H = make()
    if impl.name == "compiled" and "meta" in msg:
        # The dispatcher may route a meta argument to the fake kernel, which raises the same error.
        with pytest.raises((ValueError, RuntimeError), match="meta"):
            impl.stats(X, s, H)
        return
    with pytest.raises(ValueError, match="accumulate_stats: " + msg):
        impl.stats(X, s, H)


# --------------------------------------------------------------------------- score_select
def assert_same_selection(got, want, scores):
    """Exact equality, except that columns whose scores are within fp32 rounding of the cut-off
    may swap (the compiled kernel sums |W| in a different order than torch.sum)."""
    assert got.dtype == torch.int64 and got.dim() == 1 and got.shape == want.shape
    if got.numel() > 1:
        assert bool((got[1:] > got[:-1]).all()), "not strictly ascending"
    if torch.equal(got, want):
        return
    a, b = set(got.tolist()), set(want.tolist())
    diff = sorted(a ^ b)
    cut = scores[want].min()
    assert torch.allclose(scores[diff], cut.expand(len(diff)), rtol=1e-5), (diff, scores[diff], cut)


def scores64(W, s, groups=None):
    col = s.double().clamp_min(0).sqrt() * W.double().abs().sum(0)
    return col if groups is None else col[groups].sum(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out, m", [(1, 37), (20, 37), (64, 100), (33, 4096)])
@pytest.mark.parametrize("kfrac", [0.0, 0.01, 0.5, 0.9, 1.0])
def test_select_matches_reference(impl, dtype, out, m, kfrac):
    W = torch.randn(out, m, generator=gen(10)).to(dtype)
    s = torch.rand(m, generator=gen(11)) * 10
    k = round(kfrac * m)
    got = impl.select(W, s, k)
    want = ref.score_select(W, s, k)
    assert_same_selection(got, want, scores64(W, s))
    assert got.numel() == k


@pytest.mark.parametrize("segments", [1, 2, 4])
@pytest.mark.parametrize("r", [1, 3])
def test_select_groups_and_segments(impl, segments, r):
    G, out = 24, 16
    m = G * r
    W = torch.randn(out, m, generator=gen(12))
    s = torch.rand(m, generator=gen(13))
    groups = torch.randperm(m, generator=gen(14)).reshape(G, r)
    for k in (0, segments, G // 2, G):
        got = impl.select(W, s, k, groups, segments)
        want = ref.score_select(W, s, k, groups, segments)
        assert_same_selection(got, want, scores64(W, s, groups))
        # k / segments in every segment
        per_seg = torch.bincount(got // (G // segments), minlength=segments)
        assert per_seg.tolist() == [k // segments] * segments


def test_select_group_sum_semantics(impl):
    # groups (0,3) and (1,2): column scores 1, 4, 1, 2 -> group scores 3, 5
    W = torch.tensor([[1.0, 4.0, 1.0, 2.0]])
    s = torch.ones(4)
    groups = torch.tensor([[0, 3], [1, 2]])
    assert impl.select(W, s, 1, groups, 1).tolist() == [1]
    assert impl.select(W, s, 1, None, 1).tolist() == [1]
    assert impl.select(W, s, 2, None, 1).tolist() == [1, 3]


def test_select_ties_go_to_lower_index(impl):
    W = torch.ones(3, 6)
    s = torch.ones(6)
    assert impl.select(W, s, 3).tolist() == [0, 1, 2]
    assert impl.select(W, s, 4, None, 2).tolist() == [0, 1, 3, 4]
    # integer data: exact in every summation order -> must equal the reference exactly
    W = torch.randint(-3, 4, (8, 101), generator=gen(15)).float()
    s = torch.randint(0, 3, (101,), generator=gen(16)).float() ** 2
    for k in (0, 1, 10, 50, 100, 101):
        assert torch.equal(impl.select(W, s, k), ref.score_select(W, s, k))


def test_select_zero_scores_and_zero_stats(impl):
    W = torch.randn(5, 37, generator=gen(17))
    s = torch.zeros(37)
    assert impl.select(W, s, 5).tolist() == [0, 1, 2, 3, 4]


def test_select_deterministic(impl):
    W = torch.randn(256, 3000, generator=gen(18)).to(torch.bfloat16)
    s = torch.rand(3000, generator=gen(19))
    a, b = impl.select(W, s, 1500), impl.select(W, s, 1500)
    assert torch.equal(a, b)


def test_select_non_contiguous_W(impl):
    W = torch.randn(37, 20, generator=gen(20)).t()  # (20, 37) transposed view
    s = torch.rand(37, generator=gen(21))
    assert_same_selection(impl.select(W, s, 9), ref.score_select(W.contiguous(), s, 9), scores64(W, s))


@pytest.mark.parametrize(
    "args, msg",
    [
        ((torch.randn(8), torch.ones(8), 2, None, 1), "W must be 2-D"),
        ((torch.randn(4, 8, dtype=torch.float64), torch.ones(8), 2, None, 1), "W must be float32"),
        ((torch.randn(4, 8), torch.ones(7), 2, None, 1), "s must be a float32 vector of length m=8"),
        ((torch.randn(4, 8), torch.ones(8, dtype=torch.float64), 2, None, 1), "s must be a float32"),
        ((torch.randn(4, 8), torch.ones(8), -1, None, 1), r"k=-1 out of range \[0, 8\]"),
        ((torch.randn(4, 8), torch.ones(8), 9, None, 1), r"k=9 out of range \[0, 8\]"),
        ((torch.randn(4, 8), torch.ones(8), 3, None, 2), "k=3 must be a multiple of segments=2"),
        ((torch.randn(4, 8), torch.ones(8), 2, None, 0), "segments=0 must be >= 1"),
        ((torch.randn(4, 8), torch.ones(8), 3, None, 3), "segments=3 must be >= 1 and divide the number of groups 8"),
        ((torch.randn(4, 8), torch.ones(8), 2, torch.zeros(4, 2, dtype=torch.int32), 1), "groups must be an int64"),
        ((torch.randn(4, 8), torch.ones(8), 2, torch.zeros(4, dtype=torch.int64), 1), "groups must be an int64"),
        ((torch.randn(4, 8), torch.ones(8), 2, torch.full((4, 2), 8), 1), r"groups entries must lie in \[0, 8\)"),
        ((torch.randn(4, 8), torch.ones(8), 2, torch.full((4, 2), -1), 1), r"groups entries must lie in \[0, 8\)"),
        ((torch.randn(4, 8), torch.ones(8), 5, torch.zeros(4, 2, dtype=torch.int64), 1), r"k=5 out of range \[0, 4\]"),
        ((torch.randn(4, 8), torch.tensor([1.0] * 7 + [float("nan")]), 2, None, 1), "s contains NaN or Inf"),
        ((torch.randn(4, 8), torch.tensor([1.0] * 7 + [float("inf")]), 2, None, 1), "s contains NaN or Inf"),
    ],
)
def test_select_bad_arguments(impl, args, msg):
    with pytest.raises(ValueError, match="score_select: " + msg):
        impl.select(*args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_select_rejects_non_finite_W(impl, bad):
    W = torch.randn(4, 8, generator=gen(22))
    W[1, 5] = bad
    with pytest.raises(ValueError, match="score_select: W contains NaN or Inf"):
        impl.select(W, torch.ones(8), 2)


def test_select_device_mismatch_meta():
    with pytest.raises(ValueError, match="score_select: s is on meta but W is on cpu"):
        fops.score_select(torch.randn(4, 8), torch.ones(8, device="meta"), 2)


# --------------------------------------------------------------------------- restore
def problem(n_tok=512, m=48, out=16, seed=30, dead=(), dtype=torch.float64):
    g = gen(seed)
    X = torch.randn(n_tok, m, generator=g, dtype=torch.float64) * (1 + torch.rand(m, generator=g, dtype=torch.float64))
    X = X + 0.3 * X[:, torch.randperm(m, generator=g)]  # correlated columns
    for j in dead:
        X[:, j] = 0
    W = torch.randn(out, m, generator=g, dtype=torch.float64)
    return X, W.to(dtype), (X.t() @ X)


def kept_of(m, k, seed=31):
    return torch.sort(torch.randperm(m, generator=gen(seed))[:k]).values


@pytest.mark.parametrize("use_fp64", [False, True])
def test_restore_equals_lstsq_at_damp_zero(impl, use_fp64):
    X, W, H = problem()
    kept = kept_of(48, 32)
    want = torch.linalg.lstsq(X[:, kept], X @ W.t()).solution.t()
    Hin = H if use_fp64 else H.float()
    Win = W if use_fp64 else W.float()
    out, path, lam, att = impl.restore(Win, Hin, kept, 0.0, use_fp64)
    assert (path, lam, att) == ("cholesky", 0.0, 1)
    tol = dict(rtol=1e-8, atol=1e-8) if use_fp64 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.double(), want, **tol)


@pytest.mark.parametrize("damp", [0.01, 0.1, 1.0])
def test_restore_equals_ridge_formula(impl, damp):
    X, W, H = problem(seed=32)
    kept = kept_of(48, 30, seed=33)
    S = kept
    lam = damp * float(H[S][:, S].diagonal().mean())
    # normal equations of min ||X W^T - X_S W'^T||^2 + lam ||W' - W_S||^2:
    #   W' (H_SS + lam I) = W H[:, S] + lam W_S
    A = H[S][:, S] + lam * torch.eye(len(S), dtype=torch.float64)
    rhs = W @ H[:, S] + lam * W[:, S]
    want = torch.linalg.solve(A, rhs.t()).t()
    out, path, lam_got, att = impl.restore(W, H, kept, damp, True)
    assert path == "cholesky" and att == 1
    assert lam_got == pytest.approx(lam, rel=1e-12)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    out32, *_ = impl.restore(W.float(), H.float(), kept, damp, False)
    torch.testing.assert_close(out32.double(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("wdtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("hdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_fp64", [False, True])
@pytest.mark.parametrize("m, k", [(37, 0), (37, 1), (37, 20), (37, 36), (37, 37), (100, 61)])
@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_restore_matches_reference(impl, wdtype, hdtype, use_fp64, m, k, damp):
    X, W, H = problem(n_tok=300, m=m, out=21, seed=34)
    W, H = W.to(wdtype), H.to(hdtype)
    kept = kept_of(m, k, seed=35)
    out, path, lam, att = impl.restore(W, H, kept, damp, use_fp64)
    want, rep = ref.restore(W, H, kept, damp, use_fp64)
    assert out.dtype == wdtype and out.shape == (21, k) and out.is_contiguous()
    assert (path, att) == (ref.PATH_NAMES[int(rep[0])], int(rep[2]))
    assert lam == pytest.approx(float(rep[1]), rel=1e-6)
    if k in (0, m):
        assert path == "trivial" and att == 0
        ct = torch.float64 if use_fp64 else torch.float32
        assert torch.equal(out, W[:, kept].to(ct).to(wdtype))
    if wdtype in (torch.float16, torch.bfloat16):
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    else:
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4 * scale)


def test_restore_large(impl):
    # m ~ 4096 in fp32, k = 90 %: compared with the reference
    m, out, k = 1024 if os.environ.get("FASP_EXT_QUICK") else 4096, 8, None
    k = int(0.9 * m)
    g = gen(36)
    X = torch.randn(2 * m, m, generator=g)
    H = X.t() @ X
    W = torch.randn(out, m, generator=g)
    kept = kept_of(m, k, seed=37)
    got, path, lam, att = impl.restore(W, H, kept, 0.01)
    want, rep = ref.restore(W, H, kept, 0.01)
    assert path == "cholesky"
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_restore_dead_neurons(impl):
    X, W, H = problem(dead=(0, 5, 9, 20), seed=38)
    kept = torch.tensor([0, 1, 2, 3, 5, 9, 10, 11, 12, 20, 30, 40])  # dead columns kept
    out, path, lam, att = impl.restore(W.float(), H.float(), kept, 0.0)
    assert torch.isfinite(out).all()
    assert path in ("cholesky+damping", "eigen") and att >= 2
    want, rep = ref.restore(W.float(), H.float(), kept, 0.0)
    assert path == ref.PATH_NAMES[int(rep[0])]
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
    # the live kept columns still give the optimum on the data (dead columns see no data)
    live = torch.tensor([j for j in kept.tolist() if j not in (0, 5, 9, 20)])
    pred = X[:, kept] @ out.double().t()
    best = X[:, live] @ torch.linalg.lstsq(X[:, live], X @ W.t()).solution
    assert float((pred - X @ W.t()).norm()) <= float((best - X @ W.t()).norm()) * 1.001 + 1e-3


def test_restore_fewer_tokens_than_columns(impl):
    X, W, H = problem(n_tok=10, m=48, seed=39)
    kept = kept_of(48, 32, seed=40)
    for use_fp64 in (False, True):
        out, path, lam, att = impl.restore(W.float(), H.float(), kept, 0.0, use_fp64)
        assert torch.isfinite(out).all()
        assert path in ("cholesky+damping", "eigen")
        want, rep = ref.restore(W.float(), H.float(), kept, 0.0, use_fp64)
        assert path == ref.PATH_NAMES[int(rep[0])] and att == int(rep[2])
        assert lam > 0 and lam == pytest.approx(float(rep[1]), rel=1e-6)
        # H[S, S] is singular (10 tokens, 32 kept columns): the solve is ill-conditioned, so compare
        # what it is fitted to, the layer's outputs on the calibration tokens, to the reference's
        fit, fit_ref = X[:, kept] @ out.double().t(), X[:, kept] @ want.double().t()
        torch.testing.assert_close(fit, fit_ref, rtol=1e-3, atol=1e-3 * float(fit_ref.abs().max()))
        # the restored layer fits the calibration data at least as well as plain selection
        err_sel = (X[:, kept] @ W[:, kept].t() - X @ W.t()).norm()
        err_res = (X[:, kept] @ out.double().t() - X @ W.t()).norm()
        assert err_res <= err_sel


def test_restore_all_zero_H_is_skipped_not_trivial(impl):
    W = torch.randn(7, 37, generator=gen(41))
    kept = kept_of(37, 20)
    out, path, lam, att = impl.restore(W, torch.zeros(37, 37), kept, 0.01)
    assert (path, lam, att) == ("skipped: H not positive", 0.0, 0)
    assert torch.equal(out, W[:, kept])
    # a real no-op (nothing removed) is told apart from it
    out, path, lam, att = impl.restore(W, torch.eye(37), torch.arange(37), 0.01)
    assert (path, att) == ("trivial", 0) and lam == pytest.approx(0.01)
    assert torch.equal(out, W)


def test_restore_negative_mean_diagonal_is_skipped(impl):
    W = torch.randn(5, 10, generator=gen(141))
    H = -torch.eye(10)
    kept = torch.tensor([1, 4, 7])
    out, path, lam, att = impl.restore(W, H, kept, 0.1)
    assert (path, lam, att) == ("skipped: H not positive", 0.0, 0)
    assert torch.equal(out, W[:, kept])
    if impl.name == "wrapper":
        rep = fops.restore(W, H, kept, 0.1)[1]
        assert rep.skipped and not fops.restore(W, torch.eye(10), kept, 0.1)[1].skipped


@pytest.mark.parametrize("where", ["kept", "removed"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float64])
def test_restore_rejects_non_finite_W(impl, where, bad, wdtype):
    X, W, H = problem(n_tok=100, m=12, out=4, seed=142)
    kept = torch.tensor([0, 3, 4, 8, 11])
    W = W.to(wdtype)
    W[2, 3 if where == "kept" else 5] = bad
    with pytest.raises(ValueError, match="restore: W contains NaN or Inf"):
        impl.restore(W, H.float(), kept, 0.01)
    with pytest.raises(ValueError, match="restore: W contains NaN or Inf"):  # also with nothing to solve
        impl.restore(W, H.float(), torch.arange(12), 0.01)


@needs_lib
@pytest.mark.parametrize("out", [3, 40])
@pytest.mark.parametrize("use_fp64", [False, True])
def test_restore_aten_fallback_equals_lapack_path(monkeypatch, out, use_fp64):
    # FASP_EXT_RESTORE_ATEN makes the kernel use ATen's cholesky / cholesky_solve instead of the
    # LAPACK symbols (what happens with a torch that exports none): same results, same report
    X, W, H = problem(n_tok=300, m=40, out=out, seed=146)
    kept = kept_of(40, 28, seed=147)
    ct = torch.float64 if use_fp64 else torch.float32
    for damp, retries in ((0.01, 4), (0.0, 4), (0.0, 0)):
        Hd = H.clone()
        Hd[:, 5] = Hd[5, :] = 0  # a dead kept channel: damp 0 needs a retry (or the eigen fallback)
        lapack = torch.ops.fasp_ext.restore(W.to(ct), Hd.to(ct), kept, damp, use_fp64, retries)
        monkeypatch.setenv("FASP_EXT_RESTORE_ATEN", "1")
        aten = torch.ops.fasp_ext.restore(W.to(ct), Hd.to(ct), kept, damp, use_fp64, retries)
        monkeypatch.delenv("FASP_EXT_RESTORE_ATEN")
        want, rep = ref.restore(W.to(ct), Hd.to(ct), kept, damp, use_fp64, retries)
        assert torch.equal(lapack[1][[0, 2]], rep[[0, 2]]) and torch.equal(aten[1][[0, 2]], rep[[0, 2]])
        tol = dict(rtol=1e-9, atol=1e-9) if use_fp64 else dict(rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(aten[0], want, **tol)
        torch.testing.assert_close(lapack[0], want, **tol)


def test_restore_H_non_finite_outside_the_solved_blocks(impl):
    # H[R, R] is never used by the solve, but a NaN there still means broken statistics
    X, W, H = problem(n_tok=100, m=12, out=4, seed=143)
    kept = torch.tensor([0, 3, 4, 8, 11])
    H = H.float()
    H[5, 6] = float("nan")
    with pytest.raises(ValueError, match="restore: H contains NaN or Inf"):
        impl.restore(W.float(), H, kept, 0.01)


@pytest.mark.parametrize("out", [3, 40])  # fewer rows than removed columns, and more
@pytest.mark.parametrize("use_fp64", [False, True])
def test_restore_both_solve_sides_equal_formula_asymmetric_H(impl, out, use_fp64):
    # H is not assumed symmetric: the update uses H[R, S] and the lower triangle of H[S, S]
    m, k = 30, 18
    g = gen(144)
    X = torch.randn(200, m, generator=g, dtype=torch.float64)
    H = X.t() @ X + 0.05 * torch.randn(m, m, generator=g, dtype=torch.float64) * 200
    W = torch.randn(out, m, generator=g, dtype=torch.float64)
    kept = kept_of(m, k, seed=145)
    mask = torch.ones(m, dtype=torch.bool)
    mask[kept] = False
    R = torch.nonzero(mask).flatten()
    Hss = H[kept][:, kept]
    A = torch.tril(Hss) + torch.tril(Hss, -1).t()
    lam = 0.05 * float(Hss.diagonal().mean())
    want = W[:, kept] + W[:, R] @ H[R][:, kept] @ torch.linalg.inv(A + lam * torch.eye(k, dtype=torch.float64))
    Win, Hin = (W, H) if use_fp64 else (W.float(), H.float())
    got, path, lam_got, att = impl.restore(Win, Hin, kept, 0.05, use_fp64)
    assert (path, att) == ("cholesky", 1)
    assert lam_got == pytest.approx(lam, rel=1e-6)
    tol = dict(rtol=1e-9, atol=1e-9) if use_fp64 else dict(rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    torch.testing.assert_close(got.double(), want, **tol)


def _indefinite_problem(m: int = 12, seed: int = 43):
    """An H whose kept block is indefinite (eigenvalues 1 +- 10) with a positive mean diagonal, so
    the op neither skips it (mean diag <= 0) nor gets a Cholesky factor at any small damping."""
    H = torch.eye(m)
    H[0, 2] = H[2, 0] = 10.0  # both kept (even indices): H[S, S] has the eigenvalue -9
    H[1, 0] = H[0, 1] = 0.5   # a removed column correlated with a kept one: the update is not zero
    W = torch.randn(3, m, generator=gen(seed))
    return W, H, torch.arange(0, m, 2)


def _eigen_restore_fp64(W, H, kept, lam):
    """W[:, S] + W[:, R] H[R, S] pinv(H[S, S] + lam I), eigenvalues below k * eps(fp32) * max|ev| dropped,
    computed here with torch.linalg in fp64 (independent of the op and of reference.py)."""
    m = H.shape[0]
    removed = torch.tensor([j for j in range(m) if j not in set(kept.tolist())])
    Hd, Wd = H.double(), W.double()
    A = Hd[kept][:, kept] + lam * torch.eye(len(kept), dtype=torch.float64)
    ev, V = torch.linalg.eigh(A)
    floor = ev.abs().max() * len(kept) * torch.finfo(torch.float32).eps
    inv = torch.where(ev > floor, 1.0 / ev.clamp_min(floor), torch.zeros_like(ev))
    return Wd[:, kept] + Wd[:, removed] @ Hd[removed][:, kept] @ (V * inv) @ V.t()


def test_restore_eigen_fallback_without_retries(impl):
    """max_retries=0: one Cholesky attempt at lambda = damp * mean diag, then the eigen fallback."""
    W, H, kept = _indefinite_problem()
    out, path, lam, att = impl.restore(W, H, kept, 0.01, False, 0)
    assert (path, att) == ("eigen", 2)
    assert lam == pytest.approx(0.01 * 1.0 * 10)  # the lambda after the failed attempt
    want, rep = ref.restore(W, H, kept, 0.01, False, 0)
    assert (path, att) == (ref.PATH_NAMES[int(rep[0])], int(rep[2]))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out.double(), _eigen_restore_fp64(W, H, kept, lam), rtol=1e-4, atol=1e-5)


def test_restore_indefinite_H_goes_to_eigen_after_the_retries(impl):
    W, H, kept = _indefinite_problem()
    out, path, lam, att = impl.restore(W, H, kept, 0.0, False, 2)
    assert (path, att) == ("eigen", 4)  # lambda 0, 1e-6, 1e-5 fail (eigenvalue -9), then eigen at 1e-4
    assert lam == pytest.approx(1e-4)
    want, rep = ref.restore(W, H, kept, 0.0, False, 2)
    assert (path, att) == (ref.PATH_NAMES[int(rep[0])], int(rep[2]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out.double(), _eigen_restore_fp64(W, H, kept, lam), rtol=1e-4, atol=1e-5)
    assert not torch.equal(out, W[:, kept])  # the removed column's share moved into the kept ones


def test_restore_deterministic(impl):
    X, W, H = problem(n_tok=400, m=100, out=30, seed=44)
    kept = kept_of(100, 70)
    a = impl.restore(W.float(), H.float(), kept, 0.01)[0]
    b = impl.restore(W.float(), H.float(), kept, 0.01)[0]
    assert torch.equal(a, b)


def test_restore_non_contiguous_inputs(impl):
    X, W, H = problem(n_tok=200, m=37, out=10, seed=45)
    Wt = W.float().t().contiguous().t()  # same values, column-major
    kept = kept_of(37, 20)
    out = impl.restore(Wt, H.float(), kept, 0.01)[0]
    want = ref.restore(W.float(), H.float(), kept, 0.01)[0]
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda W, H, k: (W[0], H, k, 0.01, 4), "W must be 2-D"),
        (lambda W, H, k: (W.int(), H, k, 0.01, 4), "W must be a floating tensor"),
        (lambda W, H, k: (W, H[:-1], k, 0.01, 4), r"H must be \(8, 8\) to match W's columns"),
        (lambda W, H, k: (W, H.half(), k, 0.01, 4), "H must be float32 or float64"),
        (lambda W, H, k: (W, H, k.int(), 0.01, 4), "kept must be a 1-D int64 tensor"),
        (lambda W, H, k: (W, H, k.reshape(1, -1), 0.01, 4), "kept must be a 1-D int64 tensor"),
        (lambda W, H, k: (W, H, torch.arange(9), 0.01, 4), "kept has 9 entries but W has only m=8 columns"),
        (lambda W, H, k: (W, H, torch.tensor([1, 8]), 0.01, 4), r"kept indices must lie in \[0, 8\)"),
        (lambda W, H, k: (W, H, torch.tensor([-1, 3]), 0.01, 4), r"kept indices must lie in \[0, 8\)"),
        (lambda W, H, k: (W, H, torch.tensor([3, 1]), 0.01, 4), "kept must be strictly increasing"),
        (lambda W, H, k: (W, H, torch.tensor([1, 1]), 0.01, 4), "kept must be strictly increasing"),
        (lambda W, H, k: (W, H, k, -0.1, 4), "damp must be a finite number >= 0"),
        (lambda W, H, k: (W, H, k, float("nan"), 4), "damp must be a finite number >= 0"),
        (lambda W, H, k: (W, H, k, float("inf"), 4), "damp must be a finite number >= 0"),
        (lambda W, H, k: (W, H, k, 0.01, -1), "max_retries must be >= 0"),
        (lambda W, H, k: (W, H.index_put((torch.tensor([2]), torch.tensor([3])), torch.tensor(float("nan"))), k, 0.01, 4),
         "H contains NaN or Inf"),
        (lambda W, H, k: (W, H.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))), k, 0.01, 4),
         "H contains NaN or Inf"),
        (lambda W, H, k: (W, H.to("meta"), k, 0.01, 4), "H is on meta but W is on cpu"),
    ],
)
def test_restore_bad_arguments(impl, make, msg):
    W = torch.randn(3, 8, generator=gen(46))
    H = torch.eye(8)
    kept = torch.tensor([0, 2, 5])
    W_, H_, k_, damp, retries = make(W, H, kept)
    if impl.name == "compiled" and "meta" in msg:
        with pytest.raises((ValueError, RuntimeError), match="meta"):
            impl.restore(W_, H_, k_, damp, False, retries)
        return
    with pytest.raises(ValueError, match="restore: " + msg):
        impl.restore(W_, H_, k_, damp, False, retries)


# --------------------------------------------------------------------------- opcheck / compile
@needs_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_H", [True, False])
def test_opcheck_accumulate_stats(dtype, with_H):
    X = torch.randn(2, 9, 37, generator=gen(50)).to(dtype)
    s = torch.rand(37)
    H = torch.eye(37) if with_H else None
    torch.library.opcheck(torch.ops.fasp_ext.accumulate_stats.default, (X, s, H))


@needs_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grouped", [False, True])
def test_opcheck_score_select(dtype, grouped):
    W = torch.randn(11, 36, generator=gen(51)).to(dtype)
    s = torch.rand(36, generator=gen(52))
    groups = torch.arange(36).reshape(12, 3) if grouped else None
    torch.library.opcheck(torch.ops.fasp_ext.score_select.default, (W, s, 6, groups, 2))
    torch.library.opcheck(torch.ops.fasp_ext.score_select.default, (W, s, 0, groups, 1))


@needs_lib
@pytest.mark.parametrize("wdtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("k", [0, 20, 37])
def test_opcheck_restore(wdtype, k):
    X, W, H = problem(n_tok=100, m=37, out=9, seed=53)
    kept = kept_of(37, k)
    torch.library.opcheck(torch.ops.fasp_ext.restore.default, (W.to(wdtype), H.float(), kept, 0.01, False, 4))


@needs_lib
def test_torch_compile_traces_ops():
    def f(X, W, s, H):
        torch.ops.fasp_ext.accumulate_stats(X, s, H)
        kept = torch.ops.fasp_ext.score_select(W, s, 20, None, 1)
        out, rep = torch.ops.fasp_ext.restore(W, H, kept, 0.01, False, 4)
        return out, kept

    X = torch.randn(64, 37, generator=gen(54))
    W = torch.randn(9, 37, generator=gen(55))
    s1, H1 = torch.zeros(37), torch.zeros(37, 37)
    s2, H2 = torch.zeros(37), torch.zeros(37, 37)
    want = f(X, W, s1, H1)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(X, W, s2, H2)
    assert got[0].shape == (9, 20)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(s2, s1)
