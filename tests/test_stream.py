"""The stream check: the hidden states the pipeline hands to block i equal what the pruned model
itself computes at block i, for every supported family and for mixed-layer configs.

The reference is the pruned model's own forward (``output_hidden_states=True``); a pipeline that
reused block 0's arguments for every block, or corrected outputs linearly through a normalised
sublayer, fails it (tiny models with sliding windows shorter than the sequences make the layer
types differ).
"""

from __future__ import annotations

import pytest
import torch

from fasp_ext.pipeline import PruneConfig, prune
from tiny_models import FAMILIES, random_tokens, tiny_family, vocab_size

N, SEQ, BATCH = 5, 24, 2  # a last batch smaller than the others exercises per-shape arguments


def _record_block_inputs(model, blocks):
    """Pre-hooks recording every hidden-state input each block receives, in call order."""
    seen = [[] for _ in blocks]
    handles = []
    for i, b in enumerate(blocks):
        def hook(_m, args, kwargs, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            seen[i].append(h.detach().clone())
        handles.append(b.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _model_stream(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states


def _check_stream(family, cfg_kwargs):
    from fasp_ext.adapters import adapter_for

    model = tiny_family(family)
    tokens = random_tokens(N, SEQ, vocab=vocab_size(model))
    blocks = adapter_for(model).blocks(model)
    nb = -(-N // BATCH)
    seen, handles = _record_block_inputs(model, blocks)
    try:
        prune(model, tokens, PruneConfig(sparsity=0.3, batch_size=BATCH, progress=False, **cfg_kwargs))
    finally:
        for h in handles:
            h.remove()
    ref = _model_stream(model, tokens)
    errs = []
    for i in range(len(blocks)):
        # the last full pass over the calibration batches is the stream the pipeline handed to block i
        got = torch.cat(seen[i][-nb:], 0)
        errs.append(_rel(got, ref[i]))
    return errs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("allocation", ["uniform", "flap", "error", "error-am"])
def test_stream_matches_pruned_model(family, allocation):
    errs = _check_stream(family, {"allocation": allocation})
    assert max(errs) < 1e-5, f"{family}: relative stream error per block {errs}"


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "gemma2"])
def test_stream_mlp_only_and_wanda(family):
    assert max(_check_stream(family, {"mlp_only": True, "allocation": "uniform"})) < 1e-5
    assert max(_check_stream(family, {"method": "wanda-sp"})) < 1e-5


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "phi3"])
def test_one_pass_stream_is_the_dense_model(family):
    """One-pass mode hands every block the dense model's stream, with that block's own arguments."""
    model = tiny_family(family)
    tokens = random_tokens(N, SEQ, vocab=vocab_size(model))
    ref = _model_stream(model, tokens)
    from fasp_ext.adapters import adapter_for

    blocks = adapter_for(model).blocks(model)
    seen, handles = _record_block_inputs(model, blocks)
    try:
        prune(model, tokens, PruneConfig(sparsity=0.3, batch_size=BATCH, progress=False, one_pass=True,
                                         allocation="uniform"))
    finally:
        for h in handles:
            h.remove()
    for i in range(len(blocks)):
        assert _rel(torch.cat(seen[i], 0), ref[i]) < 1e-5, i


def test_blocks_get_their_own_arguments():
    """Mixed layers really differ here: block 1 of the tiny Qwen2 (sliding window) run with block 0's
    arguments (full attention) gives another output, so the check above can fail."""
    from fasp_ext.calibration import capture_block_inputs, run_block

    model = tiny_family("qwen2")
    tokens = random_tokens(N, SEQ, vocab=vocab_size(model))
    blocks = model.model.layers
    ref = _model_stream(model, tokens)
    inputs = capture_block_inputs(model, blocks, tokens, BATCH, torch.device("cpu"))
    assert _rel(torch.cat(inputs.hidden, 0), ref[0]) < 1e-6
    ref1 = inputs.with_hidden([ref[1][i:i + BATCH] for i in range(0, N, BATCH)])
    own = torch.cat(run_block(blocks[1], ref1.at(1)), 0)
    wrong = torch.cat(run_block(blocks[1], ref1.at(0)), 0)
    assert _rel(own, ref[2]) < 1e-5
    assert _rel(wrong, ref[2]) > 1e-3


def _count_attention_inputs(model, adapter):
    """Count the calls of every linear layer inside each attention module except its output
    projection (the work a replayed attention skips), hooking the layers a block holds each time it
    runs (pruning replaces them); also how many such layers a block has."""
    count, hooked, handles = [0], set(), []

    def lins(b):
        o = adapter.value_pair(b)[1]
        return [m for m in adapter.attention(b).modules() if isinstance(m, torch.nn.Linear) and m is not o]

    def arm(block, *_):
        for m in lins(block):
            if id(m) not in hooked:
                hooked.add(id(m))
                handles.append(m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1)))

    blocks = adapter.blocks(model)
    handles += [b.register_forward_pre_hook(arm) for b in blocks]
    return count, handles, len(lins(blocks[0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_later_passes_replay_the_pruned_attention(family):
    """Once a block's attention is pruned, sequential mode never recomputes it: the MLP pass (and the
    propagation pass of families whose output cannot be corrected linearly) replay the pruned output
    projection on the stored inputs, and the result equals recomputing it (nothing stored)."""
    from fasp_ext.adapters import adapter_for

    tokens = random_tokens(N, SEQ, vocab=vocab_size(tiny_family(family)))
    nb = -(-N // BATCH)
    calls, last = {}, {}
    for budget in (2 << 30, 0):  # 0: nothing may be stored, so every pass recomputes the block
        model = tiny_family(family)
        ad = adapter_for(model)
        count, handles, k = _count_attention_inputs(model, ad)
        n_blocks = len(ad.blocks(model))
        try:
            prune(model, tokens, PruneConfig(sparsity=0.3, batch_size=BATCH, progress=False,
                                             allocation="uniform", store_budget_bytes=budget))
        finally:
            for h in handles:
                h.remove()
        calls[budget], last[budget] = count[0], _model_stream(model, tokens)[-1]
    one_pass_each = n_blocks * nb * k
    # the statistics pass of each block, plus at most two checking calls (once per forward function)
    assert calls[2 << 30] <= one_pass_each + 2 * k, (calls, one_pass_each)
    assert calls[0] >= 2 * one_pass_each, (calls, one_pass_each)
    assert _rel(last[2 << 30], last[0]) < 1e-5


def test_replay_mismatch_falls_back_to_the_real_attention(monkeypatch, caplog):
    """Stored inputs that do not reproduce the attention are caught on the first call: the real
    output is returned, a warning names the forward, and that forward is never replayed."""
    from fasp_ext import calibration
    from fasp_ext.calibration import capture_block_inputs, replay_attention, run_block

    monkeypatch.setattr(calibration, "_REPLAY_ARITY", {})
    model = tiny_family("llama")
    tokens = random_tokens(N, SEQ, vocab=vocab_size(model))
    blocks = model.model.layers
    inputs = capture_block_inputs(model, blocks, tokens, BATCH, torch.device("cpu")).at(0)
    want = run_block(blocks[0], inputs)
    attn = blocks[0].self_attn
    junk = [torch.randn(h.shape[0], h.shape[1], attn.o_proj.in_features) for h in inputs.hidden]
    with caplog.at_level("WARNING", logger="fasp_ext"), replay_attention(attn, "o_proj", junk, None):
        got = run_block(blocks[0], inputs)
    assert "forward" not in attn.__dict__  # the stock forward is back
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert list(calibration._REPLAY_ARITY.values()) == [None]
    assert "attention replay does not match" in caplog.text


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_pass_never_runs_the_dense_down_projection(family):
    """Where the MLP output is added to the residual stream as it is, the sequential MLP pass stops at
    the down projection's input and the block outputs are h + down'(z[:, kept]) (exact: the stream
    check above), so the dense down projection never runs; elsewhere (Gemma 2/3) it runs in the MLP
    pass and the pruned block runs again."""
    from fasp_ext.adapters import adapter_for

    model = tiny_family(family)
    ad = adapter_for(model)
    blocks = ad.blocks(model)
    tokens = random_tokens(N, SEQ, vocab=vocab_size(model))
    calls = [0]
    handles = [ad.mlp_pair(b)[1].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for b in blocks]
    try:
        prune(model, tokens, PruneConfig(sparsity=0.3, batch_size=BATCH, progress=False, allocation="uniform"))
    finally:
        for h in handles:
            h.remove()
    nb = -(-N // BATCH)
    if ad.mlp_norm(blocks[0]) is not None and ad.is_pre_norm(model.config):
        assert calls[0] == 0
    else:
        assert calls[0] == len(blocks) * nb


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 7, 12), (21, 12)])
def test_kept_linear_is_the_projection_of_the_kept_columns(bias, shape):
    """The padded-weight GEMM the MLP pass and the attention replay use equals proj(z[..., cols])."""
    from fasp_ext.calibration import kept_linear

    g = torch.Generator().manual_seed(0)
    z = torch.randn(*shape, generator=g)
    cols = torch.tensor([0, 2, 3, 7, 11])
    proj = torch.nn.Linear(len(cols), 5, bias=bias)
    want = proj(z[..., cols])
    torch.testing.assert_close(kept_linear(proj, cols, shape[-1])(z), want, rtol=1e-6, atol=1e-6)
    assert kept_linear(proj, None, shape[-1]) is proj
