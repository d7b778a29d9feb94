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
from tiny_models import FAMILIES, random_tokens, tiny_family

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
    tokens = random_tokens(N, SEQ, vocab=model.config.vocab_size)
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
@pytest.mark.parametrize("allocation", ["uniform", "flap"])
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
    tokens = random_tokens(N, SEQ, vocab=model.config.vocab_size)
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
    tokens = random_tokens(N, SEQ, vocab=model.config.vocab_size)
    blocks = model.model.layers
    ref = _model_stream(model, tokens)
    inputs = capture_block_inputs(model, blocks, tokens, BATCH, torch.device("cpu"))
    assert _rel(torch.cat(inputs.hidden, 0), ref[0]) < 1e-6
    ref1 = inputs.with_hidden([ref[1][i:i + BATCH] for i in range(0, N, BATCH)])
    own = torch.cat(run_block(blocks[1], ref1.at(1)), 0)
    wrong = torch.cat(run_block(blocks[1], ref1.at(0)), 0)
    assert _rel(own, ref[2]) < 1e-5
    assert _rel(wrong, ref[2]) > 1e-3
