"""Tiny random-weight OPT and LLaMA-GQA models built locally (no hub)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM


def tiny_llama(seed: int = 0, vocab: int = 97, kv_heads: int = 2, attn_impl: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                      max_position_embeddings=128, tie_word_embeddings=False)
    cfg._attn_implementation = attn_impl
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(seed: int = 0, vocab: int = 97, attn_impl: str = "sdpa", pre_norm: bool = True) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=64, do_layer_norm_before=pre_norm)
    cfg._attn_implementation = attn_impl
    m = OPTForCausalLM(cfg).eval()
    with torch.no_grad():  # random non-zero biases so bias handling is exercised
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return m


def random_tokens(n: int, seqlen: int, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


# ---- one tiny random model per supported family (tests/test_families.py, tests/test_stream.py)
def _family_config(family: str, attn_impl: str):
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False)
    if family == "llama":
        cfg = tf.LlamaConfig(**common)
    elif family == "mistral":  # one sliding window for every layer
        cfg = tf.MistralConfig(**common, sliding_window=6)
    elif family == "qwen2":  # mixed: full attention in layer 0, sliding windows above (max_window_layers)
        cfg = tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    elif family == "qwen3":  # q/k norms, mixed layer types
        cfg = tf.Qwen3Config(**common, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    elif family == "gemma2":  # alternating local/global, soft-capping, post-norms, query_pre_attn_scalar
        cfg = tf.Gemma2Config(**common, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                              final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh")
        attn_impl = "eager"  # transformers refuses SDPA with attention soft-capping
    elif family == "gemma3_text":  # q/k norms, local layers with their own RoPE base, post-norms
        cfg = tf.Gemma3TextConfig(**common, sliding_window=6, query_pre_attn_scalar=24,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 10.0}})
    elif family == "gemma3":  # the multimodal Gemma 3: the text model above inside, plus a tiny vision tower
        text = _family_config("gemma3_text", attn_impl).to_dict()
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                              boi_token_index=94, eoi_token_index=95, image_token_index=96)
    elif family == "phi3":  # fused qkv_proj and gate_up_proj, partial rotary
        kw = dict(common)
        kw.pop("head_dim")
        cfg = tf.Phi3Config(**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.5})
    elif family == "opt":
        return None
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn_impl
    return cfg


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3", "opt")


def tiny_family(family: str, seed: int = 0, attn_impl: str = "sdpa"):
    """A tiny random-weight causal LM of ``family`` (3 blocks, GQA where the family has it); the
    sliding windows (6 tokens) are shorter than the test sequences, so mixed layers differ."""
    import transformers as tf

    if family == "opt":
        return tiny_opt(seed, attn_impl=attn_impl)
    cfg = _family_config(family, attn_impl)
    torch.manual_seed(seed)
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms away from their init values, so each one matters
        for n, p in m.named_parameters():
            if "norm" in n and p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            if any(k in n for k in ("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(8.0)  # attention logits of order 10: soft-capping and scaling matter
    return m


def vocab_size(model) -> int:
    """Token ids random test windows may use: the vocabulary, less a multimodal model's image and
    image-boundary tokens (the tiny Gemma 3 puts them at the top)."""
    cfg = model.config
    if hasattr(cfg, "text_config"):
        return min(cfg.boi_token_index, cfg.eoi_token_index, cfg.image_token_index)
    return cfg.vocab_size
