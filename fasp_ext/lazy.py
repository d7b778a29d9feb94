"""Prune checkpoints bigger than memory: blocks are loaded at their turn and written when done.

``prune_checkpoint(folder, out, tokens, config)`` builds the model on the meta device, loads only
what lies outside the decoder blocks (embeddings, final norm, LM head), and hands the generic
pipeline a :class:`LazyBlocks` mover: block ``i`` is read from the safetensors files when a pass
reaches it, run and pruned on the compute device, then written to the output shards and freed.
Peak host memory is about the embeddings (until the block inputs are captured) + one block + one
calibration batch's activations + the statistics, whatever the depth and the calibration size: the
calibration hidden states go to files in the output's temporary folder (``activations="auto"``,
fasp_ext/spill.py). The output is an ordinary sharded checkpoint (``model-*-of-*.safetensors``
+ ``model.safetensors.index.json``), published atomically like every fasp_ext output, and equal to
what in-memory pruning of the same model writes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .calibration import BlockMover
from .io import Checkpoint, _tied_keys
from .safety import OutputFolder

#: files copied from the input folder next to the pruned weights (tokenizer, generation settings)
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
              "chat_template.json")


_ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
             "F8_E5M2": getattr(torch, "float8_e5m2", None)}


def _trim() -> None:
    """Give freed heap memory back to the system (glibc keeps it per thread arena otherwise, and the
    next block would grow the process instead of reusing it)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _module_prefix(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise RuntimeError("fasp_ext: decoder blocks not found in the model")  # pragma: no cover


def _materialise(module: nn.Module, device, recurse: bool = True, params: bool = True) -> None:
    """Give every meta buffer (and parameter) of ``module`` real (uninitialised) storage on ``device``."""
    mods = module.modules() if recurse else [module]
    for m in mods:
        for store in ((m._parameters, m._buffers) if params else (m._buffers,)):
            for k, t in list(store.items()):
                if t is not None and t.is_meta:
                    e = torch.empty_like(t, device=device)
                    store[k] = nn.Parameter(e, requires_grad=False) if isinstance(t, nn.Parameter) else e


class ShardWriter:
    """Writes tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_bytes`` and
    the index that names them (the Hugging Face sharded-checkpoint layout)."""

    def __init__(self, folder: Path, max_bytes: int = 2 << 30):
        self.folder, self.max_bytes = Path(folder), int(max_bytes)
        self.buf: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, t in tensors.items():
            t = t.detach().to("cpu").contiguous()
            self.buf[k] = t
            self.size += t.numel() * t.element_size()
        if self.size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        from safetensors.torch import save_file

        name = f"part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.buf, str(self.folder / name), metadata={"format": "pt"})
        self.files.append((name, sorted(self.buf)))
        self.total += self.size
        self.buf, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.files)
        wmap = {}
        for j, (name, keys) in enumerate(self.files, 1):
            final = f"model-{j:05d}-of-{n:05d}.safetensors"
            (self.folder / name).rename(self.folder / final)
            wmap.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(wmap.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class LazyBlocks(BlockMover):
    """The model of a checkpoint with its decoder blocks on the meta device until their turn.

    ``model`` is ready to run as far as the pipeline needs (the embeddings and final norm are loaded,
    an untied LM head stays on disk); ``fetch`` reads block ``i`` from the checkpoint onto the compute device, ``release``
    frees it again (after handing it to ``writer`` when it is final). ``materialised`` counts the
    blocks holding real storage at any moment; ``peak_materialised`` is the most there ever were.
    """

    block_by_block = True

    def __init__(self, folder, dtype: torch.dtype | None = None):
        from .adapters import adapter_for

        self.ck = Checkpoint(folder, dtype, arg="--model")
        model = self.ck.skeleton().eval()
        self.adapter = adapter_for(model)
        self.blocks = self.adapter.blocks(model)
        self.prefix = _module_prefix(model, self.blocks)
        inside = {id(m) for b in self.blocks for m in b.modules()} | {id(self.blocks)}
        outside = [m for m in model.modules() if id(m) not in inside]
        self.model = model
        # an untied output head is not needed to prune (calibration stops at the last block): it
        # stays on the meta device and is copied from the checkpoint when the output is written
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.deferred = set()
        if head is not None and not _tied_keys(model) and getattr(head, "weight", None) is not None:
            self.deferred = {n for n, p in model.named_parameters() if p is head.weight} & set(self.ck.table)
        # buffers first (computed by transformers' init while the parameters are still meta, so the
        # init touches no weight), then the weights are read straight into the parameters
        for m in outside:
            _materialise(m, "cpu", recurse=False, params=False)
        self._init_buffers(model, outside)
        model.load_state_dict(self._read(lambda k: not k.startswith(self.prefix + ".") and k not in self.deferred),
                              strict=False, assign=True)
        model.tie_weights()
        for m in outside:  # anything the checkpoint does not hold (tied copies are tied above)
            if not (head is not None and m is head and self.deferred):
                _materialise(m, "cpu", recurse=False)
        self.writer: ShardWriter | None = None
        self.materialised = 0
        self.peak_materialised = 0
        self.loads = [0] * len(self.blocks)
        super().__init__(torch.device("cpu"))

    def _init_buffers(self, model: nn.Module, modules) -> None:
        """Non-persistent buffers (rotary frequencies, embedding scales) are not in a checkpoint:
        let transformers initialise the modules that own them."""
        for m in modules:
            if getattr(m, "_non_persistent_buffers_set", None):
                model._init_weights(m)

    def _read(self, want, device="cpu") -> dict[str, torch.Tensor]:
        """The checkpoint tensors whose names pass ``want``, read straight into fresh tensors (no
        memory map: the file's pages are not added to this process's memory)."""
        out = {}
        starts: dict[Path, int] = {}
        for k, (f, t) in self.ck.table.items():
            if not want(k):
                continue
            if f not in starts:
                with open(f, "rb") as fh:
                    starts[f] = 8 + int.from_bytes(fh.read(8), "little")
            a, b = (int(x) for x in t["data_offsets"])
            x = torch.empty([int(s) for s in t["shape"]], dtype=_ST_TORCH[t["dtype"]])
            with open(f, "rb") as fh:
                fh.seek(starts[f] + a)
                if b > a and fh.readinto(x.view(-1).view(torch.uint8).numpy()) != b - a:
                    raise OSError(f"--model: {f} ended early reading {k}")
            if x.is_floating_point() and x.dtype != self.ck.dtype:
                x = x.to(self.ck.dtype)
            out[k] = x.to(device)
        return out

    def fetch(self, blocks, i, device):
        block = blocks[i]
        name = f"{self.prefix}.{i}."
        state = {k[len(name):]: v for k, v in self._read(lambda k: k.startswith(name), device).items()}
        # the read tensors become the parameters (assign): no second copy of the block
        _materialise(block, device, params=False)  # buffers outside the checkpoint (none in the supported families)
        self._init_buffers(self.model, list(block.modules()))
        missing, unexpected = block.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:  # the skeleton was checked against the table: a defect if this fires
            raise RuntimeError(f"fasp_ext: block {i} does not match the checkpoint ({missing[:3]}, {unexpected[:3]})")
        self.materialised += 1
        self.peak_materialised = max(self.peak_materialised, self.materialised)
        self.loads[i] += 1
        return block

    def release(self, blocks, i, block, final):
        if final and self.writer is not None:
            self.writer.add({f"{self.prefix}.{i}.{k}": v for k, v in block.state_dict().items()})
            self.writer.flush()  # one shard per block: nothing waits in memory
        blocks[i] = block.to("meta")
        self.materialised -= 1
        _trim()

    def captured(self, model):
        """The embeddings (everything outside the blocks) are not needed again until the output is
        written, and pruning never changes them: free them now, copy them from the checkpoint then."""
        inside = {id(m) for b in self.blocks for m in b.modules()}
        moved: dict[int, nn.Parameter] = {}  # a tied parameter (embedding = LM head) stays one parameter
        for m in model.modules():
            if id(m) in inside:
                continue
            for k, t in list(m._parameters.items()):
                if t is not None and not t.is_meta:
                    if id(t) not in moved:
                        moved[id(t)] = nn.Parameter(t.to("meta"), requires_grad=False)
                    m._parameters[k] = moved[id(t)]
        tied = _tied_keys(model)
        self.deferred |= {k for k in self.ck.table if not k.startswith(self.prefix + ".") and k not in tied}

    def write_rest(self) -> None:
        """Everything outside the blocks (tied copies left out, as save_pretrained does)."""
        tied = _tied_keys(self.model)
        rest = {k: v for k, v in self.model.state_dict().items()
                if not k.startswith(self.prefix + ".") and k not in tied and k not in self.deferred}
        if any(v.is_meta for v in rest.values()):  # pragma: no cover - a defect
            raise RuntimeError(f"fasp_ext: tensors lost outside the blocks: {[k for k, v in rest.items() if v.is_meta]}")
        self.writer.add(rest)
        self.writer.flush()
        _trim()
        for k in sorted(self.deferred):  # embeddings and output head, unchanged: one at a time in memory
            self.writer.add(self._read(lambda name: name == k))
            self.writer.flush()


def prune_checkpoint(folder, out, calibration, config=None, dtype: torch.dtype | None = None,
                     overwrite: bool = False, report_extra: dict | None = None, max_shard_bytes: int = 2 << 30,
                     protected=(), evaluate=None):
    """Prune the checkpoint in ``folder`` block by block into ``out`` without ever holding more
    than one decoder block in memory; returns the pipeline's report (a dict, as written to
    ``fasp_report.json``). ``calibration``: token windows (nsamples x seqlen), as for ``prune``.
    ``dtype``: the dtype to prune and store in (default: the checkpoint's, by its safetensors headers).
    ``evaluate(folder) -> dict``, when given, is called on the written result before it is published
    (weights, config and tokenizer in place); what it returns goes into the report and model card."""
    from .pipeline import PruneConfig, prune

    folder = Path(folder).expanduser()
    config = config or PruneConfig()
    t0 = time.perf_counter()
    lazy = LazyBlocks(folder, dtype)
    t_load = time.perf_counter() - t0
    if distributed.rank() != 0:  # under torch.distributed one process writes; the others only compute
        report = prune(lazy.model, calibration, config, mover=lazy)
        return dict(report_extra or {}, **report.to_dict())
    out_folder = OutputFolder(out, overwrite=overwrite, protected=(folder, *protected), arg="out")
    with out_folder as tmp:
        lazy.writer = ShardWriter(tmp, max_shard_bytes)
        if config.activations != "memory" and config.activations_dir is None:
            # activations on disk go with the output (its file system, swept with it after a crash)
            config = dataclasses.replace(config, activations_dir=str(tmp))
        report = prune(lazy.model, calibration, config, mover=lazy)
        t1 = time.perf_counter()
        lazy.write_rest()
        lazy.writer.finish()
        cfg = lazy.model.config
        cfg.dtype = lazy.ck.dtype
        cfg.save_pretrained(tmp)
        for name in SIDE_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        result = dict(report_extra or {})
        result.update(report.to_dict())
        result.update({"lazy": True, "load_seconds": t_load, "save_seconds": time.perf_counter() - t1,
                       "peak_blocks_in_memory": lazy.peak_materialised, "dtype": str(lazy.ck.dtype).split(".")[-1]})
        if evaluate is not None:
            t2 = time.perf_counter()
            result.update(evaluate(tmp))
            result["eval_seconds"] = time.perf_counter() - t2
        (tmp / "fasp_report.json").write_text(json.dumps(result, indent=2, default=str))
        from .card import write_model_card

        write_model_card(tmp, result, config=config)
        out_folder.publish()
    return result
