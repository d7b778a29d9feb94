"""CUDA tests of the op library: every CUDA kernel against fasp_ext/reference.py run on CPU.

The whole module is skipped when no GPU is visible (CI has none). On a GPU machine, build the
library with its CUDA kernels first (``FASP_EXT_CUDA=1 pip install --no-build-isolation -e .``),
then ``pytest tests/test_cuda_ops.py``. With FASP_EXT_REQUIRE_COMPILED=1 a library built without
CUDA kernels is a failure, not a skip.
"""

from __future__ import annotations

import os

import pytest
import torch

from fasp_ext import _loader
from fasp_ext import ops as fops
from fasp_ext import reference as ref

# FASP_EXT_REQUIRE_CUDA=1 (CI's CUDA step on a GPU machine): no visible GPU is a failure, not a skip
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("FASP_EXT_REQUIRE_CUDA") != "1",
                                reason="no CUDA device")

COMPILED_CUDA = "cuda" in _loader.compiled_devices()
REQUIRE = os.environ.get("FASP_EXT_REQUIRE_COMPILED") == "1"
needs_cuda_lib = pytest.mark.skipif(
    not COMPILED_CUDA and not REQUIRE, reason=f"CUDA kernels not built: {_loader.build_info()}"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = torch.ops.fasp_ext if COMPILED_CUDA else None
DEV = "cuda"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_cuda_kernels_registered():
    assert COMPILED_CUDA or not REQUIRE, f"no CUDA kernels: {_loader.build_info()}"
    if not COMPILED_CUDA:
        pytest.skip("CUDA kernels not built")
    for op in ("accumulate_stats", "score_select", "restore", "accumulate_stats_deferred", "accumulate_stats_lower"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fasp_ext::{op}", "CUDA"), op


# --------------------------------------------------------------------------- accumulate_stats
def _stats_case(shape, dtype, seed, scale=1.0):
    X = (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype)
    m = shape[-1]
    s0 = torch.rand(m, generator=gen(seed + 1))
    A = torch.randn(m, m, generator=gen(seed + 2))
    H0 = A + A.t()
    return X, s0, H0


def _check_stats(X_dev, X_cpu, s0, H0, with_H=True):
    s_ref, H_ref = s0.clone(), H0.clone() if with_H else None
    ref.accumulate_stats(X_cpu, s_ref, H_ref)
    s = s0.to(DEV)
    H = H0.to(DEV) if with_H else None
    OPS.accumulate_stats(X_dev, s, H)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=2e-5, atol=1e-5)
    if with_H:
        scale = H_ref.abs().max().item() + 1.0
        assert (H.cpu() - H_ref).abs().max().item() <= 2e-5 * scale


@needs_cuda_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(1, 7), (3, 5, 33), (64, 1), (300, 1023), (257, 4096), (2, 3, 4, 64), (0, 16)]
)
def test_accumulate_stats_matches_reference(dtype, shape):
    torch.backends.cuda.matmul.allow_tf32 = False
    X, s0, H0 = _stats_case(shape, dtype, seed=sum(shape))
    _check_stats(X.to(DEV), X, s0, H0, with_H=True)
    _check_stats(X.to(DEV), X, s0, H0, with_H=False)


@needs_cuda_lib
@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_stats_strided_inputs(dtype):
    big = torch.randn(40, 3, 130, generator=gen(7)).to(dtype)
    # leading dims strided, last dim contiguous (row stride 390): the no-copy path
    X = big[:, 1, :128]
    s0, H0 = torch.rand(128), torch.eye(128)
    _check_stats(big.to(DEV)[:, 1, :128], X, s0, H0)
    # misaligned start and odd m: the scalar (unvectorised) path
    Xm = big[:, 0, 1:126]
    _check_stats(big.to(DEV)[:, 0, 1:126], Xm, torch.rand(125), torch.zeros(125, 125))
    # last dim not contiguous: copied
    Xt = big[:, 2, :].t()
    _check_stats(big.to(DEV)[:, 2, :].t(), Xt, torch.rand(40), torch.zeros(40, 40))


@needs_cuda_lib
def test_accumulate_stats_accumulates_and_is_deterministic():
    X = torch.randn(5000, 300, generator=gen(11)).to(DEV)
    s1, s2 = torch.zeros(300, device=DEV), torch.zeros(300, device=DEV)
    OPS.accumulate_stats(X, s1, None)
    OPS.accumulate_stats(X, s2, None)
    assert torch.equal(s1, s2)
    OPS.accumulate_stats(X, s1, None)
    torch.testing.assert_close(s1, 2 * s2, rtol=1e-6, atol=0)


@needs_cuda_lib
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_accumulate_stats_nonfinite_leaves_state_untouched(bad):
    X = torch.randn(50, 20, device=DEV)
    X[7, 3] = bad
    s = torch.rand(20, device=DEV)
    H = torch.eye(20, device=DEV)
    s0, H0 = s.clone(), H.clone()
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        OPS.accumulate_stats(X, s, H)
    assert torch.equal(s, s0) and torch.equal(H, H0)


@needs_cuda_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 7), (300, 600), (129, 1100), (2, 50, 1536)])
def test_accumulate_stats_lower_is_the_lower_triangle_of_the_reference(dtype, shape):
    """accumulate_stats_lower (half the Gram's flops): on and below the diagonal the reference's
    H + X^T X, above the diagonal blocks H as it was, and after ops.mirror_lower_ the whole
    reference; its plain-torch twin reference.gram_lower_update_ agrees entry by entry."""
    torch.backends.cuda.matmul.allow_tf32 = False
    X, s0, H0 = _stats_case(shape, dtype, seed=sum(shape) + 5)
    m = shape[-1]
    s_ref, H_ref = s0.clone(), H0.clone()
    ref.accumulate_stats(X, s_ref, H_ref)
    twin = H0.clone()
    ref.gram_lower_update_(twin, X.reshape(-1, m).float())
    s, H = s0.to(DEV), H0.to(DEV)
    bad = torch.zeros(1, dtype=torch.int32, device=DEV)
    OPS.accumulate_stats_lower(X.to(DEV), s, H, bad)
    assert int(bad) == 0
    torch.testing.assert_close(s.cpu(), s_ref, rtol=2e-5, atol=1e-5)
    scale = H_ref.abs().max().item() + 1.0
    Hc = H.cpu()
    assert (torch.tril(Hc) - torch.tril(H_ref)).abs().max().item() <= 2e-5 * scale
    assert (Hc - twin).abs().max().item() <= 2e-5 * scale  # the same entries updated, the same values
    blk = torch.arange(m) // ref.gram_lower_block(m)
    above = blk.unsqueeze(1) < blk.unsqueeze(0)
    assert torch.equal(Hc[above], H0[above])
    fops.mirror_lower_(H)
    assert (H.cpu() - H_ref).abs().max().item() <= 2e-5 * scale


@needs_cuda_lib
def test_accumulate_stats_lower_flags_nonfinite_without_waiting():
    X = torch.randn(50, 600, device=DEV)
    X[7, 3] = float("nan")
    s, H = torch.zeros(600, device=DEV), torch.zeros(600, 600, device=DEV)
    bad = torch.zeros(1, dtype=torch.int32, device=DEV)
    OPS.accumulate_stats_lower(X, s, H, bad)
    assert int(bad) != 0
    assert torch.equal(s, torch.zeros_like(s))  # s untouched once the flag is set


@needs_cuda_lib
def test_accumulate_stats_errors():
    X = torch.randn(4, 6, device=DEV)
    with pytest.raises(ValueError, match="X must be float32, float16 or bfloat16"):
        OPS.accumulate_stats(X.double(), torch.zeros(6, device=DEV), None)
    with pytest.raises(ValueError, match="s must be a float32 vector of length m=6"):
        OPS.accumulate_stats(X, torch.zeros(5, device=DEV), None)
    with pytest.raises(ValueError, match="s is on cpu but X is on cuda"):
        OPS.accumulate_stats(X, torch.zeros(6), None)
    with pytest.raises(ValueError, match=r"H must be a float32 \(6, 6\) matrix"):
        OPS.accumulate_stats(X, torch.zeros(6, device=DEV), torch.zeros(6, 5, device=DEV))
    with pytest.raises(ValueError, match="H must be contiguous"):
        OPS.accumulate_stats(X, torch.zeros(6, device=DEV), torch.zeros(6, 6, device=DEV).t()[:, :])
    with pytest.raises(ValueError, match="s must be contiguous"):
        OPS.accumulate_stats(X, torch.zeros(12, device=DEV)[::2], None)


# --------------------------------------------------------------------------- score_select
def _exact_problem(out, m, dtype, seed):
    """Integer weights and perfect-square s: every score is an exact integer (many ties), so the
    selection must equal the reference's bit for bit whatever the summation order."""
    W = torch.randint(-3, 4, (out, m), generator=gen(seed)).to(dtype)
    s = torch.randint(0, 6, (m,), generator=gen(seed + 1)).float() ** 2
    return W, s


def _select_both(W, s, k, groups=None, segments=1):
    want = ref.score_select(W, s, k, groups, segments)
    got = OPS.score_select(W.to(DEV), s.to(DEV), k, None if groups is None else groups.to(DEV), segments)
    assert got.dtype == torch.int64 and got.device.type == "cuda"
    return got.cpu(), want


@needs_cuda_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 0), (1, 1), (7, 3), (33, 0), (33, 33), (255, 200), (4096, 3277), (11008, 8806)])
def test_score_select_exact(dtype, m, k):
    W, s = _exact_problem(17, m, dtype, seed=m + k)
    got, want = _select_both(W, s, k)
    assert torch.equal(got, want)


@needs_cuda_lib
@pytest.mark.parametrize("dtype", DTYPES)
def test_score_select_groups_and_segments(dtype):
    # GQA-like: 4 kv heads x 16 channels, each group = the channel in 3 query heads (m = 192)
    kv, d, rep = 4, 16, 3
    W, s = _exact_problem(9, kv * rep * d, dtype, seed=3)
    g = torch.arange(kv * d)
    head, ch = g // d, g % d
    groups = torch.stack([(head * rep + r) * d + ch for r in range(rep)], 1)
    for k, segments in [(0, 1), (64, 1), (40, 4), (32, 4), (64, 4), (8, 8), (32, 16), (64, 64)]:
        got, want = _select_both(W, s, k, groups, segments)
        assert torch.equal(got, want), (k, segments)


@needs_cuda_lib
def test_score_select_all_ties_keeps_lowest_indices():
    W = torch.ones(4, 1000)
    s = torch.ones(1000)
    got, want = _select_both(W, s, 300)
    assert torch.equal(got, torch.arange(300)) and torch.equal(got, want)
    got, want = _select_both(W, s, 300, None, 10)
    assert torch.equal(got, want)
    z, zw = _select_both(torch.zeros(3, 50), torch.zeros(50), 20)  # all-zero scores
    assert torch.equal(z, zw)


@needs_cuda_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,segments", [(1000, 700, 1), (4096, 2048, 32), (11008, 8800, 1), (513, 171, 3)])
def test_score_select_random_is_valid_top_k(dtype, m, k, segments):
    """Random data: scores differ from the CPU's in the last bits (summation order), so check that
    the CUDA set is a correct top-k of fp64 scores up to that rounding, and mostly equal."""
    W = torch.randn(64, m, generator=gen(m)).to(dtype)
    s = torch.rand(m, generator=gen(m + 1)) * 100
    got, want = _select_both(W, s, k, None, segments)
    sc = (s.double().sqrt() * W.double().abs().sum(0)).reshape(segments, -1)
    per = k // segments
    keep = torch.zeros(m, dtype=torch.bool)
    keep[got] = True
    keep = keep.reshape(segments, -1)
    assert int(keep.sum()) == k and bool((keep.sum(1) == per).all())
    for seg in range(segments):
        kept_sc, drop_sc = sc[seg][keep[seg]], sc[seg][~keep[seg]]
        if kept_sc.numel() and drop_sc.numel():
            assert kept_sc.min() >= drop_sc.max() * (1 - 1e-5)
    assert torch.equal(got, torch.sort(got).values)
    assert (torch.isin(got, want)).float().mean() > 0.99


@needs_cuda_lib
def test_score_select_deterministic_and_strided():
    W = torch.randn(512, 3000, device=DEV).half()
    s = torch.rand(3000, device=DEV)
    a = OPS.score_select(W, s, 1500, None, 1)
    for _ in range(3):
        assert torch.equal(OPS.score_select(W, s, 1500, None, 1), a)
    Wt = W.t().contiguous().t()  # column-major storage: copied to row-major
    assert torch.equal(OPS.score_select(Wt, s, 1500, None, 1), a)


@needs_cuda_lib
def test_score_select_errors():
    W = torch.randn(4, 12, device=DEV)
    s = torch.rand(12, device=DEV)
    with pytest.raises(ValueError, match="groups entries must lie in"):
        OPS.score_select(W, s, 2, torch.tensor([[0, 12], [1, 2]], device=DEV), 1)
    with pytest.raises(ValueError, match="groups entries must lie in"):
        OPS.score_select(W, s, 2, torch.tensor([[0, -1], [1, 2]], device=DEV), 1)
    bad_s = s.clone()
    bad_s[5] = float("nan")
    with pytest.raises(ValueError, match="s contains NaN or Inf"):
        OPS.score_select(W, bad_s, 2, None, 1)
    bad_W = W.clone()
    bad_W[1, 3] = float("inf")
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        OPS.score_select(bad_W, s, 2, None, 1)
    with pytest.raises(ValueError, match=r"k=13 out of range \[0, 12\]"):
        OPS.score_select(W, s, 13, None, 1)
    with pytest.raises(ValueError, match="segments=5 must be >= 1 and divide"):
        OPS.score_select(W, s, 5, None, 5)
    with pytest.raises(ValueError, match="k=3 must be a multiple of segments=2"):
        OPS.score_select(W, s, 3, None, 2)
    with pytest.raises(ValueError, match="s is on cpu but W is on cuda"):
        OPS.score_select(W, s.cpu(), 2, None, 1)
    with pytest.raises(ValueError, match="groups must be an int64"):
        OPS.score_select(W, s, 2, torch.zeros(3, 2, dtype=torch.int32, device=DEV), 1)


# --------------------------------------------------------------------------- restore
def _problem(n_tok, m, out, seed, dtype=torch.float32):
    X = torch.randn(n_tok, m, generator=gen(seed), dtype=torch.float64)
    W = torch.randn(out, m, generator=gen(seed + 1), dtype=torch.float64)
    H = (X.t() @ X).float()
    return W.to(dtype), H


def _kept(m, k, seed=0):
    return torch.sort(torch.randperm(m, generator=gen(seed))[:k]).values


def _restore_both(W, H, kept, damp, use_fp64=False, retries=4):
    want, rep_w = ref.restore(W, H, kept, damp, use_fp64, retries)
    got, rep = OPS.restore(W.to(DEV), H.to(DEV), kept.to(DEV), damp, use_fp64, retries)
    assert got.dtype == W.dtype and got.device.type == "cuda" and got.is_contiguous()
    assert rep.dtype == torch.float64 and rep.device.type == "cpu" and rep.shape == (3,)
    return got.cpu(), want, rep, rep_w


def _close(got, want, tol):
    scale = want.double().abs().max().item() + 1e-30
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert err <= tol * scale, (err, scale)


@needs_cuda_lib
@pytest.mark.parametrize("wdtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("use_fp64", [False, True])
@pytest.mark.parametrize("m,k,out", [(37, 20, 9), (256, 180, 64), (1024, 700, 16),  # out RHS
                                     (37, 30, 9), (256, 230, 64), (1024, 820, 576)])  # |R| RHS
def test_restore_matches_reference(wdtype, use_fp64, m, k, out):
    torch.backends.cuda.matmul.allow_tf32 = False
    W, H = _problem(4 * m, m, out, seed=m + k, dtype=wdtype)
    kept = _kept(m, k, seed=k)
    got, want, rep, rep_w = _restore_both(W, H, kept, 0.01, use_fp64)
    assert int(rep[0]) == ref.PATH_CHOLESKY and int(rep_w[0]) == ref.PATH_CHOLESKY
    assert int(rep[2]) == 1
    torch.testing.assert_close(rep[1], rep_w[1], rtol=1e-5, atol=0)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(wdtype, 1e-6 if use_fp64 else 1e-3)
    _close(got, want, tol)


@needs_cuda_lib
@pytest.mark.parametrize("m,k", [(50, 0), (50, 50)])
def test_restore_trivial(m, k):
    W, H = _problem(80, m, 6, seed=1)
    got, want, rep, rep_w = _restore_both(W, H, _kept(m, k), 0.01)
    assert torch.equal(got, want) and int(rep[0]) == ref.PATH_TRIVIAL and torch.equal(rep, rep_w)
    got, want, rep, _ = _restore_both(W, torch.zeros(m, m), _kept(m, 25), 0.01)  # H[S,S] == 0
    assert torch.equal(got, want) and int(rep[0]) == ref.PATH_SKIPPED and float(rep[1]) == 0.0
    assert torch.equal(got, W[:, _kept(m, 25)])
    got, want, rep, _ = _restore_both(W, -torch.eye(m), _kept(m, 25), 0.01)  # mean diagonal < 0
    assert torch.equal(got, want) and int(rep[0]) == ref.PATH_SKIPPED


def _rank_deficient(m=40, out=5, dead=(3, 10)):
    """H with all-zero rows/columns for the 'dead' channels: H[S, S] is exactly singular at
    lambda = 0 whenever a dead channel is kept."""
    X = torch.randn(200, m, generator=gen(5), dtype=torch.float64)
    X[:, list(dead)] = 0
    W = torch.randn(out, m, generator=gen(6))
    return W, (X.t() @ X).float()


@needs_cuda_lib
@pytest.mark.parametrize("use_fp64", [False, True])
def test_restore_damping_retry_path(use_fp64):
    W, H = _rank_deficient()
    kept = torch.arange(0, 40, 2)  # keeps dead channel 10
    got, want, rep, rep_w = _restore_both(W, H, kept, 0.0, use_fp64, 4)
    assert int(rep[0]) == ref.PATH_CHOLESKY_RETRY == int(rep_w[0])
    assert int(rep[2]) == int(rep_w[2]) == 2
    torch.testing.assert_close(rep[1], rep_w[1], rtol=1e-5, atol=0)
    _close(got, want, 1e-6 if use_fp64 else 1e-3)


@needs_cuda_lib
@pytest.mark.parametrize("use_fp64", [False, True])
def test_restore_eigen_path(use_fp64):
    W, H = _rank_deficient()
    kept = torch.arange(0, 40, 2)
    got, want, rep, rep_w = _restore_both(W, H, kept, 0.0, use_fp64, 0)
    assert int(rep[0]) == ref.PATH_EIGEN == int(rep_w[0])
    assert int(rep[2]) == int(rep_w[2]) == 2
    _close(got, want, 1e-6 if use_fp64 else 1e-3)
    assert torch.isfinite(got).all()


@needs_cuda_lib
def test_restore_zero_output_rows():
    W, H = _problem(60, 30, 0, seed=2)
    got, want, rep, _ = _restore_both(W, H, _kept(30, 12), 0.01)
    assert got.shape == (0, 12) and int(rep[0]) == ref.PATH_CHOLESKY


@needs_cuda_lib
def test_restore_errors():
    W, H = _problem(60, 10, 3, seed=3)
    W, H = W.to(DEV), H.to(DEV)
    k = torch.tensor([1, 4, 7], device=DEV)
    with pytest.raises(ValueError, match="kept indices must lie in"):
        OPS.restore(W, H, torch.tensor([1, 10], device=DEV), 0.01, False, 4)
    with pytest.raises(ValueError, match="kept must be strictly increasing"):
        OPS.restore(W, H, torch.tensor([4, 1], device=DEV), 0.01, False, 4)
    with pytest.raises(ValueError, match="kept must be strictly increasing"):
        OPS.restore(W, H, torch.tensor([1, 1], device=DEV), 0.01, False, 4)
    Hn = H.clone()
    Hn[2, 2] = float("nan")
    with pytest.raises(ValueError, match="H contains NaN or Inf"):
        OPS.restore(W, Hn, k, 0.01, False, 4)
    for j in (4, 5):  # a kept and a removed column
        Wn = W.clone()
        Wn[1, j] = float("inf") if j == 4 else float("nan")
        with pytest.raises(ValueError, match="W contains NaN or Inf"):
            OPS.restore(Wn, H, k, 0.01, False, 4)
        with pytest.raises(ValueError, match="W contains NaN or Inf"):
            OPS.restore(Wn, H, torch.arange(10, device=DEV), 0.01, False, 4)
    with pytest.raises(ValueError, match="damp must be a finite number >= 0, got -1.0"):
        OPS.restore(W, H, k, -1.0, False, 4)
    with pytest.raises(ValueError, match="damp must be a finite number >= 0, got nan"):
        OPS.restore(W, H, k, float("nan"), False, 4)
    with pytest.raises(ValueError, match="max_retries must be >= 0"):
        OPS.restore(W, H, k, 0.01, False, -1)
    with pytest.raises(ValueError, match=r"H must be \(10, 10\)"):
        OPS.restore(W, H[:5], k, 0.01, False, 4)
    with pytest.raises(ValueError, match="kept is on cpu but W is on cuda"):
        OPS.restore(W, H, k.cpu(), 0.01, False, 4)
    with pytest.raises(ValueError, match="kept must be a 1-D int64 tensor"):
        OPS.restore(W, H, k.int(), 0.01, False, 4)


# --------------------------------------------------------------------------- end to end / opcheck
@needs_cuda_lib
def test_wrappers_use_cuda_kernels_end_to_end():
    X = torch.randn(4, 128, 96, device=DEV, dtype=torch.bfloat16)
    W = torch.randn(32, 96, device=DEV, dtype=torch.bfloat16)
    s = torch.zeros(96, device=DEV)
    H = torch.zeros(96, 96, device=DEV)
    fops.accumulate_stats(X, s, H)
    kept = fops.score_select(W, s, 64)
    out, rep = fops.restore(W, H, kept, 0.01)
    assert out.shape == (32, 64) and out.dtype == torch.bfloat16 and rep.path == "cholesky"


@needs_cuda_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_H", [True, False])
def test_opcheck_accumulate_stats(dtype, with_H):
    X = torch.randn(2, 9, 37, device=DEV).to(dtype)
    s = torch.rand(37, device=DEV)
    H = torch.eye(37, device=DEV) if with_H else None
    torch.library.opcheck(torch.ops.fasp_ext.accumulate_stats.default, (X, s, H))


@needs_cuda_lib
@pytest.mark.parametrize("grouped", [False, True])
def test_opcheck_score_select(grouped):
    W = torch.randn(11, 36, device=DEV).half()
    s = torch.rand(36, device=DEV)
    groups = torch.arange(36, device=DEV).reshape(12, 3) if grouped else None
    torch.library.opcheck(torch.ops.fasp_ext.score_select.default, (W, s, 6, groups, 2))
    torch.library.opcheck(torch.ops.fasp_ext.score_select.default, (W, s, 0, groups, 1))


@needs_cuda_lib
@pytest.mark.parametrize("k", [0, 20, 37])
def test_opcheck_restore(k):
    W, H = _problem(100, 37, 9, seed=53)
    kept = _kept(37, k).to(DEV)
    torch.library.opcheck(torch.ops.fasp_ext.restore.default, (W.to(DEV), H.to(DEV), kept, 0.01, False, 4))


@needs_cuda_lib
def test_wrappers_compile_fullgraph_on_cuda():
    import fasp_ext

    def f(X, W, s, H):
        fasp_ext.accumulate_stats(X, s, H)
        kept = fasp_ext.score_select(W, s, 64)
        out, rep = fasp_ext.restore(W, H, kept, 0.01)
        return out, kept, rep

    X = torch.randn(512, 96, generator=gen(60)).to(DEV)
    W = torch.randn(16, 96, generator=gen(61)).to(DEV)
    s1, H1 = torch.zeros(96, device=DEV), torch.zeros(96, 96, device=DEV)
    s2, H2 = torch.zeros(96, device=DEV), torch.zeros(96, 96, device=DEV)
    want = f(X, W, s1, H1)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(X, W, s2, H2)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    assert got[2] == want[2] and got[2].path == "cholesky"
