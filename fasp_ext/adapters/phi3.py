"""Phi-3 (Phi3ForCausalLM): fused ``qkv_proj`` and ``gate_up_proj``.

The pruned units live inside the fused matrices: a value channel is a row of the value part of
``qkv_proj`` (after the query and key rows), an MLP neuron is row j of the gate half and row
I + j of the up half of ``gate_up_proj``. The pipeline sees them through row views and the
adapter writes the fused matrices back whole, so the saved checkpoint keeps Phi-3's layout.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .base import Adapter, attend, new_linear


class RowView:
    """Rows ``start:stop`` of a linear layer, looking like an nn.Linear to the pipeline (weight, bias,
    in/out features, device) without copying anything."""

    def __init__(self, lin: nn.Linear, start: int, stop: int):
        self.lin, self.start, self.stop = lin, start, stop
        self.weight = lin.weight[start:stop]
        self.bias = None if lin.bias is None else lin.bias[start:stop]
        self.in_features = lin.in_features
        self.out_features = stop - start


def _cat_rows(parts, like: nn.Linear) -> nn.Linear:
    """One nn.Linear stacking the rows of ``parts`` (linears or row views)."""
    W = torch.cat([p.weight.data for p in parts], 0)
    has_bias = like.bias is not None
    new = new_linear(W.shape[1], W.shape[0], has_bias, W.device, W.dtype)
    new.weight.data.copy_(W)
    if has_bias:
        new.bias.data.copy_(torch.cat([p.bias.data for p in parts], 0))
    return new


class Phi3Adapter(Adapter):
    model_types = ("phi3",)
    #: whole kv-head groups live inside the fused qkv_proj and Phi-3's forward splits it by the config's
    #: head counts: attn_unit="head" is refused for Phi-3
    removes_heads = False
    mlp_size_key = "intermediate_size"
    attn_name = "self_attn"
    o_name = "o_proj"
    mlp_prefix = "mlp"
    mlp_out_name = "down_proj"

    def blocks(self, model):
        return model.model.layers

    def block_heads(self, block, config) -> tuple[int, int]:
        n, kv, _ = self.head_geometry(config)  # heads are never removed from the fused qkv_proj
        return n, kv

    # ---- value rows inside qkv_proj: [query rows | key rows | value rows]
    def _qk_rows(self, attn) -> int:
        n, kv, hd = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
        return (n + kv) * hd

    def value_pair(self, block):
        a = self.attention(block)
        qk = self._qk_rows(a)
        return RowView(a.qkv_proj, qk, a.qkv_proj.out_features), a.o_proj

    def set_value_pair(self, block, v, o, v_head_dim: int) -> None:
        a = self.attention(block)
        qk = RowView(a.qkv_proj, 0, self._qk_rows(a))
        a.qkv_proj = _cat_rows([qk, v], a.qkv_proj)
        a.o_proj = o
        self.set_value_head_dim(a, v_head_dim)

    # ---- MLP neurons: row j of the gate half and row I + j of the up half of gate_up_proj
    def mlp_pair(self, block):
        mlp = block.mlp
        m = mlp.down_proj.in_features
        return [RowView(mlp.gate_up_proj, 0, m), RowView(mlp.gate_up_proj, m, 2 * m)], mlp.down_proj

    def set_mlp_pair(self, block, ins, out) -> None:
        mlp = block.mlp
        mlp.gate_up_proj = _cat_rows(ins, mlp.gate_up_proj)
        mlp.down_proj = out

    @staticmethod
    def value_pruned_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                             past_key_values=None, **kwargs):
        """The stock Phi-3 attention forward with value heads of size ``self.v_head_dim``."""
        mod = sys.modules[type(self).__module__]
        input_shape = hidden_states.shape[:-1]
        qkv = self.qkv_proj(hidden_states)
        qpos = self.config.num_attention_heads * self.head_dim
        kpos = qpos + self.num_key_value_heads * self.head_dim
        q = qkv[..., :qpos].view(*input_shape, -1, self.head_dim).transpose(1, 2)
        k = qkv[..., qpos:kpos].view(*input_shape, -1, self.head_dim).transpose(1, 2)
        v = qkv[..., kpos:].reshape(*input_shape, -1, self.v_head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          mod.eager_attention_forward)
        out, weights = attend(self, interface, q, k, v, attention_mask,
                              dropout=0.0 if not self.training else self.attention_dropout,
                              scaling=self.scaling, sliding_window=getattr(self.config, "sliding_window", None),
                              **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights
