"""FASP as an llm-compressor modifier: ``oneshot(model=..., dataset=..., recipe=[FASPModifier(...)])``.

Design (the simplest honest one): FASP is a sequential, block-by-block method with its own
calibration loop (capture the inputs of block 0, prune a block, propagate its pruned outputs to
the next block; docs/how-it-works.md, "Sequential calibration"). The modifier therefore does not hook llm-compressor's
forward passes. It declares that it needs no calibration forward passes of its own, so oneshot
runs the data-free pipeline for it (no extra pass through the model), takes the ``input_ids`` of
oneshot's own calibration dataloader (``state.data.calib``, built from ``dataset=``,
``num_calibration_samples``, ``max_seq_length``, ...), and runs :func:`fasp_ext.pipeline.prune` on
them. The result is exactly what ``fasp_ext.prune`` gives on the same windows.

When it prunes: llm-compressor initialises every modifier of the recipe, in order, before any
calibration, and a quantisation modifier attaches its schemes to the layers it finds then (GPTQ also
keeps those modules). First in the recipe, FASP prunes when it is initialised, so the modifiers after
it (``GPTQModifier(scheme="W4A16")``, FP8, INT8 W8A8) are initialised on the pruned model and quantise
the pruned projections too. Last in a recipe (after a modifier it must not disturb) it prunes when its
calibration epoch ends; anywhere else is refused, since the modifiers after it would hold layers that
pruning replaces. W4A16's groups of 128 need every pruned input width to be a multiple of 128:
``options={"mlp_multiple": 128, "attn_multiple": m}`` with ``num_attention_heads * m`` a multiple
of 128 (docs/integrations.md).

After ``oneshot``: the pruned attention is the module's class (fasp_ext/adapters/base.py,
``value_pruned_class``), so the model oneshot hands back runs its forward and ``generate`` although
oneshot's save puts back the stock attention forward compressed-tensors saved when it wrapped the
modules. A folder oneshot wrote after FASP and a quantisation modifier reloads with
``fasp_ext.load_pruned`` (compressed-tensors' decompression on the pruned skeleton, fasp_ext/io.py).

Shapes shrink physically (rows of ``v_proj``/``up_proj``/``gate_proj``, columns of
``o_proj``/``down_proj``). Per-block sizes are recorded in ``config.fasp_ext``; reload the folder
that ``oneshot(output_dir=...)`` (or ``model.save_pretrained``) wrote with
``fasp_ext.load_pruned(path)``. llm-compressor normally re-writes the saved ``config.json`` from the
base model's original file (found through ``config._name_or_path``), which would undo the pruned
sizes: the modifier therefore clears ``config._name_or_path`` after pruning (so a ``recipe.yaml`` of
the base model folder is not carried over either).

In a YAML recipe the modifier is found by name once this module has been imported
(``import fasp_ext.integrations.llmcompressor`` registers it with llm-compressor's factory)::

    fasp_stage:
      pruning_modifiers:
        FASPModifier:
          sparsity: 0.2
          options: {allocation: uniform}

Calibration windows: the padding of every sample is dropped (``attention_mask``). When all samples
then have the same length they are the windows as they are; otherwise they are concatenated (each
keeps its own BOS) and cut into non-overlapping windows of ``seqlen`` tokens (default: the longest
sample), as GPTQ-style code does with long corpora. The model's weights must be materialised (not
offloaded to disk or meta tensors); one block at a time runs on ``device``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier, ModifierFactory
from loguru import logger
from pydantic import PrivateAttr, model_validator

__all__ = ["FASPModifier", "collect_windows"]


def collect_windows(batches: Iterable[Any], seqlen: int | None = None) -> torch.Tensor:
    """Calibration windows ``(nsamples, seqlen)`` from dataloader batches (dicts with ``input_ids``
    and optionally ``attention_mask``, each ``(batch, length)`` or ``(length,)``)."""
    rows: list[torch.Tensor] = []
    for batch in batches:
        if isinstance(batch, dict) or hasattr(batch, "keys"):
            ids = batch["input_ids"]
            mask = batch.get("attention_mask") if hasattr(batch, "get") else None
        else:
            ids, mask = batch, None
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
            mask = None if mask is None else torch.as_tensor(mask).reshape(1, -1)
        for j in range(ids.shape[0]):
            row = ids[j]
            if mask is not None:
                row = row[torch.as_tensor(mask)[j].bool()]
            if row.numel():
                rows.append(row.long().cpu())
    if not rows:
        raise ValueError("FASPModifier: the calibration dataloader gave no tokens")
    lengths = {r.numel() for r in rows}
    if seqlen is None and len(lengths) == 1:
        return torch.stack(rows)
    L = int(seqlen) if seqlen is not None else max(lengths)
    if L < 2:
        raise ValueError(f"FASPModifier: seqlen must be >= 2, got {L}")
    if seqlen is not None and lengths == {L}:
        return torch.stack(rows)
    stream = torch.cat(rows)
    n = stream.numel() // L
    if n == 0:
        raise ValueError(f"FASPModifier: {stream.numel()} calibration tokens, fewer than one window of {L}")
    return stream[: n * L].reshape(n, L).clone()


def _recipe_modifiers() -> list:
    """The modifiers of the active llm-compressor session's recipe, in order ([] if unknown)."""
    from llmcompressor.core import active_session

    recipe = getattr(getattr(active_session(), "lifecycle", None), "recipe", None)
    return list(getattr(recipe, "modifiers", None) or [])


class FASPModifier(Modifier):
    """Structured pruning by FASP (arXiv 2501.09412) inside llm-compressor's ``oneshot``.

    :param sparsity: fraction of each structure removed (MLP neurons, value channels)
    :param method: fasp (default), wanda-sp, flap, depth2, magnitude, random
    :param allocation: per-block allocation (None: the method's own; restored-error curves for fasp)
    :param mlp_only: prune MLP neurons only
    :param damp: ridge damping of the restoration, or "auto"
    :param seqlen: window length when the samples differ in length (None: the longest sample)
    :param device: where each block runs (None: cuda if available, else the model's device)
    :param batch_size: calibration batch size of the block forwards
    :param progress: show fasp_ext's progress bar
    :param options: any other :class:`fasp_ext.pipeline.PruneConfig` field, e.g.
        ``{"selection": "spap", "mlp_sparsity": 0.3, "token_weighting": "none"}``
    """

    sparsity: float = 0.2
    method: str = "fasp"
    allocation: str | None = None
    mlp_only: bool = False
    damp: float | str = 0.1
    seqlen: int | None = None
    device: str | None = None
    batch_size: int = 8
    seed: int = 0
    progress: bool = True
    options: dict[str, Any] = {}

    _dataloader: Any = PrivateAttr(default=None)
    _report: Any = PrivateAttr(default=None)
    _pruned: bool = PrivateAttr(default=False)

    @model_validator(mode="after")
    def _check(self):
        self.prune_config()  # argument errors at recipe creation, before any work
        return self

    def prune_config(self):
        """The :class:`fasp_ext.pipeline.PruneConfig` this modifier runs."""
        from fasp_ext.pipeline import PruneConfig

        fields = set(PruneConfig.__dataclass_fields__)
        bad = sorted(set(self.options) - fields)
        if bad:
            raise ValueError(f"FASPModifier: unknown PruneConfig option(s) {bad}; known: {sorted(fields)}")
        kw = dict(sparsity=self.sparsity, method=self.method, allocation=self.allocation, mlp_only=self.mlp_only,
                  damp=self.damp, device=self.device, batch_size=self.batch_size, seed=self.seed,
                  progress=self.progress)
        kw.update(self.options)
        cfg = PruneConfig(**kw)
        cfg.validate()
        return cfg

    @property
    def report(self):
        """The :class:`fasp_ext.pipeline.PruneReport` of the run (None before it)."""
        return self._report

    def on_initialize(self, state: State, **kwargs) -> bool:
        from fasp_ext.adapters import adapter_for

        adapter_for(state.model)  # unsupported families fail here, before calibration
        self._dataloader = getattr(getattr(state, "data", None), "calib", None)
        if self._dataloader is None:
            raise ValueError("FASPModifier needs calibration data: pass dataset=... to oneshot")
        # Modifiers are initialised in recipe order, and a quantisation modifier attaches its schemes
        # to the linear layers it finds then (GPTQ also keeps those modules by identity). Pruning
        # replaces the projections by new, smaller layers: first in the recipe, FASP prunes here, so
        # every modifier after it is initialised on the pruned model; pruned later, the new layers
        # would carry no scheme and be left unquantised (saved in the quantization_config's ignore).
        mods = _recipe_modifiers()
        pos = next((i for i, m in enumerate(mods) if m is self), None)
        if pos == 0:
            self._prune(state)
        elif pos is not None and pos < len(mods) - 1:
            later = ", ".join(type(m).__name__ for m in mods[pos + 1:])
            raise ValueError(f"FASPModifier: put it first in the recipe (it is number {pos + 1} of {len(mods)}): "
                             f"the modifiers after it ({later}) are initialised before it prunes, on layers that "
                             "pruning replaces")
        return True

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self._prune(state)

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self._pruned:  # a pipeline that never signalled the end of calibration
            self._prune(state)
        self._dataloader = None
        return True

    def _prune(self, state: State) -> None:
        if self._pruned:
            return
        from fasp_ext.pipeline import prune

        cfg = self.prune_config()
        if cfg.device is None:
            cfg.device = "cuda" if torch.cuda.is_available() else None
        tokens = collect_windows(self._dataloader, self.seqlen)
        logger.info(f"FASP: pruning {cfg.sparsity:.0%} ({cfg.method}) on {tokens.shape[0]} windows x "
                    f"{tokens.shape[1]} tokens from oneshot's calibration data")
        with torch.no_grad():
            self._report = prune(state.model, tokens, cfg)
        self._pruned = True
        # llm-compressor's save (oneshot(output_dir=...)) re-writes config.json from the base model's
        # original file, found through config._name_or_path, which would undo the pruned sizes
        # (intermediate_size, config.fasp_ext). With no name it keeps the config transformers wrote.
        if getattr(state.model.config, "_name_or_path", ""):
            logger.info("FASP: clearing config._name_or_path so that saving keeps the pruned config.json "
                        "(not the base model's)")
            state.model.config._name_or_path = ""
        r = self._report
        logger.info(f"FASP: parameters {r.params_before:,} -> {r.params_after:,} in {r.times['total']:.1f} s")


# YAML / JSON recipes name modifiers; register this one with llm-compressor's factory.
ModifierFactory.register("FASPModifier", FASPModifier)
