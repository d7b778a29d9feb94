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
