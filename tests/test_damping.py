"""Held-out damping choice: the closed-form errors equal brute force, and the pipeline runs with it."""

import pytest
import torch

from fasp_ext import reference as ref
from fasp_ext.damping import choose_damp
from fasp_ext.pipeline import PruneConfig, prune
from tiny_models import random_tokens, tiny_llama, tiny_opt


def test_choose_damp_errors_match_brute_force():
    g = torch.Generator().manual_seed(0)
    m, out, n = 24, 10, 60
    Xf = torch.randn(n, m, generator=g) @ torch.randn(m, m, generator=g)
    Xv = torch.randn(n // 2, m, generator=g) @ torch.randn(m, m, generator=g)
    W = torch.randn(out, m, generator=g)
    kept = torch.arange(0, m, 2)
    Hf, Hv = (Xf.t() @ Xf).double(), (Xv.t() @ Xv).double()
    best, errs = choose_damp(W, Hf, Hv, kept, grid=(1e-3, 0.1, 10.0))
    for damp, err in errs.items():
        if damp == float("inf"):
            Wn = W[:, kept].double()
        else:
            Wn, _ = ref.restore(W.double(), Hf, kept, damp, use_fp64=True)
        D = W.double().clone()
        D[:, kept] -= Wn
        brute = float(torch.einsum("ij,jk,ik->", D, Hv, D))
        assert abs(brute - err) <= 1e-6 * max(1.0, abs(brute)), (damp, brute, err)
    assert best == min((d for d in errs if d != float("inf")), key=lambda d: errs[d])


def test_auto_damp_pipeline_runs_and_reports():
    for make in (tiny_llama, tiny_opt):
        m = make()
        rep = prune(m, random_tokens(10, 24), PruneConfig(sparsity=0.3, damp="auto", progress=False))
        solvers = [b["mlp_solver"] for b in rep.blocks]
        assert all("heldout_error" in s and s["damp"] in PruneConfig().damp_grid for s in solvers)
        with torch.no_grad():
            assert torch.isfinite(m(random_tokens(1, 16)).logits).all()


def test_held_out_samples_cost_one_gram_update_and_every_sum_is_exact(monkeypatch):
    """With val_every, H holds every token and H_val the held-out samples' tokens (every 3rd sample,
    numbered across batches, a 2-D batch being one sample), each token going through one Gram update
    before ``reduce``; statistics added after ``reduce`` still reach both, and a second ``reduce``
    adds nothing twice."""
    from fasp_ext import calibration, ops

    g = torch.Generator().manual_seed(5)
    m, t = 7, 4
    batches = [torch.randn(3, t, m, generator=g), torch.randn(t, m, generator=g),
               torch.randn(4, t, m, generator=g), torch.randn(2, t, m, generator=g)]
    samples = [x for b in batches for x in (b if b.dim() == 3 else b.unsqueeze(0))]
    rows = []
    real = ops.accumulate_stats
    monkeypatch.setattr(calibration.ops, "accumulate_stats",
                        lambda X, s, H=None: (rows.append(X.reshape(-1, X.shape[-1]).shape[0]), real(X, s, H))[1])
    st = calibration.Stats.new(m, "cpu", val_every=3)
    for b in batches[:3]:
        st.add(b)
    assert sum(rows) == sum(x.shape[0] for x in samples[:8])  # one Gram update per token
    st.reduce()

    def check(n_samples):
        x = torch.cat(samples[:n_samples]).double()
        xv = torch.cat([samples[i] for i in range(2, n_samples, 3)]).double()
        tol = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st.H.double(), x.t() @ x, **tol)
        torch.testing.assert_close(st.s.double(), (x * x).sum(0), **tol)
        torch.testing.assert_close(st.H_val.double(), xv.t() @ xv, **tol)
        torch.testing.assert_close(st.mu_val.double(), xv.sum(0), **tol)
        torch.testing.assert_close(st.mu.double(), x.sum(0), **tol)
        assert (st.n, st.n_val) == (x.shape[0], xv.shape[0])

    check(8)
    st.add(batches[3])  # samples 8 (held out) and 9, after reduce
    st.reduce()
    check(10)
    bad = torch.randn(3, t, m, generator=g)
    bad[2, 1, 3] = float("nan")  # sample 12: the run after the held-out sample 11
    with pytest.raises(ValueError, match="NaN"):
        st.add(bad)
