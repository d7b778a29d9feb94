"""OPT (OPTForCausalLM): fc1/fc2 MLP, v_proj/out_proj with biases."""

from __future__ import annotations

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .base import Adapter, attend


class OPTAdapter(Adapter):
    model_types = ("opt",)
    mlp_size_key = "ffn_dim"
    attn_name = "self_attn"
    v_name, o_name = "v_proj", "out_proj"
    mlp_prefix = ""
    mlp_in_names = ("fc1",)
    mlp_out_name = "fc2"
    mlp_norm_name = "final_layer_norm"

    def blocks(self, model):
        return model.model.decoder.layers

    def is_pre_norm(self, config) -> bool:
        # OPT-350m normalises after the residual add; the others before (do_layer_norm_before)
        return bool(getattr(config, "do_layer_norm_before", True))

    def set_head_counts(self, attn, n_heads: int, n_kv: int) -> None:
        attn.num_heads = int(n_heads)  # OPT's forward reshapes with num_heads (no grouped-query attention)

    def head_geometry(self, config):
        n = config.num_attention_heads
        return n, n, config.hidden_size // n

    @staticmethod
    def value_pruned_forward(self, hidden_states, past_key_values=None, attention_mask=None,
                             output_attentions=False, **kwargs):
        """The stock OPT attention forward with value heads of size ``self.v_head_dim``."""
        from transformers.models.opt.modeling_opt import eager_attention_forward

        bsz, tgt_len, _ = hidden_states.size()
        q = (self.q_proj(hidden_states) * self.scaling).view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, -1, self.num_heads, self.v_head_dim).transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(self, interface, q, k, v, attention_mask,
                              dropout=0.0 if not self.training else self.dropout, scaling=1.0, **kwargs)
        out = out.reshape(bsz, tgt_len, -1).contiguous()
        return self.out_proj(out), weights
