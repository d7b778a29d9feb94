"""Token weighting (``PruneConfig.token_weighting``): where a block RMS-normalises a sublayer's output
before the residual add (Gemma 2/3), each calibration token counts with the factor that norm scales
it by, so the restoration fits the error the stream receives; the selection and the allocation judge
output j scaled by the norm's gain g_j."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fasp_ext.adapters import adapter_for
from fasp_ext.calibration import Stats, collect
from fasp_ext.pipeline import PruneConfig, _restore, judged_weight, prune
from tiny_models import random_tokens, tiny_family, vocab_size


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_stats_are_the_stats_of_the_weighted_tokens(dtype):
    """s, H, mu, n (and the held-out H_val, mu_val, n_val and the dense-target D) count token t
    weight_t^2 times; the stored inputs are the raw ones. bf16 inputs are weighed in bf16."""
    b, t, m = 5, 7, 6
    X = torch.randn(b, t, m, generator=_gen(0)).to(dtype)
    Xd = torch.randn(b, t, m, generator=_gen(1))
    w = torch.rand(b, t, generator=_gen(2)) + 0.1
    st = Stats.new(m, "cpu", store=True, val_every=2)
    st.dense = [Xd[:2], Xd[2:]]
    st.add(X[:2], weight=w[:2])
    st.add(X[2:], weight=w[2:])
    assert st.n == 0.0 and st.n_pending is not None  # the weighted counts wait on the device until reduce
    st.reduce()
    assert st.n_pending is None and st.n_val_pending is None
    x, xd, w2 = X.reshape(-1, m).double(), Xd.reshape(-1, m).double(), w.reshape(-1, 1).double() ** 2
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(st.s.double(), (w2 * x * x).sum(0), **tol)
    torch.testing.assert_close(st.H.double(), x.t() @ (w2 * x), **tol)
    torch.testing.assert_close(st.mu.double(), (w2 * x).sum(0), rtol=1e-5, atol=1e-5)
    assert st.n == pytest.approx(float(w2.sum()), rel=1e-6)
    torch.testing.assert_close(st.D.double(), xd.t() @ (w2 * x), **tol)
    held = [1, 3]  # every second sample (0-based 1, 3) is held out
    xv, wv = X[held].reshape(-1, m).double(), w[held].reshape(-1, 1).double() ** 2
    torch.testing.assert_close(st.H_val.double(), xv.t() @ (wv * xv), **tol)
    torch.testing.assert_close(st.mu_val.double(), (wv * xv).sum(0), rtol=1e-5, atol=1e-5)
    assert st.n_val == pytest.approx(float(wv.sum()), rel=1e-6)
    assert torch.equal(torch.cat(st.store), X)


def test_weighted_restore_is_the_weighted_least_squares_fit():
    """With the weighted statistics and no damping, the restored projection is the least-squares fit
    of W x_t by the kept columns with token t weighed by w_t: torch.linalg.lstsq on the rows w_t x_t."""
    n, m, out = 200, 10, 4
    X = torch.randn(n, m, generator=_gen(3), dtype=torch.float64)
    X[:, 3] += 0.5 * X[:, 4]
    W = torch.randn(out, m, generator=_gen(4), dtype=torch.float64)
    w = (torch.rand(n, generator=_gen(5), dtype=torch.float64) * 3 + 0.05)
    st = Stats.new(m, "cpu")
    st.add(X.float(), weight=w.float())
    st.reduce()
    kept = torch.tensor([0, 1, 2, 3, 5, 6, 8])
    cfg = PruneConfig(damp=0.0, fp64=True, progress=False)
    Wn, _, info = _restore(W.float(), None, st, kept, None, cfg, restore=True)
    sol = torch.linalg.lstsq(w[:, None] * X[:, kept], w[:, None] * (X @ W.t())).solution.t()
    torch.testing.assert_close(Wn.double(), sol, rtol=1e-3, atol=1e-4)
    # and it is not the unweighted fit (the weights matter)
    plain = torch.linalg.lstsq(X[:, kept], X @ W.t()).solution.t()
    assert (Wn.double() - plain).abs().max() > 1e-2


class _RMSNorm(nn.Module):  # Gemma's: x / sqrt(mean(x^2) + eps) * (1 + weight)
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.randn(d, generator=_gen(6)) * 0.3)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


@pytest.mark.parametrize("stop", [False, True])
def test_collect_weighs_each_token_by_the_norms_scale(stop, monkeypatch):
    """The weight collect gives token t is the factor the norm multiplies that token's output by:
    norm(y) = g * y * w_t for y = lin(x). The stats receive the raw input."""
    from fasp_ext.calibration import _Stop

    lin = nn.Linear(5, 8, bias=False)
    norm = _RMSNorm(8)
    seen = []
    monkeypatch.setattr(Stats, "add", lambda self, x, weight=None: seen.append((x, weight)))
    st = Stats.new(5, "cpu")
    h = collect(lin, st, stop=stop, norm=norm)
    x = torch.randn(2, 3, 5, generator=_gen(7)) * torch.tensor([[[1.0]], [[30.0]]])
    try:
        y = lin(x)
    except _Stop:
        assert stop
        y = nn.functional.linear(x, lin.weight)
    h.remove()
    (xs, w), = seen
    assert torch.equal(xs, x) and w.shape == (2, 3)
    with torch.no_grad():
        torch.testing.assert_close(norm(y), (1.0 + norm.weight) * y * w.unsqueeze(-1), rtol=1e-5, atol=1e-6)


def test_judged_weight_scales_rows_by_the_norms_gain():
    model = tiny_family("gemma3_text")
    a = adapter_for(model)
    block = a.blocks(model)[0]
    for which, norm, lin in (("attn", block.post_attention_layernorm, a.value_pair(block)[1]),
                             ("mlp", block.post_feedforward_layernorm, a.mlp_pair(block)[1])):
        with torch.no_grad():
            norm.weight.copy_(torch.randn(norm.weight.shape, generator=_gen(8)))
        W = lin.weight
        got = judged_weight(PruneConfig(), a, block, which, W)
        torch.testing.assert_close(got, W * (1.0 + norm.weight.detach()).unsqueeze(1), rtol=1e-5, atol=1e-6)
        assert judged_weight(PruneConfig(token_weighting="none"), a, block, which, W) is W
        assert judged_weight(PruneConfig(method="wanda-sp"), a, block, which, W) is W
    llama = tiny_family("llama")
    la = adapter_for(llama)
    lb = la.blocks(llama)[0]
    assert la.output_norm(lb, "attn") is None and la.output_norm(lb, "mlp") is None
    assert judged_weight(PruneConfig(), la, lb, "mlp", la.mlp_pair(lb)[1].weight) is la.mlp_pair(lb)[1].weight


def _pruned(family, **kw):
    model = tiny_family(family)
    cfg = PruneConfig(sparsity=0.3, progress=False, **kw)
    rep = prune(model, random_tokens(8, 24, vocab=vocab_size(model)), cfg)
    weighs = family.startswith("gemma") and cfg.token_weighting == "auto"
    assert rep.token_weighting == ("auto" if weighs else "none")
    return model


@pytest.mark.parametrize("one_pass", [False, True])
def test_token_weighting_is_a_no_op_without_output_norms(one_pass):
    """LLaMA adds its sublayer outputs to the stream as they are: "auto" and "none" give the same model."""
    a = _pruned("llama", one_pass=one_pass)
    b = _pruned("llama", one_pass=one_pass, token_weighting="none")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("one_pass", [False, True])
def test_token_weighting_changes_the_gemma_restoration(family, one_pass):
    """On Gemma 2/3 the weighting reaches the restoration (and the allocation): "auto" differs from "none"."""
    a = _pruned(family, one_pass=one_pass)
    b = _pruned(family, one_pass=one_pass, token_weighting="none")
    differs = [n for (n, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items())
               if pa.shape != pb.shape or not torch.equal(pa, pb)]
    assert any("o_proj" in n for n in differs) and any("down_proj" in n for n in differs)


def test_token_weighting_is_validated():
    with pytest.raises(ValueError, match="token_weighting must be one of auto, none"):
        PruneConfig(token_weighting="always").validate()
    assert dataclasses.asdict(PruneConfig(token_weighting="none"))["token_weighting"] == "none"
