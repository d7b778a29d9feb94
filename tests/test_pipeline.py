"""End-to-end pipeline on tiny random OPT and LLaMA-GQA models, against exact identities."""

from __future__ import annotations

import copy

import pytest
import torch

from fasp_ext.adapters import adapter_for
from fasp_ext.calibration import Stats, capture_block_inputs, collect, run_block
from fasp_ext.io import load_pruned, save_pruned
from fasp_ext.pipeline import PruneConfig, count_params, kept_count, prune
from tiny_models import random_tokens, tiny_llama, tiny_opt

MAKERS = {"llama-gqa": tiny_llama, "opt": tiny_opt}


def logits(model, toks):
    with torch.no_grad():
        return model(toks).logits


@pytest.fixture(params=list(MAKERS))
def family(request):
    return request.param


def _cfg(**kw):
    kw.setdefault("progress", False)
    return PruneConfig(**kw)


def test_sparsity_zero_changes_nothing(family):
    m = MAKERS[family]()
    ev = random_tokens(2, 24, seed=7)
    before = logits(m, ev)
    rep = prune(m, random_tokens(4, 24), _cfg(sparsity=0.0))
    assert torch.equal(logits(m, ev), before)
    assert rep.params_after == rep.params_before


def _zeroed_twin(dense, pruned, family):
    """The dense model with every removed structure zeroed and each restored W2 put in place."""
    ad = adapter_for(dense)
    twin = copy.deepcopy(dense)
    n, kv, hd = ad.head_geometry(dense.config)
    rep = n // kv
    for bd, bp, bt in zip(ad.blocks(dense), ad.blocks(pruned), ad.blocks(twin)):
        # value channels: kept rows of v_proj are those whose weights survive
        v_d, o_d = ad.value_pair(bd)
        v_p, o_p = ad.value_pair(bp)
        v_t, o_t = ad.value_pair(bt)
        dv = v_p.out_features // kv
        kept_rows = _match_rows(v_d.weight, v_p.weight)
        with torch.no_grad():
            mask = torch.zeros(v_d.out_features, dtype=torch.bool)
            mask[kept_rows] = True
            v_t.weight[~mask] = 0  # removed channel: weights zero, bias kept (it is folded)
            cols = torch.tensor([(h * hd) + (r % hd) for h in range(n) for r in kept_rows
                                 if r // hd == h // rep])
            cols = torch.sort(cols).values
            o_t.weight.zero_()
            o_t.weight[:, cols] = o_p.weight
            if o_t.bias is not None:
                o_t.bias.copy_(o_p.bias)
        assert dv == len(kept_rows) // kv
        ins_d, out_d = ad.mlp_pair(bd)
        ins_p, out_p = ad.mlp_pair(bp)
        ins_t, out_t = ad.mlp_pair(bt)
        kept = _match_rows(ins_d[0].weight, ins_p[0].weight)
        with torch.no_grad():
            mask = torch.zeros(out_d.in_features, dtype=torch.bool)
            mask[kept] = True
            for lt in ins_t:
                lt.weight[~mask] = 0
                if lt.bias is not None:
                    lt.bias[~mask] = 0
            out_t.weight.zero_()
            out_t.weight[:, kept] = out_p.weight
            if out_t.bias is not None:
                out_t.bias.copy_(out_p.bias)
    return twin


def _match_rows(full: torch.Tensor, sub: torch.Tensor) -> list[int]:
    idx = []
    for row in sub:
        hits = torch.nonzero((full == row).all(1)).flatten()
        assert hits.numel() >= 1
        idx.append(int(hits[0]))
    assert idx == sorted(idx)
    return idx


@pytest.mark.parametrize("method", ["wanda-sp", "fasp"])
def test_pruned_equals_zeroed(family, method):
    """Removing structures physically equals zeroing them (and placing restored W2) in the dense model."""
    dense = MAKERS[family]()
    pruned = copy.deepcopy(dense)
    prune(pruned, random_tokens(6, 24), _cfg(sparsity=0.3, method=method))
    twin = _zeroed_twin(dense, pruned, family)
    ev = random_tokens(3, 24, seed=11)
    torch.testing.assert_close(logits(pruned, ev), logits(twin, ev), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(pruned, ev), logits(dense, ev), atol=1e-3)


def _proj_error(W_full, H, W_new, kept):
    """Output error on the calibration data, tr(D H D^T) with D = W - pad(W_new)."""
    D = W_full.detach().double().clone()
    D[:, kept] -= W_new.detach().double()
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))


def test_restoration_lowers_error_every_matrix(family):
    """For every pruned W2, the restored weights fit the calibration outputs better than selection alone."""
    from fasp_ext.pipeline import prune_mlp, prune_values

    torch.manual_seed(0)
    dense = MAKERS[family]()
    ad = adapter_for(dense)
    inputs = capture_block_inputs(dense, ad.blocks(dense), random_tokens(8, 32), 4, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for block in ad.blocks(dense):
        for part in ("attn", "mlp"):
            results = {}
            for method in ("wanda-sp", "fasp"):
                b = copy.deepcopy(block)
                W = (ad.value_pair(b)[1] if part == "attn" else ad.mlp_pair(b)[1]).weight.detach().clone()
                st = Stats.new(W.shape[1], "cpu")
                h = collect(ad.value_pair(b)[1] if part == "attn" else ad.mlp_pair(b)[1], st)
                run_block(b, inputs, keep_outputs=False)
                h.remove()
                cfg = _cfg(sparsity=0.4, method=method, damp=0.0)
                if part == "attn":
                    prune_values(ad, b, dense.config, st, cfg, gen)
                    Wn = ad.value_pair(b)[1].weight
                    kept = _match_cols(W, ad.value_pair(b)[1].weight) if method == "wanda-sp" else results["kept"]
                else:
                    prune_mlp(ad, b, st, cfg, gen)
                    Wn = ad.mlp_pair(b)[1].weight
                    kept = _match_cols(W, Wn) if method == "wanda-sp" else results["kept"]
                Hc = st.H
                if part == "attn" and ad.value_pair(block)[0].bias is not None:
                    # folded v biases: errors compare on inputs without the folded constants
                    Hc = None
                results[method] = (_proj_error(W, st.H, Wn, kept) if Hc is not None else None)
                results["kept"] = kept
            if results["fasp"] is not None:
                assert results["fasp"] < results["wanda-sp"] * 0.999, (part, results)
        inputs.hidden[:] = run_block(block, inputs)


def _match_cols(full, sub):
    return _match_rows(full.t(), sub.t())


def test_save_load_identical_logits(family, tmp_path):
    m = MAKERS[family]()
    rep = prune(m, random_tokens(4, 24), _cfg(sparsity=0.25))
    ev = random_tokens(2, 24, seed=3)
    out = save_pruned(m, tmp_path / "pruned", report=rep.to_dict())
    m2 = load_pruned(out)
    assert torch.equal(logits(m2, ev), logits(m, ev))
    assert count_params(m2) == count_params(m)


def test_narrow_value_heads_take_the_fused_sdpa_path(family, monkeypatch):
    """Value heads narrower than q/k heads: SDPA must see equal head sizes (fused kernel) and give
    the same logits and the same greedy continuation (KV cache) as eager attention."""
    m = MAKERS[family]()
    prune(m, random_tokens(4, 24), _cfg(sparsity=0.25, allocation="error"))
    assert adapter_for(m).value_head_dim(adapter_for(m).blocks(m)[0], m.config) < 16
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ev = random_tokens(2, 24, seed=3)
    m.config._attn_implementation = "sdpa"
    out_sdpa = logits(m, ev)
    gen_sdpa = m.generate(ev[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert seen and all(len(set(s)) == 1 for s in seen)
    m.config._attn_implementation = "eager"
    torch.testing.assert_close(out_sdpa, logits(m, ev), rtol=1e-4, atol=1e-4)
    assert torch.equal(gen_sdpa, m.generate(ev[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_mlp_only_reloads_with_plain_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    m = MAKERS[family]()
    # uniform allocation: every block keeps the same width, an ordinary config
    prune(m, random_tokens(4, 24), _cfg(sparsity=0.25, mlp_only=True, allocation="uniform"))
    assert not hasattr(m.config, "fasp_ext")
    save_pruned(m, tmp_path / "p")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    ev = random_tokens(2, 24, seed=3)
    assert torch.equal(logits(m2, ev), logits(m, ev))


def test_parameter_count_formula(family):
    m = MAKERS[family]()
    c = m.config
    ad = adapter_for(m)
    n, kv, hd = ad.head_geometry(c)
    inter = getattr(c, ad.mlp_size_key)
    before = count_params(m)
    rep = prune(m, random_tokens(4, 24), _cfg(sparsity=0.3))
    dv, k = kept_count(hd, 0.3, 1), kept_count(inter, 0.3, 8)
    H = c.hidden_size
    n_mlp_in = len(ad.mlp_in_names)
    bias = 1 if family == "opt" else 0
    per_block_removed = (
        kv * (hd - dv) * (H + bias)  # v_proj rows (+ bias)
        + n * (hd - dv) * H  # o_proj columns
        + n_mlp_in * (inter - k) * (H + bias)  # fc1 / gate+up rows (+ bias)
        + (inter - k) * H  # fc2 / down columns
    )
    assert rep.params_after == before - c.num_hidden_layers * per_block_removed == count_params(m)


def test_reproducible_with_seed(family):
    outs = []
    for _ in range(2):
        m = MAKERS[family]()
        prune(m, random_tokens(4, 24), _cfg(sparsity=0.3, seed=5))
        outs.append({k: v.clone() for k, v in m.state_dict().items()})
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_one_pass_and_methods_run(family):
    for method in ("fasp", "wanda-sp", "flap", "magnitude", "random"):
        m = MAKERS[family]()
        rep = prune(m, random_tokens(4, 24), _cfg(sparsity=0.3, method=method, one_pass=method == "fasp"))
        assert rep.params_after < rep.params_before
        assert torch.isfinite(logits(m, random_tokens(1, 16))).all()


def test_intercept_option(family):
    m = MAKERS[family]()
    prune(m, random_tokens(4, 24), _cfg(sparsity=0.3, intercept=True))
    assert torch.isfinite(logits(m, random_tokens(1, 16))).all()


def test_kept_count_rounding():
    assert kept_count(1536, 0.2, 8) == 1232
    assert kept_count(64, 0.2, 1) == 51
    assert kept_count(100, 0.0, 8) == 100
    assert kept_count(5, 0.9, 8) == 5 or kept_count(5, 0.9, 8) >= 1


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        prune(tiny_llama(), random_tokens(2, 8), _cfg(sparsity=bad))


def test_bad_inputs():
    m = tiny_llama()
    with pytest.raises(ValueError, match="calibration"):
        prune(m, torch.zeros(0, 8, dtype=torch.long), _cfg())
    with pytest.raises(ValueError, match="calibration"):
        prune(m, "some text", _cfg())
    with pytest.raises(ValueError, match="seqlen"):
        prune(m, random_tokens(1, 200), _cfg())
    with pytest.raises(ValueError, match="method"):
        prune(m, random_tokens(1, 8), _cfg(method="nope"))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture"):
        prune(gpt, random_tokens(1, 8, vocab=50), _cfg())


def test_save_refuses_existing_and_leaves_nothing(tmp_path):
    m = tiny_llama()
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        save_pruned(m, tmp_path / "exists")

    class Boom(Exception):
        pass

    def bad_save(*a, **k):
        raise Boom

    m.save_pretrained = bad_save
    with pytest.raises(Boom):
        save_pruned(m, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_load_pruned_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_pruned(tmp_path / "nothing")


def test_gqa_groups_move_together():
    """With GQA every query head of a group loses the same value channels."""
    for allocation in ("uniform", "flap"):
        m = tiny_llama(kv_heads=2)
        prune(m, random_tokens(4, 24), _cfg(sparsity=0.25, allocation=allocation))
        ad = adapter_for(m)
        n, kv, hd = ad.head_geometry(m.config)
        dvs = [ad.value_pair(b)[0].out_features // kv for b in ad.blocks(m)]
        for b, dv in zip(ad.blocks(m), dvs):
            v, o = ad.value_pair(b)
            assert v.out_features == kv * dv and o.in_features == n * dv
        assert sum(dvs) == len(dvs) * 12 and (allocation == "flap" or set(dvs) == {12})


def test_output_correction_equals_rerunning_the_block(family):
    """Correcting stored block outputs by the down projection's change equals a third forward pass."""
    toks = random_tokens(6, 24)
    a, b = MAKERS[family](), MAKERS[family]()
    prune(a, toks, _cfg(sparsity=0.3))
    prune(b, toks, _cfg(sparsity=0.3, store_budget_bytes=0))  # no stored inputs: the block is re-run
    ev = random_tokens(2, 24, seed=9)
    torch.testing.assert_close(logits(a, ev), logits(b, ev), rtol=1e-4, atol=1e-4)


def test_post_norm_opt_prunes_and_reloads(tmp_path):
    m = tiny_opt(pre_norm=False)
    prune(m, random_tokens(4, 24), _cfg(sparsity=0.3))
    m2 = load_pruned(save_pruned(m, tmp_path / "p"))
    ev = random_tokens(2, 24, seed=3)
    assert torch.equal(logits(m2, ev), logits(m, ev))


@pytest.mark.parametrize("method", ["flap", "fasp-intercept", "depth2"])
def test_bias_fitting_methods_add_biases_and_reload(family, method, tmp_path):
    """FLAP's bias compensation, the intercept fit and depth2's two-step reconstruction give
    bias-less projections (LLaMA) a bias; load_pruned rebuilds it."""
    m = MAKERS[family]()
    cfg = _cfg(sparsity=0.3, intercept=True) if method == "fasp-intercept" else _cfg(sparsity=0.3, method=method)
    prune(m, random_tokens(6, 24), cfg)
    ad = adapter_for(m)
    for b in ad.blocks(m):
        assert ad.mlp_pair(b)[1].bias is not None and ad.value_pair(b)[1].bias is not None
    ev = random_tokens(2, 24, seed=3)
    m2 = load_pruned(save_pruned(m, tmp_path / "p"))
    assert torch.equal(logits(m2, ev), logits(m, ev))


def test_flap_bias_compensation_is_exact_for_constant_inputs():
    """If a removed input is constant over tokens, FLAP's compensation makes its removal exact."""
    from fasp_ext.pipeline import _restore

    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=g)
    X[:, 2] = 3.0  # a constant channel
    W = torch.randn(4, 6, generator=g)
    st = Stats.new(6, "cpu")
    st.add(X)
    kept = torch.tensor([0, 1, 3, 4, 5])
    Wn, bn, _ = _restore(W, None, st, kept, None, _cfg(method="flap"), restore=False)
    torch.testing.assert_close(X[:, kept] @ Wn.t() + bn, X @ W.t(), rtol=1e-5, atol=1e-5)


def _stats_of(X):
    st = Stats.new(X.shape[1], "cpu")
    st.add(X)
    return st


@pytest.mark.parametrize("grouped", [False, True])
def test_depth2_selects_by_the_second_moment_of_each_units_output(grouped):
    """depth2 keeps the units of largest sum over their columns of ||W[:, c]||^2 sum_t x_c^2, i.e. of
    the energy of the unit's contribution to the output, E||W[:, c] x_c||^2."""
    from fasp_ext.pipeline import _select
    from fasp_ext.reference import select_top

    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 12, generator=g) * torch.rand(12, generator=g) * 3
    W = torch.randn(5, 12, generator=g) * torch.rand(12, generator=g)
    st = _stats_of(X)
    groups = torch.arange(12).view(2, 2, 3).permute(0, 2, 1).reshape(6, 2) if grouped else None
    energy = torch.stack([(X[:, c:c + 1] @ W[:, c:c + 1].t()).pow(2).sum() for c in range(12)])
    if grouped:
        energy = energy[groups].sum(1)
    k, seg = (4, 2) if grouped else (7, 1)
    kept = _select(_cfg(method="depth2"), W, st, k, groups, seg, torch.Generator())
    assert torch.equal(kept, select_top(energy, k, seg))


def test_depth2_reconstruction_is_the_intercept_fit():
    """depth2's two-step reconstruction (removed mean into the bias, least squares on the rest) is the
    joint fit of the kept weights and a bias: identical to fasp with intercept=True, and at damp 0
    equal to ordinary least squares with a constant column (torch.linalg.lstsq)."""
    from fasp_ext.pipeline import _restore

    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 8, generator=g, dtype=torch.float64) + torch.rand(8, generator=g, dtype=torch.float64) * 2
    W = torch.randn(3, 8, generator=g, dtype=torch.float64)
    st = _stats_of(X.float())
    kept = torch.tensor([0, 2, 3, 5, 7])
    a = _restore(W.float(), None, st, kept, None, _cfg(method="depth2", damp=0.1), restore=True)
    b = _restore(W.float(), None, st, kept, None, _cfg(method="fasp", intercept=True, damp=0.1), restore=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    Wn, bn, _ = _restore(W.float(), None, st, kept, None, _cfg(method="depth2", damp=0.0), restore=True)
    A = torch.cat([X[:, kept], torch.ones(80, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(A, X @ W.t()).solution.t()
    torch.testing.assert_close(Wn.double(), sol[:, :-1], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(bn.double(), sol[:, -1], rtol=1e-3, atol=1e-3)


def test_default_allocation_is_the_methods_own(family):
    """FASP allocates per block by restored-error curves and FLAP by its own ranking unless told
    otherwise; the baselines prune every block alike. The default run equals an explicit
    allocation='error-am' run; with a per-structure sparsity given, the curves per structure."""
    assert PruneConfig().allocation_kind == "error-am" and PruneConfig(method="flap").allocation_kind == "flap"
    assert PruneConfig(mlp_sparsity=0.3).allocation_kind == "error"
    assert PruneConfig(attn_sparsity=0.1).allocation_kind == "error"
    assert PruneConfig(mlp_sparsity=0.3, allocation="error-am").allocation_kind == "error-am"
    for meth in ("wanda-sp", "depth2", "magnitude", "random"):
        assert PruneConfig(method=meth).allocation_kind == "uniform"
    assert PruneConfig(allocation="uniform").allocation_kind == "uniform"
    a, b = MAKERS[family](), MAKERS[family]()
    toks = random_tokens(6, 24)
    ra = prune(a, toks, _cfg(sparsity=0.3))
    prune(b, toks, _cfg(sparsity=0.3, allocation="error-am"))
    assert ra.allocation == "error-am" and "allocation_forward" in ra.times
    ev = random_tokens(2, 24, seed=3)
    assert torch.equal(logits(a, ev), logits(b, ev))


@pytest.mark.parametrize("selection", ["obs", "spap"])
def test_error_aware_selections_run_end_to_end(family, selection, tmp_path):
    m = MAKERS[family]()
    rep = prune(m, random_tokens(6, 24), _cfg(sparsity=0.3, selection=selection, spap_rounds=3))
    assert all(b["mlp_solver"]["path"] != "none" for b in rep.blocks)
    m2 = load_pruned(save_pruned(m, tmp_path / "p"))
    ev = random_tokens(2, 24, seed=3)
    assert torch.equal(logits(m2, ev), logits(m, ev))
