"""attn_unit="head": whole kv-head groups removed (their q, k and v rows and o_proj columns), o_proj
restored over the kept groups' columns. Exact identities: sparsity 0 changes nothing, a removed group
is a zeroed group, the restoration is the reference least-squares solve, save + load_pruned and
lazy (block by block) pruning give the same model, sdpa and eager the same logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fasp_ext.adapters import adapter_for
from fasp_ext.allocation import _unit_params
from fasp_ext.io import load_pruned, save_pruned
from fasp_ext.lazy import prune_checkpoint
from fasp_ext.pipeline import PruneConfig, prune
from tiny_models import random_tokens, tiny_family, vocab_size

HEAD_FAMILIES = ("llama", "qwen2", "qwen3", "gemma3_text", "gemma3", "opt")


def _logits(m, x):
    with torch.no_grad():
        return m(x).logits


def _attn_only(**kw):
    """Attention only, every block alike, so which groups went is the selection's alone."""
    kw.setdefault("allocation", "uniform")
    return PruneConfig(attn_unit="head", mlp_sparsity=0.0, attn_sparsity=0.5, progress=False, **kw)


def _kv_heads(m):
    a = adapter_for(m)
    lm = a.lm_config(m.config)
    return [a.block_heads(b, lm) for b in a.blocks(m)]


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_sparsity_zero_changes_nothing(family):
    m = tiny_family(family)
    ref = copy.deepcopy(m)
    toks = random_tokens(4, 24, vocab_size(m))
    rep = prune(m, toks, PruneConfig(sparsity=0.0, attn_unit="head", progress=False))
    assert rep.params_after == rep.params_before
    sd, sd_ref = m.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    assert not hasattr(m.config, "fasp_ext")


def _zero_removed_groups(adapter, model, blocks_kept):
    """The dense ``model`` with every removed kv-head group zeroed: its q, k and v rows (and the q/k
    biases); where o_proj has no bias the group's o_proj columns and v biases too. Where o_proj has a
    bias (OPT) the v biases and o_proj columns stay: a group whose values are the constant v bias
    feeds o_proj exactly what the pruning folds into o_proj's bias."""
    lm = adapter.lm_config(model.config)
    hd = adapter.head_geometry(lm)[2]
    for block, kept in zip(adapter.blocks(model), blocks_kept):
        a = adapter.attention(block)
        n, kv = adapter.block_heads(block, lm)
        rep = n // kv
        q, k, v, o = (getattr(a, x) for x in (adapter.q_name, adapter.k_name, adapter.v_name, adapter.o_name))
        with torch.no_grad():
            for g in sorted(set(range(kv)) - set(kept)):
                qs, ks = slice(g * rep * hd, (g + 1) * rep * hd), slice(g * hd, (g + 1) * hd)
                for lin, rows in ((q, qs), (k, ks), (v, ks)):
                    lin.weight[rows] = 0
                    if lin.bias is not None and (lin is not v or o.bias is None):
                        lin.bias[rows] = 0
                if o.bias is None:
                    o.weight[:, qs] = 0


@pytest.mark.parametrize("family, one_pass", [(f, False) for f in HEAD_FAMILIES] + [("llama", True)])
def test_a_removed_group_is_a_zeroed_group(family, one_pass):
    """No restoration (wanda-sp): the pruned model computes what the dense one with the removed
    groups zeroed computes (sequential mode replays the pruned attention from its stored inputs)."""
    m = tiny_family(family)
    dense = copy.deepcopy(m)
    V = vocab_size(m)
    rep = prune(m, random_tokens(8, 24, V), _attn_only(method="wanda-sp", one_pass=one_pass))
    kept = [b["kept_kv_heads"] for b in rep.blocks]
    heads = _kv_heads(dense)
    assert all(len(k) == max(1, round(kv * 0.5)) for k, (_, kv) in zip(kept, heads))
    assert _kv_heads(m) == [(len(k) * n // kv, len(k)) for k, (n, kv) in zip(kept, heads)]
    adapter = adapter_for(dense)
    _zero_removed_groups(adapter, dense, kept)
    x = random_tokens(2, 20, V, seed=5)
    torch.testing.assert_close(_logits(m, x), _logits(dense, x), rtol=1e-5, atol=1e-5)


def test_restoration_is_the_reference_least_squares_solve():
    """Block 0 sees the dense stream: its o_proj is W' = W_S + W_R H_RS (H_SS + lam I)^-1 over the
    kept groups' columns, H the Gram of o_proj's dense inputs, lam = damp * mean(diag H_SS)."""
    m = tiny_family("llama")
    dense = copy.deepcopy(m)
    toks = random_tokens(8, 24)
    X = []
    o = adapter_for(dense).attention(adapter_for(dense).blocks(dense)[0]).o_proj
    h = o.register_forward_hook(lambda mod, args, out: X.append(args[0].reshape(-1, args[0].shape[-1])))
    _logits(dense, toks)
    h.remove()
    X = torch.cat(X).double()
    H = X.t() @ X
    rep = prune(m, toks, _attn_only(damp=0.1))
    kept_g = rep.blocks[0]["kept_kv_heads"]
    n, kv, hd = 4, 2, 16
    cols = torch.cat([torch.arange(g * (n // kv) * hd, (g + 1) * (n // kv) * hd) for g in kept_g])
    removed = torch.tensor(sorted(set(range(n * hd)) - set(cols.tolist())))
    W = o.weight.double()
    Hss = H[cols][:, cols]
    lam = 0.1 * float(Hss.diagonal().mean())
    ref = W[:, cols] + torch.linalg.solve(Hss + lam * torch.eye(len(cols), dtype=torch.float64),
                                          (W[:, removed] @ H[removed][:, cols]).t()).t()
    got = adapter_for(m).attention(adapter_for(m).blocks(m)[0]).o_proj.weight.double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # the q, k and v rows of the kept groups are the dense ones
    a0, d0 = adapter_for(m).attention(adapter_for(m).blocks(m)[0]), adapter_for(dense).attention(
        adapter_for(dense).blocks(dense)[0])
    rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in kept_g])
    assert torch.equal(a0.k_proj.weight, d0.k_proj.weight[rows]) and torch.equal(a0.v_proj.weight, d0.v_proj.weight[rows])
    assert torch.equal(a0.q_proj.weight, d0.q_proj.weight[cols])


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_save_and_load_pruned_give_the_same_logits_in_sdpa_and_eager(tmp_path, family):
    m = tiny_family(family)
    V = vocab_size(m)
    rep = prune(m, random_tokens(8, 24, V), PruneConfig(sparsity=0.4, attn_unit="head", progress=False))
    heads = _kv_heads(m)
    assert heads != _kv_heads(tiny_family(family))  # some group went
    x = random_tokens(2, 20, V, seed=5)
    ref = _logits(m, x)
    save_pruned(m, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["fasp_ext"]
    assert list(zip(meta["num_attention_heads"], meta["num_key_value_heads"])) == heads
    assert [b["num_kv_heads"] for b in rep.blocks] == [h[1] for h in heads]
    for impl in ("eager", "sdpa"):
        back = load_pruned(tmp_path / "out")
        for c in (back.config, getattr(back.config, "text_config", None)):
            if c is not None:
                c._attn_implementation = impl
        assert _kv_heads(back) == heads
        torch.testing.assert_close(_logits(back, x), ref, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # the KV cache runs with per-layer kv heads
            full = back.generate(x[:1, :6], max_new_tokens=5, do_sample=False)
            step = back(full[:, :-1]).logits[:, -1].argmax(-1)
        assert int(step) == int(full[0, -1])


def test_error_am_allocates_in_groups_and_counts_parameters_exactly():
    """The default allocation decides kept kv heads per block (the curves are over group counts); one
    group's parameters are what removing it frees."""
    m = tiny_family("qwen2")  # q/k/v biases
    a = adapter_for(m)
    lm = a.lm_config(m.config)
    unit = _unit_params(a, a.blocks(m)[0], lm, "attn", "head")
    rep = prune(m, random_tokens(8, 24), _attn_only())
    assert rep.params_before - rep.params_after == unit * len(a.blocks(m))  # one group of two per block
    m = tiny_family("llama")
    rep = prune(m, random_tokens(8, 24), PruneConfig(sparsity=0.4, attn_unit="head", progress=False))
    assert rep.allocation == "error-am"
    assert all(1 <= b["num_kv_heads"] <= 2 for b in rep.blocks)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_lazy_equals_in_memory(tmp_path, family):
    tiny_family(family).save_pretrained(tmp_path / "src", max_shard_size="30KB")
    toks = random_tokens(4, 24)
    cfg = lambda: PruneConfig(sparsity=0.4, attn_unit="head", progress=False)  # noqa: E731
    rep = prune_checkpoint(tmp_path / "src", tmp_path / "lazy", toks, cfg())
    m = tiny_family(family)
    mem = prune(m, toks, cfg())
    save_pruned(m, tmp_path / "mem")
    a, b = load_pruned(tmp_path / "lazy").state_dict(), load_pruned(tmp_path / "mem").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rep["params_after"] == mem.params_after < mem.params_before
    assert [x["num_kv_heads"] for x in rep["blocks"]] == [x["num_kv_heads"] for x in mem.blocks]


def test_bad_values_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="attn_unit must be one of channel, head"):
        PruneConfig(attn_unit="heads").validate()
    with pytest.raises(ValueError, match="attn_multiple"):
        PruneConfig(attn_unit="head", attn_multiple=8).validate()
    m = tiny_family("phi3")
    with pytest.raises(ValueError, match="attn_unit='head' is not supported for phi3"):
        prune(m, random_tokens(4, 24), PruneConfig(attn_unit="head", progress=False))
    # MLP-only runs never touch the attention: allowed on Phi-3 too
    prune(m, random_tokens(4, 24), PruneConfig(attn_unit="head", mlp_only=True, allocation="uniform",
                                               progress=False))


def test_load_refuses_head_counts_that_are_not_whole_groups(tmp_path):
    from fasp_ext.safety import UserError

    m = tiny_family("llama")
    prune(m, random_tokens(8, 24), _attn_only())
    save_pruned(m, tmp_path / "out")
    cfg_path = tmp_path / "out" / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["fasp_ext"]["num_attention_heads"][0] = 3  # 3 query heads on 1 kv head of a 4/2 model
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="num_attention_heads\\[0\\] = 3"):
        load_pruned(tmp_path / "out")


def test_cli_attn_unit(tmp_path, capsys):
    from fasp_ext.cli import main
    from test_cli import _tokenizer, WORDS

    src = tmp_path / "model"
    tiny_family("llama").save_pretrained(src)
    _tokenizer().save_pretrained(src)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, WORDS, (3000,), generator=g).tolist()
    (tmp_path / "calib.txt").write_text(" ".join(f"w{i}" for i in ids))
    args = ["prune", "--model", str(src), "--calib", str(tmp_path / "calib.txt"), "--nsamples", "4",
            "--seqlen", "32", "--quiet", "--sparsity", "0.4"]
    with pytest.raises(SystemExit) as e:  # argparse's own refusal of a value outside the choices
        main(args + ["--out", str(tmp_path / "bad"), "--attn-unit", "heads"])
    assert e.value.code == 2
    assert "--attn-unit" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(args + ["--out", str(tmp_path / "out"), "--attn-unit", "head"]) == 0
    rep = json.loads((tmp_path / "out" / "fasp_report.json").read_text())
    back = load_pruned(tmp_path / "out")
    assert [b["num_kv_heads"] for b in rep["blocks"]] == [h[1] for h in _kv_heads(back)]
    assert back.config.fasp_ext["num_key_value_heads"] != [2, 2, 2]
