"""LLaMA and the LLaMA-shaped families with grouped-query attention (Mistral, Qwen2, Qwen3)."""

from __future__ import annotations

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .base import Adapter, attend


class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    mlp_size_key = "intermediate_size"
    attn_name = "self_attn"
    v_name, o_name = "v_proj", "o_proj"
    mlp_prefix = "mlp"
    mlp_in_names = ("gate_proj", "up_proj")
    mlp_out_name = "down_proj"

    def blocks(self, model):
        return model.model.layers

    @staticmethod
    def value_pruned_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                             past_key_values=None, **kwargs):
        """The stock LLaMA/Qwen attention forward with value heads of size ``self.v_head_dim``."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        input_shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim)
        k = self.k_proj(hidden_states).view(*input_shape, -1, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.v_head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        extra = {}
        if getattr(self, "sliding_window", None) is not None:
            extra["sliding_window"] = self.sliding_window
        out, weights = attend(self, interface, q, k, v, attention_mask,
                              dropout=0.0 if not self.training else self.attention_dropout,
                              scaling=self.scaling, **extra, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights



