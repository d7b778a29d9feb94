"""What the generic pipeline needs to know about a model family, and nothing more.

An adapter names the decoder blocks, the two linked pairs of projections of each block and the
attention head geometry, and knows how to rebuild a block whose value head size differs from its
query/key head size. The pipeline (fasp_ext/pipeline.py) never looks at the model type itself.

To add a family: subclass :class:`Adapter` (or the closest existing adapter), fill in the attribute
names and ``value_pruned_forward`` (the family's stock attention forward with value heads of size
``v_head_dim``), add the class to ``ADAPTERS`` in fasp_ext/adapters/__init__.py and a tiny random
model of the family to tests/tiny_models.py (``FAMILIES``): the family tests then run on it.
docs/adding-a-family.md walks through each attribute.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def new_linear(in_features: int, out_features: int, bias: bool, device, dtype) -> nn.Linear:
    """An nn.Linear whose parameters are left uninitialised (the caller fills them): no random
    initialisation of weights that are overwritten at once."""
    return torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, device=device, dtype=dtype)


def _shrink_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                   weight: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear keeping output rows ``rows`` and input columns ``cols`` (or taking ``weight``)."""
    W = lin.weight.data
    if weight is None:
        if rows is not None:
            W = W.index_select(0, rows.to(W.device))
        if cols is not None:
            W = W.index_select(1, cols.to(W.device))
    else:
        W = weight
    bias = lin.bias.data if lin.bias is not None else None
    if bias is not None and rows is not None:
        bias = bias.index_select(0, rows.to(bias.device))
    new = new_linear(W.shape[1], W.shape[0], bias is not None, W.device, W.dtype)
    new.weight.data.copy_(W)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def empty_linear_like(lin: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=lin.bias is not None,
                     device=lin.weight.device, dtype=lin.weight.dtype)


def attend(attn: nn.Module, interface, q, k, v, attention_mask, **kwargs):
    """Run the attention ``interface`` on value heads narrower than the query/key heads.

    Fused kernels (the CPU flash path of SDPA, FlashAttention) need equal head sizes and otherwise
    fall back to a slow unfused path (3x slower on CPU). For any implementation but eager, ``v`` is
    zero-padded to the query/key head size and the padded output columns are dropped: the extra
    columns of softmax(QK^T)V are exactly zero, so the result is the same. The KV cache keeps the
    narrow values (callers pad after the cache update).
    """
    dv, d = v.shape[-1], k.shape[-1]
    pad = dv < d and attn.config._attn_implementation != "eager"
    if pad:
        v = torch.nn.functional.pad(v, (0, d - dv))
    out, weights = interface(attn, q, k, v, attention_mask, **kwargs)
    if pad:
        out = out[..., :dv]
    return out, weights


class _PrunedForward:
    """The ``forward`` of a value-pruned attention class (a data descriptor).

    Reading ``attn.forward`` gives a forward set on the instance if there is one (a toolkit's wrapper,
    fasp_ext's calibration replay), else the adapter's ``value_pruned_forward`` bound to ``attn``.
    Setting it to the stock forward of the original class (or to the pruned one) removes the
    instance's own forward instead of storing it: toolkits that wrapped a module before it was
    pruned put back the stock forward they saved when they unwrap it (llm-compressor's oneshot does,
    through compressed-tensors' ``remove_module_offload`` and accelerate's ``remove_hook_from_module``
    when it saves), and the stock forward cannot run narrower value heads. Any other forward is kept
    on the instance (in ``attn.__dict__["forward"]``, where ``del attn.forward`` finds it)."""

    def __get__(self, attn, cls=None):
        if attn is None:
            return cls._fasp_adapter.value_pruned_forward
        own = attn.__dict__.get("forward")
        if own is not None:
            return own
        return types.MethodType(type(attn)._fasp_adapter.value_pruned_forward, attn)

    def __set__(self, attn, value) -> None:
        cls = type(attn)
        fn = getattr(value, "__func__", value)
        if getattr(value, "__self__", attn) is attn and fn in (cls._fasp_base.forward,
                                                               cls._fasp_adapter.value_pruned_forward):
            attn.__dict__.pop("forward", None)
        else:
            attn.__dict__["forward"] = value

    def __delete__(self, attn) -> None:
        if attn.__dict__.pop("forward", None) is None:
            raise AttributeError("forward")


_VALUE_PRUNED_CLASSES: dict[tuple[type, type], type] = {}


def value_pruned_class(adapter_cls: type, base: type) -> type:
    """The subclass of attention class ``base`` whose forward is ``adapter_cls.value_pruned_forward``
    (one per pair, cached). It keeps ``base``'s name, qualified name and module, so the model's repr,
    class-name matching (llm-compressor's targets and ignore lists) and the family's modeling module
    (its rotary embedding and eager attention, looked up from ``type(attn).__module__``) are those of
    the stock class; ``isinstance(attn, base)`` holds. Instances pickle and deep-copy (the class is
    rebuilt from the two importable classes). ``base`` may already be value-pruned (pruning a pruned
    model again): its original class is used."""
    base = getattr(base, "_fasp_base", base)
    key = (adapter_cls, base)
    cls = _VALUE_PRUNED_CLASSES.get(key)
    if cls is None:
        def __reduce_ex__(self, protocol):
            return _new_value_pruned, (adapter_cls, base), self.__getstate__()

        cls = type(base.__name__, (base,), {
            "__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__,
            "forward": _PrunedForward(), "__reduce_ex__": __reduce_ex__,
            "_fasp_base": base,  # the stock class
            "_fasp_adapter": adapter_cls,  # family switches the forward reads (soft-capping, window)
        })
        _VALUE_PRUNED_CLASSES[key] = cls
    return cls


def _new_value_pruned(adapter_cls: type, base: type):
    """An empty instance of ``value_pruned_class(adapter_cls, base)`` (unpickling, deep copies)."""
    cls = value_pruned_class(adapter_cls, base)
    return cls.__new__(cls)


class Adapter:
    """Base class: subclasses fill in the attribute names and the pruned-value attention forward."""

    #: model_type values (config.model_type) this adapter handles
    model_types: tuple[str, ...] = ()
    #: config attribute holding the MLP width
    mlp_size_key: str = "intermediate_size"
    #: attribute names inside a block
    attn_name = "self_attn"
    q_name, k_name = "q_proj", "k_proj"
    v_name = "v_proj"
    o_name = "o_proj"
    #: whole kv-head groups can be removed (``PruneConfig.attn_unit="head"``): q, k and v are separate
    #: projections and the stock attention forward takes its head counts from the projections' sizes
    #: (``set_head_counts`` sets what else it reads)
    removes_heads = True
    mlp_in_names: tuple[str, ...] = ()
    mlp_out_name = ""
    #: where the MLP's first linear lives relative to the block ("mlp" for LLaMA, "" for OPT)
    mlp_prefix = "mlp"
    #: the MLP output projection's result is added to the residual stream as it is (not normalised
    #: first, as Gemma 2/3's post_feedforward_layernorm does) and is the block's last operation (with
    #: is_pre_norm): only then does the pipeline compute block outputs from that projection's stored
    #: inputs instead of running the block again (tests/test_stream.py checks both ways)
    mlp_is_residual_branch = True
    #: the block's module whose input is the residual stream the MLP's output is added to (its pre-MLP
    #: norm), when ``mlp_is_residual_branch``: the MLP pass then stops at the output projection and the
    #: pipeline computes the pruned block's output itself (``pipeline._residual_outputs``)
    mlp_norm_name = "post_attention_layernorm"
    #: the norms applied to the attention's and the MLP's output before the residual add (Gemma 2/3's
    #: ``post_attention_layernorm`` and ``post_feedforward_layernorm``), None where the output is added
    #: as it is: what ``output_norm`` returns
    attn_out_norm_name: str | None = None
    mlp_out_norm_name: str | None = None

    # ---- model level
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def lm_config(self, config):
        """The config of the language model whose blocks are pruned: the model's own, or the text
        part of a multimodal model's (Gemma3ForConditionalGeneration's ``text_config``). The methods
        below that take a config take either."""
        return config

    def max_context(self, config) -> int | None:
        return getattr(self.lm_config(config), "max_position_embeddings", None)

    def head_geometry(self, config) -> tuple[int, int, int]:
        """(num query heads, num kv heads, query/key head size)."""
        config = self.lm_config(config)
        n = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or n
        hd = getattr(config, "head_dim", None) or config.hidden_size // n
        return n, kv, hd

    def is_pre_norm(self, config) -> bool:
        return True

    # ---- block level
    def _mlp_parent(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.mlp_prefix) if self.mlp_prefix else block

    def attention(self, block):
        return getattr(block, self.attn_name)

    def value_pair(self, block) -> tuple[nn.Linear, nn.Linear]:
        a = self.attention(block)
        return getattr(a, self.v_name), getattr(a, self.o_name)

    def set_value_pair(self, block, v: nn.Linear, o: nn.Linear, v_head_dim: int) -> None:
        a = self.attention(block)
        setattr(a, self.v_name, v)
        setattr(a, self.o_name, o)
        self.set_value_head_dim(a, v_head_dim)

    # ---- whole kv-head groups (attn_unit="head")
    def block_heads(self, block, config) -> tuple[int, int]:
        """(query heads, kv heads) of ``block`` as its projections hold them (fewer than the config's
        after head pruning)."""
        a = self.attention(block)
        hd = self.head_geometry(config)[2]
        return getattr(a, self.q_name).out_features // hd, getattr(a, self.k_name).out_features // hd

    def head_groups(self, block, config, device) -> torch.Tensor:
        """(kv, rep * dv) o_proj columns per kv-head group: group g is kv head g and the rep query heads
        that share it (g * rep .. g * rep + rep - 1, the order the attention repeats kv heads in), whose
        outputs are o_proj columns (g * rep + r) * dv + c."""
        n, kv = self.block_heads(block, config)
        dv = self.value_pair(block)[0].out_features // kv
        return torch.arange(n * dv, device=device).view(kv, (n // kv) * dv)

    def set_head_counts(self, attn: nn.Module, n_heads: int, n_kv: int) -> None:
        """Record the block's head counts on the attention module where its forward reads them (the
        LLaMA family reshapes with -1 heads and repeats kv heads ``num_key_value_groups`` times, which
        removing whole groups leaves unchanged: nothing to set)."""

    def remove_heads(self, block, config, kept: torch.Tensor, o: nn.Linear) -> None:
        """Keep only kv-head groups ``kept`` (ascending) of ``block``: their q, k and v rows (biases
        with them) and ``o``, the already restored output projection over the kept groups' columns."""
        a = self.attention(block)
        n, kv = self.block_heads(block, config)
        rep, hd = n // kv, self.head_geometry(config)[2]
        v = getattr(a, self.v_name)
        dv = v.out_features // kv
        dev = v.weight.device
        kept = kept.to(dev)
        d = torch.arange(hd, device=dev)
        q_heads = (kept.view(-1, 1) * rep + torch.arange(rep, device=dev).view(1, -1)).reshape(-1)
        q_rows = (q_heads.view(-1, 1) * hd + d.view(1, -1)).reshape(-1)
        k_rows = (kept.view(-1, 1) * hd + d.view(1, -1)).reshape(-1)
        v_rows = (kept.view(-1, 1) * dv + torch.arange(dv, device=dev).view(1, -1)).reshape(-1)
        setattr(a, self.q_name, _shrink_linear(getattr(a, self.q_name), rows=q_rows))
        setattr(a, self.k_name, _shrink_linear(getattr(a, self.k_name), rows=k_rows))
        setattr(a, self.v_name, _shrink_linear(v, rows=v_rows))
        setattr(a, self.o_name, o)
        self.set_head_counts(a, int(q_heads.numel()), int(kept.numel()))

    def mlp_pair(self, block) -> tuple[list[nn.Linear], nn.Linear]:
        p = self._mlp_parent(block)
        return [getattr(p, n) for n in self.mlp_in_names], getattr(p, self.mlp_out_name)

    def set_mlp_pair(self, block, ins: list[nn.Linear], out: nn.Linear) -> None:
        p = self._mlp_parent(block)
        for n, lin in zip(self.mlp_in_names, ins):
            setattr(p, n, lin)
        setattr(p, self.mlp_out_name, out)

    def mlp_norm(self, block) -> nn.Module | None:
        """The module whose input is the stream the MLP output is added to (None: not known)."""
        return getattr(block, self.mlp_norm_name, None) if self.mlp_is_residual_branch else None

    def output_norm(self, block, which: str) -> nn.Module | None:
        """The RMS norm the output projection's result passes through before the residual add
        (``which``: "attn" or "mlp"), None where it is added as it is. A restored projection's error
        at a token then reaches the stream divided by that output's RMS there, which is what
        ``PruneConfig.token_weighting`` weighs the calibration tokens by."""
        name = self.attn_out_norm_name if which == "attn" else self.mlp_out_norm_name
        return getattr(block, name, None) if name else None

    def mlp_width(self, block) -> int:
        return self.mlp_pair(block)[1].in_features

    def value_head_dim(self, block, config) -> int:
        a = self.attention(block)
        return getattr(a, "v_head_dim", self.head_geometry(config)[2])

    # ---- the pruned-value architecture
    def set_value_head_dim(self, attn: nn.Module, v_head_dim: int) -> None:
        """Make ``attn`` run with value heads of size ``v_head_dim`` (query/key heads unchanged).

        The module's class becomes the family's value-pruned subclass of its own class
        (:func:`value_pruned_class`), whose ``forward`` is the adapter's ``value_pruned_forward``:
        the pruned attention is a property of the module's type, not a bound method on the instance
        that a toolkit can replace by the stock forward it saved earlier. A forward set on the
        instance before (a toolkit's wrapper around the stock forward) is dropped: it would run the
        stock forward."""
        attn.v_head_dim = int(v_head_dim)
        attn.__class__ = value_pruned_class(type(self), type(attn))
        attn.__dict__.pop("forward", None)

    @staticmethod
    def value_pruned_forward(attn, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def resize_block(self, block, config, v_head_dim: int, mlp_width: int,
                     heads: tuple[int, int] | None = None) -> None:
        """Replace the projections of ``block`` by empty ones of the given sizes (for reloading);
        ``heads``: (query heads, kv heads) of a block whose kv-head groups were pruned (None: the config's)."""
        n, kv, hd = self.head_geometry(config)
        if heads is not None and tuple(heads) != (n, kv):
            n, kv = (int(h) for h in heads)
            a = self.attention(block)
            for name, rows in ((self.q_name, n * hd), (self.k_name, kv * hd), (self.v_name, kv * hd)):
                lin = getattr(a, name)
                setattr(a, name, empty_linear_like(lin, lin.in_features, rows))
            o = getattr(a, self.o_name)
            setattr(a, self.o_name, empty_linear_like(o, n * hd, o.out_features))
            self.set_head_counts(a, n, kv)
        v, o = self.value_pair(block)
        if v_head_dim != v.out_features // kv:
            self.set_value_pair(block, empty_linear_like(v, v.in_features, kv * v_head_dim),
                                empty_linear_like(o, n * v_head_dim, o.out_features), v_head_dim)
        ins, out = self.mlp_pair(block)
        if mlp_width != out.in_features:
            self.set_mlp_pair(block, [empty_linear_like(l, l.in_features, mlp_width) for l in ins],
                              empty_linear_like(out, mlp_width, out.out_features))
