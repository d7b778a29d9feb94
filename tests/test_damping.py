"""Held-out damping choice: the closed-form errors equal brute force, and the pipeline runs with it."""

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
