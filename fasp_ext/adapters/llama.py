"""LLaMA and the LLaMA-shaped families with grouped-query attention (Mistral, Qwen2, Qwen3), and
Gemma 2 / Gemma 3 (text), which add normalised sublayer outputs, soft-capping and q/k norms."""

from __future__ import annotations

import sys

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .base import Adapter, attend


def _family_module(attn):
    """The transformers modeling module of ``attn``'s class: its own rotary and eager attention."""
    return sys.modules[type(attn).__module__]


class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    mlp_size_key = "intermediate_size"
    attn_name = "self_attn"
    v_name, o_name = "v_proj", "o_proj"
    mlp_prefix = "mlp"
    mlp_in_names = ("gate_proj", "up_proj")
    mlp_out_name = "down_proj"
    #: the family's attention passes ``softcap=self.attn_logit_softcapping`` to the kernel (Gemma 2)
    passes_softcap = False
    #: the family's attention always passes ``sliding_window`` (None on global layers)
    always_passes_window = False

    def blocks(self, model):
        return model.model.layers

    @staticmethod
    def value_pruned_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                             past_key_values=None, **kwargs):
        """The stock attention forward of the family with value heads of size ``self.v_head_dim``
        (q/k norms, query scaling, sliding window and soft-capping as the stock forward has them)."""
        mod = _family_module(self)
        adapter = self._fasp_adapter
        input_shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim)
        k = self.k_proj(hidden_states).view(*input_shape, -1, self.head_dim)
        if getattr(self, "q_norm", None) is not None:  # Qwen3, Gemma 3 (RMSNorm over the head dim)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.v_head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          mod.eager_attention_forward)
        extra = {}
        window = getattr(self, "sliding_window", None)
        if window is not None or adapter.always_passes_window:
            extra["sliding_window"] = window
        if adapter.passes_softcap:
            extra["softcap"] = self.attn_logit_softcapping
        out, weights = attend(self, interface, q, k, v, attention_mask,
                              dropout=0.0 if not self.training else self.attention_dropout,
                              scaling=self.scaling, **extra, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class GemmaNormAdapter(LlamaAdapter):
    """Gemma 2 and Gemma 3 (text): both sublayer outputs are RMS-normalised before the residual add
    (``post_attention_layernorm``, ``post_feedforward_layernorm``), so a block's output cannot be
    corrected linearly from a projection's change: the pipeline runs the block again. Sliding-window
    and global layers alternate (their masks and RoPE bases come per block from the model)."""

    mlp_is_residual_branch = False
    always_passes_window = True
    attn_out_norm_name = "post_attention_layernorm"
    mlp_out_norm_name = "post_feedforward_layernorm"


class Gemma2Adapter(GemmaNormAdapter):
    model_types = ("gemma2",)
    passes_softcap = True  # attention logits soft-capped inside the kernel (final logits by the model)


class Gemma3TextAdapter(GemmaNormAdapter):
    """Gemma 3 text models (``Gemma3ForCausalLM``, e.g. Gemma3-270M): q/k RMS norms, local layers
    with their own RoPE base."""

    model_types = ("gemma3_text",)


class Gemma3Adapter(Gemma3TextAdapter):
    """The language model inside the multimodal Gemma 3 (``Gemma3ForConditionalGeneration``, model
    type ``gemma3``: Gemma 3 4B/12B/27B): its text blocks are pruned as Gemma 3 text blocks, from
    text-only calibration; the vision tower and the projector are kept as they are."""

    model_types = ("gemma3",)

    def blocks(self, model):
        return model.model.language_model.layers

    def lm_config(self, config):
        return getattr(config, "text_config", None) or config
