"""The lower-triangle Gram update (the CUDA op ``accumulate_stats_lower``, half the flops): its
plain-torch twin ``reference.gram_lower_update_`` against the full X^T X, the mirror, the CPU run of
the GPU path (``ops.accumulate_stats(lower=True)``, ``Stats`` with ``bad``), and where the mirror
happens (``Stats.reduce``, once)."""

from __future__ import annotations

import os

import pytest
import torch

from fasp_ext import ops
from fasp_ext import reference as ref
from fasp_ext.calibration import Stats


def _case(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, m, generator=g)
    A = torch.randn(m, m, generator=g)
    return X, A + A.t()


def test_block_width_matches_the_c_header():
    # csrc/fasp_math.h gram_lower_block, worked by hand: one block below 512 columns, else
    # ceil(m / 16) rounded up to a multiple of 128, at least 256
    want = {1: 1, 100: 100, 511: 511, 512: 256, 576: 256, 1536: 256, 4096: 256, 4097: 384, 8192: 512,
            18944: 1280}
    assert {m: ref.gram_lower_block(m) for m in want} == want
    src = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "fasp_math.h")).read()
    assert "gram_lower_block(int64_t m)" in src and "(m + 15) / 16" in src and "< 512" in src


@pytest.mark.parametrize("m,block", [(37, 8), (64, 16), (600, None), (130, 1), (50, 200)])
def test_lower_update_is_the_lower_triangle_of_the_full_product(m, block):
    X, H0 = _case(97, m, seed=m)
    H = H0.clone()
    ref.gram_lower_update_(H, X, block)
    full = H0.double() + X.double().t() @ X.double()
    tol = 1e-5 * full.abs().max().item()
    # on and below the diagonal: H0 + X^T X up to fp32 rounding
    assert (torch.tril(H).double() - torch.tril(full)).abs().max().item() <= tol
    # above the diagonal blocks nothing was computed: exactly H0 there (half the flops)
    b = ref.gram_lower_block(m) if block is None else block
    blk = torch.arange(m) // b
    above = blk.unsqueeze(1) < blk.unsqueeze(0)  # row block < column block
    assert torch.equal(H[above], H0[above])
    if m > b:
        assert above.any()
    ref.mirror_lower_(H)
    assert torch.equal(H, H.t())
    assert (H.double() - full).abs().max().item() <= tol


def test_mirror_copies_the_strict_lower_triangle():
    L = torch.arange(16.0).reshape(4, 4)
    got = ref.mirror_lower_(L.clone())
    want = torch.tensor([[0.0, 4, 8, 12], [4, 5, 9, 13], [8, 9, 10, 14], [12, 13, 14, 15]])
    assert torch.equal(got, want)


def test_ops_lower_needs_the_deferred_flag_and_matches_reference():
    X, H0 = _case(40, 600, seed=1)
    s, H = torch.zeros(600), H0.clone()
    with pytest.raises(ValueError, match="lower=True needs the deferred flag bad"):
        ops.accumulate_stats(X, s, H, lower=True)
    bad = torch.zeros(1, dtype=torch.int32)
    ops.accumulate_stats(X.reshape(4, 10, 600), s, H, bad=bad, lower=True)
    s_ref, H_ref = torch.zeros(600), H0.clone()
    ref.accumulate_stats(X, s_ref, H_ref)
    torch.testing.assert_close(s, s_ref)
    assert not torch.equal(H, H_ref)  # the upper off-diagonal blocks were not updated
    ops.mirror_lower_(H)
    torch.testing.assert_close(H, H_ref, rtol=1e-5, atol=1e-4)
    assert int(bad) == 0
    X[3, 5] = float("nan")
    ops.accumulate_stats(X, s, H, bad=bad, lower=True)
    assert int(bad) != 0


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_stats_gpu_path_mirrors_once_in_reduce(monkeypatch, precision):
    """Stats with the deferred flag (the GPU path, run on the CPU) updates the lower triangle only
    until ``reduce``, which mirrors H and H_val; the result equals the CPU path's whole updates."""
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 7, 600, generator=g) for _ in range(3)]
    got = {}
    for deferred in (False, True):
        monkeypatch.setattr(ops, "defers", lambda device, d=deferred: d)
        st = Stats.new(600, "cpu", gram=True, val_every=2, precision=precision)
        assert st.gram_lower == deferred
        for x in xs:
            st.add(x)
        if deferred:  # before reduce: the block above the first diagonal block is untouched
            assert torch.count_nonzero(st.H[:256, 256:]) == 0 and torch.count_nonzero(st.H_val[:256, 256:]) == 0
            assert torch.count_nonzero(st.H[256:, :256]) > 0
        st.reduce()
        assert not st.gram_lower
        if deferred:
            assert torch.equal(st.H, st.H.t()) and torch.equal(st.H_val, st.H_val.t())
        st.add(xs[0])  # after reduce: whole updates (H holds the held-out samples too by now)
        got[deferred] = (st.H.clone(), st.H_val.clone(), st.s.clone())
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
