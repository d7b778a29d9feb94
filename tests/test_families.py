"""Every supported family end to end on tiny random models: the value-pruned attention forward is
the stock forward, pruning gives a model that saves, reloads and computes the same logits, fused
Phi-3 matrices are pruned row by row, and unsupported families are refused from config.json alone.
Also: windows start with BOS when the tokenizer adds one."""

from __future__ import annotations

import json

import pytest
import torch

import fasp_ext
from fasp_ext import data as D
from fasp_ext.adapters import adapter_for, check_supported_config, supported_model_types
from fasp_ext.pipeline import PruneConfig, prune
from tiny_models import FAMILIES, random_tokens, tiny_family, vocab_size


@pytest.mark.parametrize("family", FAMILIES)
def test_value_pruned_forward_is_the_stock_forward(family):
    """With value heads of the full size, the adapter's attention forward (used for pruned value
    heads) computes exactly what the family's own forward does: q/k norms, scaling, RoPE (per layer
    type), sliding windows and soft-capping included."""
    model = tiny_family(family)
    tokens = random_tokens(3, 20, vocab=vocab_size(model))
    with torch.no_grad():
        ref = model(tokens).logits
    a = adapter_for(model)
    _, _, hd = a.head_geometry(model.config)
    for block in a.blocks(model):
        a.set_value_head_dim(a.attention(block), hd)
    with torch.no_grad():
        got = model(tokens).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_save_reload_same_logits(family, tmp_path):
    model = tiny_family(family)
    tokens = random_tokens(6, 24, vocab=vocab_size(model))
    before = fasp_ext.pipeline.count_params(model)
    rep = prune(model, tokens, PruneConfig(sparsity=0.3, allocation="error", progress=False))  # non-uniform per structure
    assert rep.params_after < before
    a = adapter_for(model)
    _, _, hd = a.head_geometry(model.config)
    assert all(b["v_head_dim"] < hd for b in rep.blocks)
    with torch.no_grad():
        ref = model(tokens).logits
    assert torch.isfinite(ref).all()
    fasp_ext.save_pruned(model, tmp_path / "out", None, rep.to_dict())
    again = fasp_ext.load_pruned(tmp_path / "out")
    assert fasp_ext.pipeline.count_params(again) == rep.params_after
    with torch.no_grad():
        got = again(tokens).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_phi3_fused_rows():
    """Phi-3: the kept neurons' gate rows and up rows stay in gate_up_proj (gate half, then up half),
    the query/key rows of qkv_proj are untouched and the kept value rows follow them."""
    model = tiny_family("phi3")
    blk = model.model.layers[0]
    gu, qkv = blk.mlp.gate_up_proj.weight.detach().clone(), blk.self_attn.qkv_proj.weight.detach().clone()
    m = blk.mlp.down_proj.in_features
    prune(model, random_tokens(6, 24), PruneConfig(sparsity=0.25, allocation="uniform", method="wanda-sp",
                                                     progress=False))
    new_gu = blk.mlp.gate_up_proj.weight
    k = blk.mlp.down_proj.in_features
    assert k < m and new_gu.shape[0] == 2 * k
    rows = [int((gu[:m] - r).abs().sum(1).argmin()) for r in new_gu[:k]]
    assert rows == sorted(rows) and len(set(rows)) == k
    torch.testing.assert_close(new_gu[k:], gu[m:][rows])  # up row j goes with gate row j
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    qk = (cfg.num_attention_heads + cfg.num_key_value_heads) * hd
    new_qkv = blk.self_attn.qkv_proj.weight
    torch.testing.assert_close(new_qkv[:qk], qkv[:qk])
    dv = blk.self_attn.v_head_dim
    assert new_qkv.shape[0] == qk + cfg.num_key_value_heads * dv and dv < hd
    for r in new_qkv.detach()[qk:]:  # every kept value row is one of the original value rows
        assert float((qkv[qk:] - r).abs().sum(1).min()) == 0.0


def test_supported_families_listed():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "opt"} <= set(
        supported_model_types())


def test_check_supported_config_before_weights(tmp_path):
    """Refused from config.json alone: a folder whose weights are garbage never gets them read."""
    assert check_supported_config({"model_type": "gemma3_text"}) == "gemma3_text"
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (folder / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        check_supported_config(folder)
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        check_supported_config(folder / "config.json")
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3"}))  # the multimodal Gemma 3
    assert check_supported_config(folder) == "gemma3"
    (folder / "config.json").write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(ValueError, match="model_type"):
        check_supported_config(folder)
    with pytest.raises(FileNotFoundError):
        check_supported_config(tmp_path / "nothing")
    from fasp_ext import models

    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        models.load_model(str(folder))


# ---------------------------------------------------------------------------------------------- BOS
def _tokenizer(adds_bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(1000)}
    vocab.update({"[UNK]": 1000, "<bos>": 1001})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1001)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<bos>")


def _text(n):
    return " ".join(f"t{i}" for i in range(n))


def test_bos_token_modes():
    assert D.bos_token(_tokenizer(True), "auto") == 1001
    assert D.bos_token(_tokenizer(False), "auto") is None
    assert D.bos_token(_tokenizer(False), "always") == 1001
    assert D.bos_token(_tokenizer(True), "never") is None
    with pytest.raises(ValueError, match="bos"):
        D.bos_token(_tokenizer(True), "sometimes")


def test_eval_windows_start_with_bos():
    tok = _tokenizer(True)
    w = D.eval_windows(tok, _text(100), seqlen=10)
    assert w.shape == (11, 10)  # 100 text tokens // 9 per window
    assert (w[:, 0] == 1001).all()
    assert w[:, 1:].reshape(-1).tolist() == list(range(99))  # every text token once, in order
    plain = D.eval_windows(tok, _text(100), seqlen=10, bos="never")
    assert plain[0, 0] == 1001 and plain.reshape(-1)[1:].tolist() == list(range(99))  # old behaviour
    # a tokenizer without BOS: auto is the old behaviour
    assert D.eval_windows(_tokenizer(False), _text(100), 10).reshape(-1).tolist() == list(range(100))


def test_calibration_windows_start_with_bos():
    tok = _tokenizer(True)
    w = D.calibration_windows(tok, _text(200), nsamples=5, seqlen=12, seed=3)
    assert w.shape == (5, 12) and (w[:, 0] == 1001).all()
    for row in w[:, 1:]:  # 11 consecutive text tokens
        assert row.tolist() == list(range(int(row[0]), int(row[0]) + 11))
    w2 = D.calibration_windows(_tokenizer(False), _text(200), nsamples=5, seqlen=12, seed=3)
    assert (w2[:, 0] != 1001).all() and all(
        r.tolist() == list(range(int(r[0]), int(r[0]) + 12)) for r in w2)


def test_multimodal_gemma3_prunes_the_language_model_only(tmp_path):
    """Gemma3ForConditionalGeneration: the text blocks are pruned from text-only calibration; the
    vision tower and projector are untouched, and the pruned model (reloaded too) still reads an
    image."""
    from fasp_ext.io import load_pruned, save_pruned

    model = tiny_family("gemma3")
    cfg = model.config
    keep = {k: v.clone() for k, v in model.state_dict().items() if "language_model" not in k and "lm_head" not in k}
    assert any(k.startswith("model.vision_tower.") for k in keep)
    prune(model, random_tokens(6, 24, vocab=vocab_size(model)), PruneConfig(sparsity=0.3, allocation="error", progress=False))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in keep.items())
    blocks = adapter_for(model).blocks(model)
    assert all(b.mlp.down_proj.in_features < cfg.text_config.intermediate_size for b in blocks)
    # one image: its tokens between the boundary tokens, as the processor lays them out
    n_img = cfg.mm_tokens_per_image
    ids = torch.tensor([[5, 6, cfg.boi_token_index] + [cfg.image_token_index] * n_img + [cfg.eoi_token_index, 7, 8]])
    pixels = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == cfg.image_token_index).long()).logits
    assert torch.isfinite(ref).all()
    save_pruned(model, tmp_path / "out")
    again = load_pruned(tmp_path / "out")
    with torch.no_grad():
        got = again(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == cfg.image_token_index).long()).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
