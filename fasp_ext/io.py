"""Saving pruned models atomically and rebuilding their architecture on load (safetensors only)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import torch

from .adapters import adapter_for
from .safety import OutputFolder, UserError, read_config, safetensors_header, weight_files

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _model_folder(model) -> Path | None:
    p = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return Path(p) if p and Path(str(p)).is_dir() else None


def save_pruned(model, out_dir: str | os.PathLike, tokenizer=None, report: dict | None = None,
                overwrite: bool = False, protected=(), config=None) -> Path:
    """Write ``model`` (safetensors + config), ``tokenizer``, ``fasp_report.json`` and a model card
    (``README.md``, from ``report`` and the ``PruneConfig`` ``config``; fasp_ext/card.py) to ``out_dir``.

    Everything is written to a temporary sibling folder and published by renames at the end, so a
    failure or a signal leaves nothing half-written, and a previous result is deleted only after
    the new one is in place. ``overwrite`` replaces only an empty folder or a previous fasp_ext
    output, never the current folder or one above it, the home or root folder, the folder the
    model was loaded from, or one holding any path in ``protected`` (fasp_ext/safety.py). When
    ``report`` is a dict its ``save_seconds`` is set to the time the weights took to write.
    """
    protected = tuple(protected) + ((_model_folder(model),) if _model_folder(model) else ())
    folder = OutputFolder(out_dir, overwrite=overwrite, protected=protected, arg="out")
    with folder as tmp:
        t0 = time.perf_counter()
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        except OSError as e:  # a full disk, a quota: one clear line, nothing left behind
            raise OSError(e.errno, f"out: writing the pruned model failed ({e.strerror or e})") from None
        if report is not None:
            from .card import write_model_card

            report["save_seconds"] = time.perf_counter() - t0
            (tmp / "fasp_report.json").write_text(json.dumps(report, indent=2, default=str))
            write_model_card(tmp, report, config=config)
        return folder.publish()


# ----------------------------------------------------------------------------- loading
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate_meta(meta, config, adapter, n_blocks: int, where: Path) -> tuple:
    """Check the ``fasp_ext`` config section before anything is allocated; returns (value head sizes,
    MLP widths, added biases, per-layer (query heads, kv heads) or None where no head was removed)."""
    bad = lambda msg: UserError(f"path: {where / 'config.json'}: fasp_ext section {msg}")  # noqa: E731
    if not isinstance(meta, dict):
        raise bad(f"must be an object, got {type(meta).__name__}")
    for key in ("v_head_dim", "mlp_width"):
        if not isinstance(meta.get(key), list):
            raise bad(f"needs a list {key!r}")
        if len(meta[key]) != n_blocks:
            raise bad(f"lists {len(meta[key])} {key} entries for a model of {n_blocks} blocks")
        if not all(_is_int(x) for x in meta[key]):
            raise bad(f"{key} must hold integers, got {meta[key][:8]}")
    lm = adapter.lm_config(config)
    n, kv, hd = adapter.head_geometry(lm)
    heads = None
    if "num_attention_heads" in meta or "num_key_value_heads" in meta:  # kv-head groups removed
        for key in ("num_attention_heads", "num_key_value_heads"):
            vals = meta.get(key)
            if not isinstance(vals, list) or len(vals) != n_blocks or not all(_is_int(x) for x in vals):
                raise bad(f"needs a list {key!r} of {n_blocks} integers (one per block) next to the other")
        heads = list(zip(meta["num_attention_heads"], meta["num_key_value_heads"]))
        for i, (nh, nkv) in enumerate(heads):
            if not (1 <= nkv <= kv and nh == nkv * (n // kv)):
                raise bad(f"num_attention_heads[{i}] = {nh}, num_key_value_heads[{i}] = {nkv} do not remove whole "
                          f"kv-head groups of the config's {n} / {kv} heads")
        if not adapter.removes_heads:
            raise bad(f"lists per-layer head counts, which {lm.model_type} cannot have")
    width = getattr(lm, adapter.mlp_size_key, None)
    for i, (dv, w) in enumerate(zip(meta["v_head_dim"], meta["mlp_width"])):
        if not 1 <= dv <= hd:
            raise bad(f"v_head_dim[{i}] = {dv} is outside [1, {hd}] (the query/key head size)")
        if not (_is_int(width) and 1 <= w <= width):
            raise bad(f"mlp_width[{i}] = {w} is outside [1, {width}] ({adapter.mlp_size_key})")
    added = meta.get("added_bias", [])
    if not isinstance(added, list) or not all(isinstance(a, str) for a in added):
        raise bad("added_bias must be a list of module names")
    return meta["v_head_dim"], meta["mlp_width"], added, heads


def _tensor_table(p: Path, arg: str = "path") -> dict[str, tuple[Path, dict]]:
    table: dict[str, tuple[Path, dict]] = {}
    for f in weight_files(p, arg):
        for name, t in safetensors_header(f, arg).items():
            if name in table:
                raise UserError(f"{arg}: tensor {name!r} is stored twice ({table[name][0].name} and {f.name})")
            table[name] = (f, {**t, "name": name})  # "name": as stored, if the table is re-keyed
    return table


def _native_names(model, stored: set[str]) -> dict[str, str]:
    """{stored name: the model's own name} for the tensors transformers stores under other names.

    transformers 5 writes some models in their original checkpoint layout (the multimodal Gemma 3:
    ``language_model.model.layers.N...`` for the model's ``model.language_model.layers.N...``) and
    renames them back when loading; a checkpoint read tensor by tensor needs the same renaming. The
    model's state dict goes through transformers' own reverse mapping once, and each stored name is
    matched to the tensor it came from (one-to-one renamings only: a merged tensor matches nothing).
    A transformers without that mapping, or a name it does not rename, maps to itself."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - a transformers without weight conversions
        return {}
    sd = model.state_dict()
    try:
        saved = revert_weight_conversion(model, dict(sd))
    except Exception:  # pragma: no cover - a conversion that needs real tensors
        return {}
    by_id: dict[int, list[str]] = {}
    for name, t in sd.items():
        by_id.setdefault(id(t), []).append(name)
    out = {}
    for key, t in saved.items():
        names = by_id.get(id(t), [])
        if len(names) > 1:  # tied copies share a tensor: rename each on its own
            names = [n for n in names if list(revert_weight_conversion(model, {n: t})) == [key]]
        if len(names) == 1 and names[0] != key and key in stored:
            out[key] = names[0]
    return out


def _tied_keys(model) -> set[str]:
    """Parameters that are copies of others (an lm_head tied to the embedding) and need not be stored."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "_tied_weights_keys", None) or [])


def _build(config, dtype, meta, adapter, n_check: Path | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if meta is not None:
        v_dims, widths, added, heads = meta
        for i, (block, dv, w) in enumerate(zip(adapter.blocks(model), v_dims, widths)):
            adapter.resize_block(block, adapter.lm_config(config), dv, w, None if heads is None else heads[i])
        for name in added:  # biases fitted by the pruning (intercept, FLAP)
            try:
                lin = model.get_submodule(name)
            except AttributeError:
                lin = None
            if not isinstance(lin, torch.nn.Linear):
                raise UserError(f"path: fasp_ext.added_bias names {name!r}, which is not a linear layer")
            lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                      device=lin.weight.device))
    return model


def _compressor(raw: dict, where: Path, arg: str):
    """compressed-tensors' ``ModelCompressor`` for a folder whose config.json holds a compressed-tensors
    ``quantization_config`` (llm-compressor's output), None for a folder without one; a clear error for
    any other quantisation method, or when compressed-tensors is not installed."""
    q = raw.get("quantization_config")
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method != "compressed-tensors":
        raise UserError(f"{arg}: {where / 'config.json'} declares quantization method {method!r}; fasp_ext reads "
                        "unquantised folders and compressed-tensors ones (llm-compressor's)")
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise UserError(f"{arg}: {where} is quantised in compressed-tensors' format ({q.get('format')}); reading it "
                        "needs compressed-tensors: pip install compressed-tensors")
    from compressed_tensors.compressors import ModelCompressor
    from transformers.utils.quantization_config import CompressedTensorsConfig

    try:
        compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(q))
    except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        msg = " ".join(str(e).split())[:300]
        raise UserError(f"{arg}: {where / 'config.json'}: quantization_config cannot be read by compressed-tensors "
                        f"({msg})") from None
    return compressor if compressor.quantization_config is not None else None  # no scheme: nothing quantised


class Checkpoint:
    """A safetensors checkpoint folder, checked without allocating a weight: its config, the tensor
    table of exactly the files it declares, and a meta-device skeleton (per-block sizes rebuilt from
    the ``fasp_ext`` section) whose every tensor matches the table in name and shape. A folder
    quantised by llm-compressor (a compressed-tensors ``quantization_config``) is checked in the
    layout it is stored in: the skeleton carries the quantisation and is compressed as
    compressed-tensors compresses it, so ``weight_packed``/``weight_scale``/... are the expected names."""

    def __init__(self, path, dtype: torch.dtype | None = None, arg: str = "path"):
        from transformers import AutoConfig

        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{arg}: {p} does not exist")
        if not p.is_dir():
            raise UserError(f"{arg}: {p} is not a folder")
        self.path, self.arg = p, arg
        self.raw = read_config(p, arg)
        self.table = _tensor_table(p, arg)
        try:
            self.config = AutoConfig.from_pretrained(p)
        except (ValueError, KeyError, OSError) as e:
            raise UserError(f"{arg}: {p / 'config.json'} cannot be read by transformers ({e})") from None
        if dtype is None:
            counts = Counter(_ST_DTYPES[t["dtype"]] for _, t in self.table.values() if t["dtype"] in _ST_DTYPES)
            dtype = counts.most_common(1)[0][0] if counts else torch.float32
        self.dtype = dtype
        self.compressor = _compressor(self.raw, p, arg)
        self.meta, self.adapter = None, None
        if "fasp_ext" in self.raw:
            self.adapter = adapter_for(self.config)
            with torch.device("meta"):
                skeleton = _build(self.config, dtype, None, self.adapter)
            n_blocks = len(self.adapter.blocks(skeleton))
            self.meta = _validate_meta(self.raw["fasp_ext"], self.config, self.adapter, n_blocks, p)

    def skeleton(self):
        """The model on the meta device, checked against the tensor table."""
        with torch.device("meta"):
            skeleton = self._quantised(_build(self.config, self.dtype, self.meta, self.adapter))
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        tied = _tied_keys(skeleton)
        if any(k not in expected for k in self.table):  # stored in the original layout: the model's names
            rename = _native_names(skeleton, set(self.table))
            self.table = {rename.get(k, k): v for k, v in self.table.items()}
        table = self.table
        missing = [k for k in expected if k not in table and k not in tied and not k.endswith("rotary_emb.inv_freq")]
        unexpected = [k for k in table if k not in expected]
        wrong = [f"{k} is {list(table[k][1]['shape'])} in {table[k][0].name}, the config gives {list(expected[k])}"
                 for k in expected if k in table and tuple(table[k][1]["shape"]) != expected[k]]
        if wrong and not missing and not unexpected:  # one line: the first tensor and both shapes
            more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
            raise UserError(f"{self.arg}: the weights in {self.path} do not match its config: {wrong[0]}{more}")
        if missing or unexpected or wrong:
            parts = [f"{what} {items[:5]}" for what, items in (("missing", missing), ("unexpected", unexpected),
                                                                ("wrong shape", wrong)) if items]
            raise UserError(f"{self.arg}: the weights in {self.path} do not match its config: " + "; ".join(parts))
        return skeleton

    def build(self):
        """The model with freshly initialised weights of the checked architecture (CPU); for a
        quantised folder, in compressed-tensors' compressed layout (:meth:`decompress` after loading)."""
        return self._quantised(_build(self.config, self.dtype, self.meta, self.adapter))

    def _quantised(self, model):
        """``model`` with the folder's quantisation applied as transformers' compressed-tensors loader
        applies it before reading weights: the schemes attached to the layers the config names, and
        those layers compressed (``weight_packed``, ``weight_scale``, ``weight_shape``, ... in place of
        ``weight``), so its tensors are the ones stored. Unchanged for a folder without quantisation."""
        if self.compressor is None:
            return model
        from compressed_tensors.quantization import apply_quantization_config

        apply_quantization_config(model, self.compressor.quantization_config, run_compressed=False)
        if self._compressed:
            self.compressor.compress_model(model=model)
        return model

    def decompress(self, model):
        """A loaded quantised model (from :meth:`build`) decompressed in place by compressed-tensors
        (each layer's weight dequantised; the quantisation schemes stay attached, so activations are
        quantised as in llm-compressor's model), as a plain model: compressed-tensors' decompression
        puts every module under its offloading wrapper, which is removed again."""
        if self.compressor is None or not self._compressed:
            return model
        from compressed_tensors.offload import remove_dispatch

        self.compressor.decompress_model(model=model)
        return remove_dispatch(model, onload_tensors=True)

    @property
    def _compressed(self) -> bool:
        """The weights are stored compressed (status "compressed", as transformers' loader decides);
        a "frozen" folder stores them dense, next to their scales."""
        return getattr(self.compressor.quantization_config, "quantization_status", None) == "compressed"


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a model saved by fasp_ext (or any safetensors checkpoint of a supported family),
    rebuilding per-block sizes (value head size, MLP width) from the config's ``fasp_ext`` section.

    Strict: only the weight files the checkpoint declares are read (``model.safetensors``, or the
    shards of ``model.safetensors.index.json``); a tensor stored twice, missing, unexpected or of
    the wrong shape is an error naming it, and everything is checked against the safetensors
    headers before the model is allocated. Nothing is unpickled. The saved dtype is kept unless
    ``dtype`` asks for another.

    A folder that llm-compressor quantised (``oneshot`` with FASP then GPTQ/FP8/INT8: compressed-tensors'
    packed format on the pruned widths) is rebuilt the same way, the skeleton then quantised and
    compressed with compressed-tensors, checked and filled as strictly, and decompressed by
    compressed-tensors: the model runs the dequantised weights (and quantised activations where the
    scheme has them) as llm-compressor's model in memory does. That needs ``compressed-tensors``
    (installed with llm-compressor).
    """
    from safetensors import safe_open

    ck = Checkpoint(path, dtype)
    ck.skeleton()  # shapes first, on a skeleton that allocates nothing
    p, table, dtype = ck.path, ck.table, ck.dtype
    model = ck.build()
    by_file: dict[Path, list[str]] = {}
    for k, (f, t) in table.items():
        by_file.setdefault(f, []).append((k, t["name"]))
    state = {}
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            for k, stored in keys:
                state[k] = sf.get_tensor(stored)
    model.load_state_dict(state, strict=False)
    model = ck.decompress(model)
    model.tie_weights()
    gen = p / "generation_config.json"
    if gen.is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(p)
        except (ValueError, OSError):
            pass
    return model.to(dtype).to(device).eval()


def load_model_and_tokenizer(spec: str, dtype: torch.dtype | str = "auto", device="cpu"):
    """(model, tokenizer) for a fasp_ext output folder (rebuilt by load_pruned) or any model spec
    that :func:`fasp_ext.models.load_model` accepts (a local folder, 'smollm2')."""
    p = Path(spec).expanduser()
    cfg_file = p / "config.json"
    if cfg_file.is_file() and "fasp_ext" in read_config(p, "--model"):
        from transformers import AutoTokenizer

        return (load_pruned(p, dtype=None if dtype == "auto" else dtype, device=device),
                AutoTokenizer.from_pretrained(p))
    from . import models

    return models.load_model(spec, dtype=dtype, device=device)
