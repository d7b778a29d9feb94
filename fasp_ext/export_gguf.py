"""Export a pruned (or dense) LLaMA-family result to GGUF, the file format llama.cpp runs.

``fasp_ext.export_gguf(model_dir, out_path, outtype="f16")`` and ``fasp-ext export --format gguf``
write the file with the ``gguf`` package (llama.cpp's own writer), following what llama.cpp's
``convert_hf_to_gguf.py`` does for LLaMA: the query and key rows permuted into llama.cpp's rotary
layout, 1-D tensors (norms, biases) kept in f32, the tokenizer (BPE or SentencePiece-style),
merges, special tokens and chat template carried over through ``gguf.SpecialVocab``.

Which architecture the file declares:

* every block has the same MLP width: the family's own, ``llama`` (LLaMA, Mistral, SmolLM2);
* MLP widths or head counts differ between blocks (fasp_ext's default allocation): ``deci``,
  llama.cpp's LLaMA-shaped architecture whose ``feed_forward_length``, ``head_count`` and
  ``head_count_kv`` are per-layer arrays (Nemotron-51B; ``src/models/deci.cpp`` in llama.cpp).

llama.cpp needs the value head size to equal the key head size. A result with pruned value
channels is written with its value heads padded back to the key head size: zero ``v_proj`` rows
and zero ``o_proj`` columns, which leaves the model's outputs unchanged (the padded channels carry
exact zeros), but the attention then costs in llama.cpp what the dense attention costs. A result
pruned in whole kv-head groups (``attn_unit="head"``) keeps full value heads: each layer is
written with its own ``head_count`` / ``head_count_kv`` and nothing is padded, so the attention and
the KV cache are smaller in llama.cpp too.

What llama.cpp cannot run from this exporter (other families, per-layer widths of families
without a per-layer architecture, non-SiLU MLPs, unknown RoPE scalings, q8_0 on widths that are
not multiples of 32) is refused before anything is written, with a one-line reason and the pruning
settings that would make it exportable. The file is written under a temporary name next to
``out_path`` and published by a hard link that cannot replace an existing file; ``out_path`` must
not exist.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from .safety import UserError, _is_within, check_free_space, check_not_interrupted, read_config, resolve_out

log = logging.getLogger("fasp_ext")

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
#: the families written as llama / deci (LLaMA's tensor names and graph)
LLAMA_FAMILIES = ("llama", "mistral")
#: q8_0 (and q4_0) quantise each row in blocks of this many values
Q8_BLOCK = 32
#: MLP widths are written padded up to a multiple of this (zero gate/up rows, zero down columns:
#: exact). llama.cpp decodes f16 widths that are multiples of 8 slower than their bytes say (SmolLM2 at
#: 20 %: 0.96x dense, against 1.12x for multiples of 32; docs/serving.md), and q8_0 needs 32
MLP_PAD = 32

_TMP_TAG = ".fasp-tmp-"

# why each supported-but-not-exported family is refused, and what makes its result exportable
_STOCK_CONVERTER = ("prune with --mlp-only --allocation uniform (a stock checkpoint: equal widths, full value heads) "
                    "and convert it with llama.cpp's convert_hf_to_gguf.py")
_REFUSED = {
    "opt": "OPT has no LLaMA-shaped graph in llama.cpp (learned positions, LayerNorm, biased ReLU MLP) and fasp-ext "
           "export writes LLaMA-family results only; no pruning setting makes an OPT result exportable here",
    "phi3": "llama.cpp's phi3 graph takes one MLP width for every layer and value heads as large as the key heads, and "
            "fasp-ext export writes LLaMA-family results only; " + _STOCK_CONVERTER,
    "qwen2": "llama.cpp's qwen2 graph takes one MLP width for every layer and value heads as large as the key heads, "
             "and fasp-ext export writes llama/mistral results only; " + _STOCK_CONVERTER,
    "qwen3": "llama.cpp's qwen3 graph takes one MLP width for every layer (its per-layer deci graph has no q/k norms), "
             "and fasp-ext export writes llama/mistral results only; " + _STOCK_CONVERTER,
    "gemma2": "llama.cpp's gemma2 graph takes one MLP width for every layer and value heads as large as the key heads, "
              "and fasp-ext export writes llama/mistral results only; " + _STOCK_CONVERTER,
    "gemma3_text": "llama.cpp's gemma3 graph takes one MLP width for every layer and value heads as large as the key "
                   "heads, and fasp-ext export writes llama/mistral results only; " + _STOCK_CONVERTER,
    "gemma3": "llama.cpp's gemma3 graph takes one MLP width for every layer and value heads as large as the key heads "
              "(and its vision tower goes into a separate mmproj file), and fasp-ext export writes llama/mistral "
              "results only; " + _STOCK_CONVERTER,
}

# tokenizer.ggml.pre of BPE tokenizers, by the hash llama.cpp's convert_hf_to_gguf.py computes
# (get_vocab_base_pre: sha256 of str(tokenizer.encode(CHKTXT))); the LLaMA-architecture ones
_CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
           '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
           '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
           '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # gpt2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
}


@dataclass
class ExportPlan:
    """What will be written, decided from config.json and the safetensors headers alone."""

    model_dir: Path
    out: Path
    outtype: str
    family: str
    arch: str
    n_layer: int
    hidden: int
    n_head: int
    n_kv: int
    head_dim: int
    vocab: int
    mlp_width: list[int]
    v_head_dim: list[int]
    context: int
    rms_eps: float
    rope_theta: float
    rope: dict
    tied: bool
    warnings: list[str] = field(default_factory=list)
    #: per-layer query and kv head counts (empty: ``n_head`` / ``n_kv`` in every layer); fewer where
    #: whole kv-head groups were pruned (``attn_unit="head"``)
    head_count: list[int] = field(default_factory=list)
    head_count_kv: list[int] = field(default_factory=list)
    #: the MLP widths the checkpoint stores (``mlp_width``: as written, each padded up to a multiple of
    #: ``mlp_pad`` with zero gate/up rows and down columns; empty: the same)
    mlp_stored: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.mlp_stored = list(self.mlp_stored) or list(self.mlp_width)
        self.head_count = list(self.head_count) or [self.n_head] * self.n_layer
        self.head_count_kv = list(self.head_count_kv) or [self.n_kv] * self.n_layer

    @property
    def padded_value_channels(self) -> int:
        """Zero value channels the export adds (per layer: kv heads x (key head size - value head size))."""
        return sum(kv * (self.head_dim - d) for kv, d in zip(self.head_count_kv, self.v_head_dim))


def _fail(msg: str) -> UserError:
    return UserError(msg)


def _check_out(out, model_dir: Path) -> Path:
    if out is None or not str(out).strip():
        raise _fail("--out: empty path (an unset shell variable?); name the GGUF file to write")
    p = resolve_out(out, "--out")
    if p.exists():
        raise _fail(f"--out: {p} already exists; fasp-ext export never replaces a file (name a new one)")
    if not p.parent.is_dir():
        raise _fail(f"--out: folder {p.parent} does not exist")
    if _is_within(p, model_dir):
        raise _fail(f"--out: {p} is inside the model folder {model_dir}; write the GGUF file next to it, not into it")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise _fail(f"--out: cannot write in {p.parent}")
    return p


def _rope(lm_cfg, family: str) -> tuple[float, dict]:
    params = getattr(lm_cfg, "rope_parameters", None) or getattr(lm_cfg, "rope_scaling", None) or {}
    params = dict(params.get("full_attention", params)) if isinstance(params, dict) else {}
    theta = params.get("rope_theta", getattr(lm_cfg, "rope_theta", 10000.0))
    kind = (params.get("rope_type") or params.get("type") or "default").lower()
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise _fail(f"--model: {family} with RoPE scaling {kind!r}: fasp-ext export writes default, linear, llama3 and "
                    f"yarn RoPE only")
    params["rope_type"] = kind
    return float(theta), params


def plan_export(model_dir, out_path, outtype: str = "f16", arch: str = "auto", mlp_pad: int = MLP_PAD) -> ExportPlan:
    """Check everything and decide the file's layout, reading config.json and the safetensors
    headers only (no weight). Raises :class:`~fasp_ext.safety.UserError` with a one-line reason
    for anything llama.cpp could not run, before any file is touched. ``mlp_pad``: each block's MLP
    width is padded up to a multiple of this with zero gate/up rows and down columns (exact)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise _fail("fasp-ext export needs the gguf package, llama.cpp's writer: pip install gguf") from None
    if outtype not in OUTTYPES:
        raise _fail(f"--outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if arch not in ("auto", "llama", "deci"):
        raise _fail(f"--arch: {arch!r} is not one of auto, llama, deci")
    if not isinstance(mlp_pad, int) or mlp_pad < 1:
        raise _fail(f"--mlp-pad: must be an integer >= 1, got {mlp_pad!r}")
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise _fail(f"--model: {model_dir} is not a folder (expected a fasp_ext output or save_pretrained folder)")
    out = _check_out(out_path, model_dir)
    raw = read_config(model_dir, "--model")
    mt = raw.get("model_type")
    if mt in _REFUSED:
        raise _fail(f"--model: {mt}: {_REFUSED[mt]}")
    if mt not in LLAMA_FAMILIES:
        raise _fail(f"--model: model type {mt!r}: fasp-ext export writes {', '.join(LLAMA_FAMILIES)} results only")

    from .io import Checkpoint

    ck = Checkpoint(model_dir, arg="--model")
    ck.skeleton()  # every stored tensor matches the (pruned) architecture, in name and shape
    cfg = ck.config
    adapter = ck.adapter
    if adapter is None:
        from .adapters import adapter_for

        adapter = adapter_for(cfg)
    lm = adapter.lm_config(cfg)
    n, kv, hd = adapter.head_geometry(lm)
    n_layer = int(lm.num_hidden_layers)
    if ck.meta is not None:
        v_dims, widths, added, heads = ck.meta
    else:
        v_dims, widths, added, heads = [hd] * n_layer, [int(lm.intermediate_size)] * n_layer, [], None
    heads = heads or [(n, kv)] * n_layer
    act = getattr(lm, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _fail(f"--model: MLP activation {act!r}: llama.cpp's llama/deci graphs use SiLU only")
    rope_theta, rope = _rope(lm, mt)
    hidden = int(lm.hidden_size)
    if hd % 2:
        raise _fail(f"--model: head size {hd} is odd; llama.cpp's rotary embedding needs an even head size")

    stored = list(widths)
    widths = [-(-w // mlp_pad) * mlp_pad for w in stored]
    equal = len(set(widths)) == 1 and len(set(heads)) == 1
    if arch == "auto":
        arch = "llama" if equal else "deci"
    elif arch == "llama" and len(set(widths)) > 1:
        raise _fail(f"--arch llama: the MLP widths differ between blocks ({sorted(set(widths))[:6]}...); llama.cpp's "
                    f"llama graph takes one width for every layer: use --arch deci (per-layer widths) or prune with "
                    f"--allocation uniform")
    elif arch == "llama" and not equal:
        raise _fail(f"--arch llama: the head counts differ between blocks (kv heads {sorted({h[1] for h in heads})}); "
                    f"llama.cpp's llama graph takes one head count for every layer: use --arch deci (per-layer head "
                    f"counts) or prune with --allocation uniform")
    warnings = []
    context = int(getattr(lm, "max_position_embeddings", 0) or 2048)
    window = getattr(lm, "sliding_window", None) if mt == "mistral" else None
    if isinstance(window, int) and 0 < window < context:
        warnings.append(f"the model attends to a sliding window of {window} tokens, which llama.cpp's {arch} graph "
                        f"does not apply: its context length is set to {window}, within which the two agree")
        context = window
    if any(d < hd for d in v_dims):
        warnings.append(f"value heads padded back to the key head size {hd} with zero v_proj rows and o_proj columns "
                        f"(exact; llama.cpp needs equal head sizes), so the attention saves nothing in llama.cpp: "
                        f"{sum(h[1] * (hd - d) for h, d in zip(heads, v_dims))} zero value channels added")

    plan = ExportPlan(model_dir=model_dir, out=out, outtype=outtype, family=mt, arch=arch, n_layer=n_layer,
                      hidden=hidden, n_head=n, n_kv=kv, head_dim=hd, vocab=int(lm.vocab_size), mlp_width=list(widths),
                      v_head_dim=list(v_dims), context=context, rms_eps=float(lm.rms_norm_eps), rope_theta=rope_theta,
                      rope=rope, tied=bool(getattr(cfg, "tie_word_embeddings", False)), warnings=warnings,
                      head_count=[h[0] for h in heads], head_count_kv=[h[1] for h in heads], mlp_stored=stored)
    if widths != stored:
        warnings.append(f"MLP widths padded up to multiples of {mlp_pad} with zero gate/up rows and down columns "
                        f"(exact; llama.cpp runs aligned widths faster, q8_0 needs 32): "
                        f"{sum(widths) - sum(stored)} zero neurons added over {n_layer} blocks")
    plan._checkpoint = ck  # type: ignore[attr-defined]
    plan._added_bias = list(added)  # type: ignore[attr-defined]
    if outtype == "q8_0":
        _check_q8(plan)
    _check_tokenizer_present(model_dir)
    return plan


def _check_q8(plan: ExportPlan) -> None:
    """q8_0 quantises every matrix row in blocks of 32: each input width must be a multiple of 32
    (the hidden size for the embedding, q/k/v/gate/up and lm_head, n_head x head size for o_proj,
    each block's MLP width for down_proj)."""
    bad = []
    if plan.hidden % Q8_BLOCK:
        bad.append(f"hidden size {plan.hidden}")
    for w in sorted({nh * plan.head_dim for nh in plan.head_count}):
        if w % Q8_BLOCK:
            bad.append(f"attention width {w}")
    odd = [(i, w) for i, w in enumerate(plan.mlp_width) if w % Q8_BLOCK]
    if odd:
        bad.append("MLP widths " + ", ".join(f"{w} (block {i})" for i, w in odd[:4]) + (" ..." if len(odd) > 4 else ""))
    if not bad:
        return
    fix = ("export with --mlp-pad 32 (the default) or prune with --mlp-multiple 32" if odd and len(bad) == 1
           else "use --outtype f16 (this model's own sizes are not multiples of 32)")
    raise _fail(f"--outtype q8_0: q8_0 quantises rows in blocks of {Q8_BLOCK} and this model has "
                f"{'; '.join(bad)} not a multiple of {Q8_BLOCK}: {fix}, or export f16/bf16/f32")


# ----------------------------------------------------------------------------- tokenizer
def _check_tokenizer_present(model_dir: Path) -> None:
    tj = model_dir / "tokenizer.json"
    if not tj.is_file():
        raise _fail(f"--model: no tokenizer.json in {model_dir}; llama.cpp needs the vocabulary in the GGUF file "
                    f"(save the pruned model with its tokenizer)")
    try:
        kind = json.loads(tj.read_text(encoding="utf-8"))["model"]["type"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise _fail(f"--model: {tj} is not a readable tokenizers file ({e})") from None
    if kind != "BPE":
        raise _fail(f"--model: tokenizer model {kind!r} in {tj}: fasp-ext export writes BPE tokenizers (GPT-2 style "
                    f"byte-level, or SentencePiece-style with byte fallback) only")


def bpe_pre_tokenizer(tokenizer, tokenizer_json: dict) -> str | None:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level BPE tokenizer's pre-tokenizer:
    by the hash llama.cpp's converter uses, else by the pre-tokenizer's structure; None if unknown."""
    chkhsh = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    if chkhsh in _PRE_BY_HASH:
        return _PRE_BY_HASH[chkhsh]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    byte_level = parts[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or not byte_level.get("use_regex", True) or byte_level.get("add_prefix_space", False):
        return None
    if kinds == ["ByteLevel"]:
        return "gpt-2"  # GPT-2's regex on the byte-level alphabet
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # GPT-2's regex after splitting every digit
    return None


def _add_tokenizer(writer, plan: ExportPlan, tokenizer_pre: str | None) -> dict:
    import gguf
    from transformers import AutoTokenizer

    d = plan.model_dir
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj["model"]
    info: dict = {}
    if model.get("byte_fallback"):  # SentencePiece-style BPE (Llama 2, Mistral 7B v0.1): llama.cpp's "llama"
        vocab = gguf.LlamaHfVocab(d)
        tokens, scores, types = [], [], []
        for text, score, typ in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(typ)
        # llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest; without a
        # tokenizer.model to read scores from (LlamaHfVocab gives every token -1000, so llama.cpp would
        # merge left to right), score each merged token by its merge's rank, as BPE applies them
        rank = {}
        for r, m in enumerate(model.get("merges", [])):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            rank.setdefault((a + b).encode("utf-8"), r)
        scores = [-float(rank[t]) if t in rank and typ == gguf.TokenType.NORMAL else sc
                  for t, sc, typ in zip(tokens, scores, types)]
        _pad_vocab(tokens, types, plan.vocab, scores)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(d, n_vocab=len(tokens))
        info.update(model="llama", pre="default")
        tok = vocab.tokenizer
    else:  # byte-level BPE (Llama 3, SmolLM2, GPT-2): llama.cpp's "gpt2", as get_vocab_base does it
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        pre = tokenizer_pre or bpe_pre_tokenizer(tok, tj)
        if pre is None:
            raise _fail(f"--model: llama.cpp's name for the pre-tokenizer of {d / 'tokenizer.json'} is not known; give "
                        f"it with --tokenizer-pre NAME (the tokenizer.ggml.pre that llama.cpp's convert_hf_to_gguf.py "
                        f"writes for this model, e.g. llama-bpe, smollm, gpt-2)")
        reverse = {i: t for t, i in tok.get_vocab().items()}
        added = tok.get_added_vocab()
        decoder = tok.added_tokens_decoder
        if reverse and max(reverse) >= plan.vocab:
            raise _fail(f"--model: the tokenizer has token id {max(reverse)}, beyond the model's vocabulary of "
                        f"{plan.vocab}")
        tokens, types = [], []
        for i in range(plan.vocab):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
                continue
            t = reverse[i]
            if t in added:
                if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalised
                    t = tok.decode(tok.encode(t, add_special_tokens=False))
                if decoder[i].special or _looks_special(t):
                    types.append(gguf.TokenType.CONTROL)
                else:
                    t = t.replace("\u2581", " ")
                    types.append(gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
            tokens.append(t)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(d, load_merges=True)
        info.update(model="gpt2", pre=pre, merges=len(special.merges))
    # whether the tokenizer adds BOS/EOS itself, from what it does (tokenizer_config.json may not say)
    probe = tok.encode("a", add_special_tokens=True)
    bare = tok.encode("a", add_special_tokens=False)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    special.add_special_token["bos"] = bool(bos is not None and probe[:1] == [bos] and bare[:1] != [bos])
    special.add_special_token["eos"] = bool(eos is not None and probe[-1:] == [eos] and bare[-1:] != [eos])
    special.add_to_gguf(writer, quiet=True)
    info.update(add_bos=special.add_special_token["bos"], chat_template=special.chat_template is not None,
                special_tokens=dict(special.special_token_ids))
    return info


def _looks_special(token: str) -> bool:
    # as convert_hf_to_gguf.py's does_token_look_special
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") \
        or (token.startswith("<") and token.endswith(">") and token[1:-1].startswith("unused"))


def _pad_vocab(tokens, types, n_vocab: int, scores=None) -> None:
    import gguf

    if len(tokens) > n_vocab:
        raise _fail(f"--model: the tokenizer has {len(tokens)} tokens, more than the model's vocabulary of {n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)


# ----------------------------------------------------------------------------- tensors
def _permute(w, n_head: int):
    """convert_hf_to_gguf.py's LlamaModel.permute: transformers' half-split rotary layout of each
    head's rows to llama.cpp's interleaved one."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pad_values(name: str, t, plan: ExportPlan, layer: int):
    """Value heads of size dv < head size: zero rows of v_proj (and its bias), zero columns of o_proj."""
    import torch

    dv, hd = plan.v_head_dim[layer], plan.head_dim
    n_head, n_kv = plan.head_count[layer], plan.head_count_kv[layer]
    if dv == hd:
        return t
    if ".v_proj." in name:
        src = t.reshape(n_kv, dv, *t.shape[1:])
        out = torch.zeros(n_kv, hd, *t.shape[1:], dtype=t.dtype)
        out[:, :dv] = src
        return out.reshape(n_kv * hd, *t.shape[1:])
    if name.endswith(".o_proj.weight"):
        src = t.reshape(t.shape[0], n_head, dv)
        out = torch.zeros(t.shape[0], n_head, hd, dtype=t.dtype)
        out[:, :, :dv] = src
        return out.reshape(t.shape[0], n_head * hd)
    return t


def _llama3_rope_freqs(plan: ExportPlan):
    """The rope_freqs tensor llama.cpp's converter writes for rope_type llama3."""
    import torch

    p, dim = plan.rope, plan.head_dim
    freqs = 1.0 / (plan.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = p.get("factor", 8.0)
    low, high = p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old = p.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old / low, old / high
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _tensor_specs(plan: ExportPlan) -> list[tuple[str, tuple[int, ...], object]]:
    """(gguf name, shape, loader) for every tensor of the file, in the checkpoint's order; the loader
    reads the tensor (float32, q/k permuted, value heads padded) when it is written, so the export
    holds one tensor at a time."""
    import gguf

    ck = plan._checkpoint  # type: ignore[attr-defined]
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "deci": gguf.MODEL_ARCH.DECI}[plan.arch]
    names = gguf.get_tensor_name_map(arch, plan.n_layer)
    specs = []
    if plan.rope.get("rope_type") == "llama3":
        specs.append(("rope_freqs.weight", (plan.head_dim // 2,), lambda: _llama3_rope_freqs(plan)))
    for key, (f, t) in ck.table.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key == "lm_head.weight" and plan.tied:
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise _fail(f"--model: tensor {key!r} has no place in llama.cpp's {plan.arch} graph")
        shape = [int(x) for x in t["shape"]]
        m = re.match(r"model\.layers\.(\d+)\.", key)
        layer = int(m.group(1)) if m else None
        if layer is not None and plan.mlp_width[layer] != plan.mlp_stored[layer]:
            if ".gate_proj." in key or ".up_proj." in key:
                shape[0] = plan.mlp_width[layer]
            elif key.endswith(".down_proj.weight"):
                shape[1] = plan.mlp_width[layer]
        if layer is not None and plan.v_head_dim[layer] != plan.head_dim:
            if ".v_proj." in key:
                shape[0] = plan.head_count_kv[layer] * plan.head_dim
            elif key.endswith(".o_proj.weight"):
                shape[1] = plan.head_count[layer] * plan.head_dim
        specs.append((new, tuple(shape), lambda f=f, stored=t["name"], key=key, layer=layer:
                      _load(plan, f, stored, key, layer)))
    return specs


def _load(plan: ExportPlan, f: Path, stored: str, key: str, layer: int | None):
    import torch
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as sf:
        t = sf.get_tensor(stored).to(torch.float32)
    if layer is not None:
        if ".q_proj." in key:
            t = _permute(t, plan.head_count[layer])
        elif ".k_proj." in key:
            t = _permute(t, plan.head_count_kv[layer])
        t = _pad_values(key, t, plan, layer)
        t = _pad_mlp(key, t, plan, layer)
    return t


def _pad_mlp(name: str, t, plan: ExportPlan, layer: int):
    """An MLP of width w written as ``plan.mlp_width[layer]`` >= w: zero gate/up rows (and biases),
    zero down_proj columns; the padded neurons output silu(0) * 0 = 0 and add nothing."""
    import torch

    w, wp = plan.mlp_stored[layer], plan.mlp_width[layer]
    if w == wp:
        return t
    if ".gate_proj." in name or ".up_proj." in name:
        return torch.cat([t, t.new_zeros(wp - w, *t.shape[1:])])
    if name.endswith(".down_proj.weight"):
        return torch.cat([t, t.new_zeros(t.shape[0], wp - w)], dim=1)
    return t


def _qtype(outtype: str, new_name: str, ndim: int):
    import gguf

    Q = gguf.GGMLQuantizationType
    if ndim <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight") \
            or new_name == "rope_freqs.weight":
        return Q.F32
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


def _estimate_bytes(plan: ExportPlan) -> int:
    per = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}[plan.outtype]
    h, hd = plan.hidden, plan.head_dim
    n = plan.vocab * h * (1 if plan.tied else 2)
    n += sum(h * (nh * hd + 2 * kv * hd) + nh * hd * h + 3 * h * w
             for w, nh, kv in zip(plan.mlp_width, plan.head_count, plan.head_count_kv))
    return int(n * per) + (16 << 20)


# ----------------------------------------------------------------------------- writing
def _sweep_stale(out: Path) -> None:
    """Remove temporary files that killed exports of ``out`` left (their pid no longer runs)."""
    from .safety import _pid_alive

    pat = re.compile(re.escape(f".{out.name}{_TMP_TAG}") + r"(\d+)-[0-9a-f]+$")
    for q in out.parent.iterdir():
        m = pat.match(q.name)
        if m and q.is_file() and not q.is_symlink() and int(m.group(1)) != os.getpid() \
                and not _pid_alive(int(m.group(1))):
            q.unlink(missing_ok=True)
            log.warning("removed %s, left by a killed export (pid %s)", q.name, m.group(1))


def _publish(tmp: Path, out: Path) -> None:
    """Give ``tmp`` the name ``out`` without ever replacing a file that appeared there meanwhile."""
    check_not_interrupted()
    try:
        os.link(tmp, out)  # fails if out exists: no race can make us replace someone's file
    except FileExistsError:
        raise _fail(f"--out: {out} appeared while the export ran; it was left alone") from None
    except OSError:  # a file system without hard links: check, then rename
        if out.exists():
            raise _fail(f"--out: {out} appeared while the export ran; it was left alone") from None
        os.rename(tmp, out)
        return
    tmp.unlink()


def export_gguf(model_dir, out_path, outtype: str = "f16", arch: str = "auto", tokenizer_pre: str | None = None,
                progress: bool = False, mlp_pad: int = MLP_PAD) -> dict:
    """Write the fasp_ext result (or dense checkpoint) in ``model_dir`` to the GGUF file ``out_path``.

    ``outtype``: f32, f16 (default), bf16 or q8_0 for the matrices (norms and biases stay f32; q8_0
    needs every matrix's input width to be a multiple of 32).
    ``mlp_pad``: MLP widths are written padded up to a multiple of this with zero rows and columns
    (exact; default 32: faster in llama.cpp, and what q8_0 needs; 1 writes them as they are).
    ``arch``: ``auto`` (llama when every block has the same MLP width, else deci), or llama / deci.
    ``tokenizer_pre``: llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer whose name is
    not recognised. Returns a report: the architecture, per-layer widths, value padding, warnings.
    Refusals raise :class:`~fasp_ext.safety.UserError` before anything is written.
    """
    import gguf
    import numpy as np

    t0 = time.perf_counter()
    plan = plan_export(model_dir, out_path, outtype, arch, mlp_pad)
    out = plan.out
    check_free_space(out, need_min=_estimate_bytes(plan), arg="--out")
    for w in plan.warnings:
        log.warning("%s", w)
    _sweep_stale(out)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer = gguf.GGUFWriter(None, plan.arch)
    n_tensors = 0
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(str(json.loads((plan.model_dir / "config.json").read_text()).get("_model_name_or_path")
                            or plan.model_dir.name))
        writer.add_block_count(plan.n_layer)
        writer.add_context_length(plan.context)
        writer.add_embedding_length(plan.hidden)
        per_layer = plan.arch == "deci"
        writer.add_feed_forward_length(plan.mlp_width if per_layer else plan.mlp_width[0])
        writer.add_head_count(plan.head_count if per_layer else plan.head_count[0])
        writer.add_head_count_kv(plan.head_count_kv if per_layer else plan.head_count_kv[0])
        writer.add_key_length(plan.head_dim)
        writer.add_value_length(plan.head_dim)
        writer.add_rope_freq_base(plan.rope_theta)
        writer.add_layer_norm_rms_eps(plan.rms_eps)
        writer.add_vocab_size(plan.vocab)
        writer.add_rope_dimension_count(plan.head_dim)
        kind, factor = plan.rope["rope_type"], plan.rope.get("factor")
        if kind == "linear" and factor is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(factor)
        elif kind == "yarn" and factor is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(factor)
            writer.add_rope_scaling_orig_ctx_len(plan.rope["original_max_position_embeddings"])
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        # what fasp_ext pruned, for whoever reads the file's metadata
        writer.add_array("fasp_ext.mlp_width", plan.mlp_width)
        writer.add_array("fasp_ext.v_head_dim", plan.v_head_dim)
        tok_info = _add_tokenizer(writer, plan, tokenizer_pre)
        specs = _tensor_specs(plan)
        types = []
        for new, shape, _ in specs:  # the tensor table first: the data follows one tensor at a time
            qt = _qtype(outtype, new, len(shape))
            nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qt)))
            writer.add_tensor_info(new, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
            types.append(qt)
        check_not_interrupted()
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (new, shape, load), qt in zip(specs, types):
            data = load().numpy()
            if tuple(data.shape) != shape:  # pragma: no cover - the checkpoint was checked against its config
                raise RuntimeError(f"{new}: shape {tuple(data.shape)} != {shape}")
            writer.write_tensor_data(gguf.quants.quantize(data, qt))
            n_tensors += 1
            if progress:
                log.info("%s %s -> %s", new, shape, qt.name)
            check_not_interrupted()
        writer.close()
        _publish(tmp, out)
    except OSError as e:
        raise OSError(e.errno, f"--out: writing {out} failed ({e.strerror or e})") from None
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - closing after an error
            pass
        tmp.unlink(missing_ok=True)
    attn_saved = all(d == plan.head_dim for d in plan.v_head_dim)
    return {"out": str(out), "arch": plan.arch, "family": plan.family, "outtype": outtype, "bytes": out.stat().st_size,
            "tensors": n_tensors, "block_count": plan.n_layer, "feed_forward_length": plan.mlp_width,
            "head_count": plan.head_count, "head_count_kv": plan.head_count_kv,
            "v_head_dim": plan.v_head_dim, "head_dim": plan.head_dim,
            "padded_value_channels": plan.padded_value_channels,
            "mlp_pad": mlp_pad, "mlp_stored": plan.mlp_stored,
            "mlp_padded_neurons": sum(plan.mlp_width) - sum(plan.mlp_stored),
            "value_heads_padded": not attn_saved,
            "context_length": plan.context, "tokenizer": tok_info,
            "warnings": plan.warnings, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- command line
def add_parser(sub, formatter_class=None):
    """``fasp-ext export``: registered by fasp_ext/cli.py."""
    kw = {"formatter_class": formatter_class} if formatter_class else {}
    x = sub.add_parser("export", help="write a pruned model to a GGUF file llama.cpp runs (per-layer widths)", **kw,
                       description="Export a fasp_ext result (or a dense checkpoint) of a LLaMA-family model to GGUF: "
                                   "arch llama when every block has the same MLP width, else deci (llama.cpp's "
                                   "per-layer architecture). Pruned value heads are padded back with zeros (exact); "
                                   "kv-head groups pruned with --attn-unit head are written as per-layer head "
                                   "counts, unpadded. "
                                   "What llama.cpp cannot run is refused before anything is written.")
    x.add_argument("--format", default="gguf", choices=["gguf"], help="output format")
    x.add_argument("--model", required=True, help="fasp_ext output folder (or a save_pretrained folder)")
    x.add_argument("--out", required=True, help="the GGUF file to write (must not exist)")
    x.add_argument("--outtype", default="f16", choices=list(OUTTYPES),
                   help="type of the matrices (norms and biases stay f32); q8_0 needs widths that are multiples of "
                        "32 (the MLP's are padded to them by default, --mlp-pad)")
    x.add_argument("--mlp-pad", type=int, default=MLP_PAD,
                   help="pad each MLP width up to a multiple of this with zero rows and columns (exact; default 32: "
                        "llama.cpp decodes aligned widths faster, q8_0 needs 32; 1: as stored)")
    x.add_argument("--arch", default="auto", choices=["auto", "llama", "deci"],
                   help="GGUF architecture: auto (llama when all MLP widths are equal, else deci)")
    x.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) when it is not recognised (default: "
                        "detected)")
    x.add_argument("--quiet", action="store_true", help="no summary")
    x.set_defaults(func=run)
    return x


def run(args) -> int:
    r = export_gguf(args.model, args.out, outtype=args.outtype, arch=args.arch, tokenizer_pre=args.tokenizer_pre,
                    mlp_pad=args.mlp_pad)
    if not args.quiet:
        widths = r["feed_forward_length"]
        print(f"fasp-ext export: {r['out']} ({r['bytes'] / 1e6:.1f} MB, {r['outtype']}, arch {r['arch']}, "
              f"{r['tensors']} tensors, {r['seconds']:.1f} s)")
        hc, kvc = r["head_count"], r["head_count_kv"]
        print(f"  MLP widths per layer: {widths if len(set(widths)) > 1 else widths[0]}; heads "
              f"{hc if len(set(hc)) > 1 else hc[0]} / kv {kvc if len(set(kvc)) > 1 else kvc[0]} of size {r['head_dim']}")
        if r["mlp_padded_neurons"]:
            print(f"  MLP widths padded to multiples of {r['mlp_pad']} ({r['mlp_padded_neurons']} zero neurons, exact)")
        if r["padded_value_channels"]:
            print(f"  value heads padded from {sorted(set(r['v_head_dim']))} to {r['head_dim']} "
                  f"({r['padded_value_channels']} zero channels): the attention saves nothing in llama.cpp")
        print(f"  tokenizer: {r['tokenizer']['model']} (pre {r['tokenizer']['pre']}), chat template "
              f"{'carried over' if r['tokenizer']['chat_template'] else 'none'}")
    return 0
