"""The generic FASP pipeline: sequential calibration, scoring, selection, restoration, shrinking.

``prune(model, calibration, config)`` works on any model an adapter (fasp_ext/adapters) describes;
it never asks which family the model is. Per block (docs/how-it-works.md, "Sequential calibration"):

1. run the block up to the attention output projection, collecting its input statistics;
2. prune the value channels (v_proj rows + o_proj columns), restoring o_proj by least squares;
3. run the block with the pruned attention, collecting the MLP down projection's input statistics;
4. prune the MLP neurons, restoring the down projection;
5. produce the next block's inputs: where the down projection feeds the residual stream directly
   (pre-norm blocks) step 3 stops at the down projection, keeping its inputs z and the residual
   stream h it is added to, and the outputs are h + down'(z[:, kept]), what the pruned block
   computes; otherwise the block is run once more.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import allocation, distributed, methods, ops, spill
from .adapters import Adapter, adapter_for
from .adapters.base import _shrink_linear, new_linear
from .damping import DEFAULT_GRID
from .units import (STRUCTURES, judged_weight, kept_count, structure_stats,  # noqa: F401 (importable from here)
                    value_groups)
from .methods import restore_toward  # noqa: F401 (importable from here too)
from .calibration import (GRAM_PRECISIONS, BlockInputs, BlockMover, Stats, capture_block_inputs, collect,
                          kept_linear, record, replay_attention, run_block)

log = logging.getLogger("fasp_ext")

TOKEN_WEIGHTINGS = ("auto", "none")
#: what the attention loses (``PruneConfig.attn_unit``): value channels, or whole kv-head groups
ATTN_UNITS = ("channel", "head")
#: the parts a run is made of, by name (fasp_ext/methods.py; the allocations: fasp_ext/allocation.py)
METHODS, SELECTIONS, ALLOCATIONS = methods.METHODS, methods.SELECTIONS, methods.ALLOCATIONS


class _PartView(Mapping):
    """A read-only ``{name: field}`` view of a registry, for the names this module has always had."""

    def __init__(self, registry, field: str):
        self._registry, self._field = registry, field

    def _items(self) -> dict:
        return {n: getattr(p, self._field) for n, p in self._registry.items() if getattr(p, self._field) is not None}

    def __getitem__(self, name):
        return self._items()[name]

    def __iter__(self):
        return iter(self._items())

    def __len__(self):
        return len(self._items())

    def __repr__(self):
        return repr(self._items())


#: per-block allocation each method uses unless told otherwise (``Method.default_allocation``): FASP
#: by the blocks' restored-error curves ranked across blocks and structures per parameter
#: ("error-am"; with ``mlp_sparsity``/``attn_sparsity`` given, per structure, "error", so each total
#: holds); FLAP ranks its standardised fluctuation scores across blocks, as its paper does;
#: Wanda-sp, magnitude and random prune every block alike, as their papers do. The evidence:
#: docs/decisions.md
DEFAULT_ALLOCATION = _PartView(METHODS, "default_allocation")
#: calibration windows each allocation's dense pass uses by default (``allocation_samples=None``,
#: ``Allocation.windows``); why these counts: docs/decisions.md
ALLOCATION_SAMPLES = _PartView(ALLOCATIONS, "windows")
#: Gram precision per device type when ``PruneConfig.gram_precision`` is None (docs/gpu.md: the
#: accuracy screen that decides the GPU's, bench/results/gram_precision_screen.md; TF32 moved
#: perplexity by at most 0.01 % there, docs/decisions.md says why not bf16)
GRAM_PRECISION_DEFAULT = {"cpu": "fp32", "cuda": "tf32"}

#: ``PruneConfig.activations``
ACTIVATIONS = ("auto", "memory", "disk")

#: tokens one block forward takes at most on a CPU when ``PruneConfig.batch_size`` is None
CPU_BATCH_TOKENS = 4096


def auto_batch_size(device, seqlen: int) -> int:
    """Calibration windows per block forward when ``PruneConfig.batch_size`` is None: 8, and on a CPU
    no more than make ``CPU_BATCH_TOKENS`` tokens (at least one window). A forward's intermediate
    activations grow with the tokens it takes (an MLP of width 4096 holds three 16,384 x 4096 fp32
    tensors, 0.8 GB, at 8 windows of 2048), which block-by-block pruning would otherwise spend
    beside one block (docs/decisions.md)."""
    if torch.device(device).type != "cpu":
        return 8
    return max(1, min(8, CPU_BATCH_TOKENS // max(int(seqlen), 1)))


@dataclass
class PruneConfig:
    """Settings of one pruning run. ``sparsity`` is the fraction of each structure removed."""

    sparsity: float = 0.2
    #: per-structure overrides (None: use ``sparsity``)
    mlp_sparsity: float | None = None
    attn_sparsity: float | None = None
    #: prune MLP neurons only (attention untouched)
    mlp_only: bool = False
    #: kept MLP width rounded to a multiple of this (tensor-core friendly)
    mlp_multiple: int = 8
    #: kept value channels per kv head rounded to a multiple of this (attn_unit "channel" only)
    attn_multiple: int = 1
    #: what the attention loses: "channel" (value channels: v_proj rows and the o_proj columns reading
    #: them, an equal count per kv head; the default) or "head" (whole kv-head groups: a kv head's k
    #: and v rows, the q rows of the query heads sharing it and their o_proj columns, so the attention
    #: and the KV cache shrink too; not for Phi-3's fused qkv_proj). ``attn_sparsity`` is then the
    #: fraction of each block's kv heads removed (rounded, at least one kept)
    attn_unit: str = "channel"
    #: selection method: fasp (score + restore), wanda-sp (score only), flap (fluctuation score +
    #: bias compensation), depth2 (second-moment score + two-step reconstruction: removed units' mean
    #: into the bias, then least squares on the centred statistics), magnitude, random
    method: str = "fasp"
    #: ridge damping of the restoration, relative to mean(diag H[S, S]); "auto" picks it per matrix
    #: from held-out calibration samples (every ``val_every``-th one) over ``damp_grid``
    damp: float | str = 0.1
    val_every: int = 5
    damp_grid: tuple = DEFAULT_GRID
    #: also fit a bias shift (only where the restored projection has a bias)
    intercept: bool = False
    #: solve in float64
    fp64: bool = False
    #: statistics for every block from the dense model's activations (no propagation)
    one_pass: bool = False
    #: calibration windows per block forward (None: ``auto_batch_size``: 8, fewer on a CPU for
    #: windows longer than 512 tokens, so one forward's activations stay small next to the model)
    batch_size: int | None = None
    #: compute device (None: the model's device)
    device: str | None = None
    #: which units go, for method fasp: "score" (the FASP score, default), "obs" (greedy removal by
    #: the exact increase of the restored error, with Optimal Brain Surgeon updates) or "spap"
    #: (SPAP-style: alternate re-choosing the kept set and re-solving the weights under a growing
    #: penalty on the removed units, ``spap_rounds`` rounds); fasp_ext/selection.py
    selection: str = "score"
    spap_rounds: int = 5
    #: how many units each block keeps: "uniform", "error" (by each block's restored-error curve),
    #: "error-am" (the curves ranked across blocks and structures, per parameter; same total of
    #: parameters), "flap" (FLAP's standardised fluctuation scores ranked across blocks; same total
    #: per structure) or "flap-am" (ranked across blocks and structures; same total of parameters).
    #: None (default): the method's own, ``DEFAULT_ALLOCATION`` ("error-am" for fasp, or "error" when
    #: ``mlp_sparsity``/``attn_sparsity`` is given; "flap" for flap,
    #: "uniform" for the others). Non-uniform allocation costs one extra dense pass over ``allocation_samples``
    #: windows (fasp_ext/allocation.py) and gives blocks different widths (reload with load_pruned)
    allocation: str | None = None
    #: most any one block may lose under non-uniform allocation (None: 1.5x the sparsity, at most 0.9)
    max_block_sparsity: float | None = None
    #: calibration windows the allocation's dense pass uses (the first ones; 0: all; None: the
    #: allocation's own default, ``ALLOCATION_SAMPLES``: 12 for "error-am", 16 for "error", 32 for FLAP's rankings).
    #: One-pass mode decides the allocation from its own dense pass over all windows instead, when
    #: every block's statistics fit ``store_budget_bytes``
    allocation_samples: int | None = None
    #: tokens of each of those windows the allocation's dense pass uses (the first ones; 0: all)
    allocation_seqlen: int = 0
    #: sequential mode, "error"/"error-am" allocation: decide each block's kept counts again just
    #: before pruning it, from its own statistics (every window, the pruned model's stream), over what
    #: is left of the budget; the dense pass's curves stand in for the blocks not reached yet
    allocation_replan: bool = False
    #: what the restoration fits (sequential mode, method fasp): "pruned" (the FASP default: W x with
    #: x the pruned model's own inputs) or "dense" (W x_dense, the dense model's output, so errors
    #: of earlier blocks are corrected too; one extra dense forward per block)
    target: str = "pruned"
    #: how the calibration tokens count in the statistics of a projection whose output the block
    #: RMS-normalises before the residual add (Gemma 2/3): "auto" (method fasp: each token weighed by
    #: the factor that norm scales it by, so the restoration, selection and allocation fit the error
    #: the residual stream receives) or "none" (every token alike, the FASP paper's objective)
    token_weighting: str = "auto"
    #: seed for the random method and any sampling
    seed: int = 0
    #: memory for what saves a pass, up to this many bytes each: the output projections' inputs
    #: (sequential mode: the attention is replayed and block outputs computed from the stored down
    #: projection inputs instead of running the block again)
    #: and, in one-pass mode with a non-uniform allocation, every block's statistics. None: 2 GiB on
    #: a CPU; on a GPU a third of the device memory left free by the model and the calibration
    #: activations (``plan_placement``)
    store_budget_bytes: int | None = None
    #: keep the calibration hidden states (and the correction's stored inputs) in host memory, pinned
    #: on a GPU, and bring one batch at a time to the compute device (docs/memory.md)
    offload_activations: bool = False
    #: where the calibration activations kept on the host live: "memory", "disk" (a file per list of
    #: batches in a new folder under ``activations_dir``, one batch in memory at a time; the folder is
    #: removed at the end: fasp_ext/spill.py, docs/memory.md) or "auto" (disk when pruning block by
    #: block, ``prune_checkpoint``, and they exceed ``spill.AUTO_MIN_BYTES``; memory otherwise)
    activations: str = "auto"
    #: the folder "disk" activations go under (None: the system's temporary folder; block-by-block
    #: pruning puts them in its output's temporary folder, on the output's file system)
    activations_dir: str | None = None
    #: what the Gram updates multiply on fp32 activations: "fp32", "tf32" (TF32 tensor-core
    #: products) or "bf16" (inputs rounded to bfloat16), always summed in fp32; None: the device's
    #: default, ``GRAM_PRECISION_DEFAULT`` (fp32 on a CPU, where the others are only emulated; tf32
    #: on a GPU: docs/gpu.md). A model already in fp16/bf16 is multiplied in its own dtype either way
    gram_precision: str | None = None
    #: show a progress bar
    progress: bool = True

    def gram_precision_on(self, device) -> str:
        """The Gram precision used on ``device``: ``gram_precision``, or the device type's default."""
        if self.gram_precision is not None:
            return self.gram_precision
        return GRAM_PRECISION_DEFAULT.get(torch.device(device).type, "fp32")

    def validate(self) -> None:
        for name in ("sparsity", "mlp_sparsity", "attn_sparsity"):
            v = getattr(self, name)
            if v is None and name != "sparsity":
                continue
            if not isinstance(v, (int, float)) or not (0.0 <= float(v) < 1.0) or math.isnan(float(v)):
                raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")
        for name in ("allocation_samples", "allocation_seqlen"):  # allocation_samples None: the default
            v = getattr(self, name)
            if not (v is None and name == "allocation_samples") and int(v) < 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        for name in ("mlp_multiple", "attn_multiple", "batch_size"):
            if getattr(self, name) is None and name == "batch_size":
                continue
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.attn_unit not in ATTN_UNITS:
            raise ValueError(f"attn_unit must be one of {', '.join(ATTN_UNITS)}, got {self.attn_unit!r}")
        if self.attn_unit == "head" and int(self.attn_multiple) != 1:
            raise ValueError(f"attn_multiple rounds value channels per head; with attn_unit='head' it must be 1, "
                             f"got {self.attn_multiple!r}")
        # the method, selection, allocation and restoration: each part looked up and checking its own
        # rules (fasp_ext/methods.py)
        methods.check(self)
        mbs = self.max_block_sparsity
        if mbs is not None and (not isinstance(mbs, (int, float)) or not (0.0 < float(mbs) < 1.0)):
            raise ValueError(f"max_block_sparsity must be a number in (0, 1), got {mbs!r}")
        if self.token_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(f"token_weighting must be one of {', '.join(TOKEN_WEIGHTINGS)}, "
                             f"got {self.token_weighting!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        if self.target not in ("pruned", "dense"):
            raise ValueError(f"target must be 'pruned' or 'dense', got {self.target!r}")
        if self.damp != "auto" and (not isinstance(self.damp, (int, float)) or not (self.damp >= 0.0)
                                    or math.isinf(self.damp)):
            raise ValueError(f"damp must be 'auto' or a finite number >= 0, got {self.damp!r}")
        if self.gram_precision is not None and self.gram_precision not in GRAM_PRECISIONS:
            raise ValueError(f"gram_precision must be one of {', '.join(GRAM_PRECISIONS)}, got {self.gram_precision!r}")
        if self.damp == "auto" and int(self.val_every) < 2:
            raise ValueError(f"val_every must be >= 2 with damp='auto', got {self.val_every!r}")

    @property
    def restores(self) -> bool:
        """Whether the method refits the shrunken projection by least squares."""
        return methods.RESTORATIONS[METHODS[self.method].restoration].least_squares

    @property
    def fits_intercept(self) -> bool:
        """Whether the restoration also fits a bias shift (always for depth2's two-step reconstruction)."""
        return self.intercept or METHODS[self.method].intercept

    @property
    def allocation_kind(self) -> str:
        """The allocation this run uses: ``allocation``, or the method's default when it is None (for
        fasp with ``mlp_sparsity`` or ``attn_sparsity`` given: "error", which keeps each structure's total)."""
        if self.allocation is not None:
            return self.allocation
        kind = METHODS[self.method].default_allocation
        split = ALLOCATIONS[kind].per_structure
        if split is not None and (self.mlp_sparsity is not None or self.attn_sparsity is not None):
            return split
        return kind

    @property
    def allocation_windows(self) -> int:
        """Windows the allocation's dense pass uses (0: all): ``allocation_samples``, or the
        allocation's default from ``ALLOCATION_SAMPLES`` when it is None."""
        if self.allocation_samples is not None:
            return int(self.allocation_samples)
        return ALLOCATION_SAMPLES.get(self.allocation_kind, 32)

    def output_norm(self, adapter, block, which: str):
        """The norm whose scale weighs the tokens in the statistics of the ``which`` ("attn" or "mlp")
        output projection's inputs (``token_weighting``), None: every token alike."""
        if self.token_weighting != "auto" or not METHODS[self.method].weighs_tokens:
            return None
        return adapter.output_norm(block, which)

    @property
    def selection_damp(self) -> float:
        """Damping for the error-aware selection and allocation curves (0.1 when damp is 'auto')."""
        return float(self.damp) if isinstance(self.damp, (int, float)) else 0.1

    @property
    def mlp_fraction(self) -> float:
        return self.sparsity if self.mlp_sparsity is None else self.mlp_sparsity

    @property
    def attn_fraction(self) -> float:
        if self.mlp_only:
            return 0.0
        return self.sparsity if self.attn_sparsity is None else self.attn_sparsity


@dataclass
class PruneReport:
    method: str
    sparsity: float
    params_before: int
    params_after: int
    blocks: list[dict] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    calibration_tokens: int = 0
    allocation: str = "uniform"
    #: calibration windows the allocation's own dense pass ran over (None: no such pass, i.e. uniform
    #: allocation, or one-pass mode deciding it from its own pass over every window)
    allocation_windows: int | None = None
    #: whether each block's kept counts were decided again from its own statistics (``allocation_replan``)
    allocation_replan: bool = False
    #: "auto" where the tokens were weighed by the sublayer output norms' scale (PruneConfig.token_weighting
    #: on a family with such norms), "none" where every token counted alike
    token_weighting: str = "none"
    #: processes that shared the calibration windows (torch.distributed) and the tokens each one saw
    world_size: int = 1
    tokens_per_rank: list[int] = field(default_factory=list)
    #: where the calibration activations were kept ("memory" or "disk", ``PruneConfig.activations``)
    #: and, on disk, how many bytes were written to their files over the run
    activations: str = "memory"
    activations_written_bytes: int = 0
    #: calibration windows per block forward (``PruneConfig.batch_size``, or ``auto_batch_size``'s)
    batch_size: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _cuda_event(device: torch.device):
    """A timing CUDA event recorded now on ``device``'s current stream."""
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(torch.cuda.current_stream(device))
    return ev


class _Timer:
    """Seconds per phase: the wall clock on a CPU; on a GPU (``ops.defers``) a pair of CUDA events
    per phase, read once by ``settle`` at the end, so timing never makes the host wait mid-run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = defaultdict(float)
        self.events = ops.defers(device)
        self._pending: list[tuple] = []  # (phase, start event, end event)

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = _cuda_event(timer.device) if timer.events else time.perf_counter()

            def __exit__(self, *exc):
                if timer.events:
                    timer._pending.append((name, self.t, _cuda_event(timer.device)))
                else:
                    timer.times[name] += time.perf_counter() - self.t

        return _Ctx()

    def settle(self) -> dict[str, float]:
        """Every phase's total so far (the one wait for the device: its last event)."""
        if self._pending:
            self._pending[-1][2].synchronize()
            for name, start, end in self._pending:
                self.times[name] += start.elapsed_time(end) / 1e3
            self._pending.clear()
        return dict(self.times)


# ----------------------------------------------------------------------------- selection + restore
def _select(cfg: PruneConfig, W: torch.Tensor, stats: Stats, k: int, groups, segments: int,
            gen: torch.Generator) -> torch.Tensor:
    """Kept unit indices (ascending) by ``cfg.selection``'s part with ``cfg.method``'s score
    (fasp_ext/methods.py); units are columns or rows of ``groups``."""
    return SELECTIONS[cfg.selection].select(cfg, METHODS[cfg.method], W, stats, k, groups, segments, gen)


def _shift(H, mu, n, c):
    """Statistics of x - c from those of x: H - c mu^T - mu c^T + n c c^T, mu - n c."""
    return H - torch.outer(c, mu) - torch.outer(mu, c) + n * torch.outer(c, c), mu - n * c


def _restore(W: torch.Tensor, bias: torch.Tensor | None, stats: Stats, kept_cols: torch.Tensor,
             col_const: torch.Tensor | None, cfg: PruneConfig, restore: bool):
    """New (W2', bias') for kept columns, by the restoration part of ``cfg.method``
    (fasp_ext/methods.py; ``restore``: whether it refits by least squares). ``col_const`` holds
    per-column constants of the input (removed bias entries of the first map) that are folded into
    the bias exactly."""
    part = methods.RESTORATIONS[METHODS[cfg.method].restoration]
    m = W.shape[1]
    H, mu, n = stats.H, stats.mu, stats.n
    Hv, muv, nv = stats.H_val, stats.mu_val, stats.n_val
    new_bias = None if bias is None else bias.detach().float().clone()
    if new_bias is None and (part.adds_bias or (restore and cfg.fits_intercept)):
        new_bias = torch.zeros(W.shape[0], device=W.device)  # these fit a bias: the projection gets one
    c = None
    if col_const is not None and new_bias is not None:
        removed_mask = torch.ones(m, dtype=torch.bool, device=W.device)
        removed_mask[kept_cols] = False
        c = torch.where(removed_mask, col_const.float(), torch.zeros_like(col_const, dtype=torch.float32))
        new_bias += W.float() @ c
        if H is not None:  # statistics of the input with the folded constants taken out
            H, mu = _shift(H, mu, n, c)
            if Hv is not None:
                Hv, muv = _shift(Hv, muv, nv, c)
    return part.apply(methods.Fit(W, new_bias, stats, kept_cols, H, mu, n, Hv, muv, nv, c), cfg, restore)


def _set_linear(lin: nn.Linear, W: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A new projection with weight W and ``bias`` (which may add a bias the old one lacked)."""
    has_bias = lin.bias is not None or bias is not None
    new = new_linear(W.shape[1], W.shape[0], has_bias, W.device, lin.weight.dtype)
    new.weight.data.copy_(W)
    if has_bias:
        new.bias.data.copy_(bias if bias is not None else lin.bias.data)
    return new


def prune_values(adapter: Adapter, block: nn.Module, config, stats: Stats, cfg: PruneConfig,
                 gen: torch.Generator, keep_per_head: int | None = None) -> dict:
    """Remove value channels of ``block`` (equal count per kv head) and restore the output projection.
    ``keep_per_head``: kept channels per kv head (None: from the configured sparsity)."""
    return _prune_values(adapter, block, config, stats, cfg, gen, keep_per_head)[0]


def _prune_values(adapter, block, config, stats, cfg, gen, keep_per_head) -> tuple[dict, torch.Tensor | None]:
    """``prune_values`` and the kept output-projection columns (None: nothing removed); with
    ``cfg.attn_unit == "head"``, ``_prune_heads``."""
    if cfg.attn_unit == "head":
        return _prune_heads(adapter, block, config, stats, cfg, gen, keep_per_head)
    v, o = adapter.value_pair(block)
    n, kv = adapter.block_heads(block, config)
    dv = v.out_features // kv
    rep = n // kv
    if keep_per_head is None:
        keep_per_head = kept_count(dv, cfg.attn_fraction, cfg.attn_multiple)
    if keep_per_head == dv:
        return {"v_head_dim": dv}, None
    dev = o.weight.device
    groups = value_groups(n, kv, dv, dev)
    kept_groups = _select(cfg, judged_weight(cfg, adapter, block, "attn", o.weight), stats, kv * keep_per_head,
                          groups, kv, gen)
    kept_cols = torch.sort(groups[kept_groups].reshape(-1)).values
    col_const = None
    if v.bias is not None:  # o_proj input column (h, c) carries v.bias[g(h)*dv + c] as a constant
        j = torch.arange(n * dv, device=dev)
        col_const = v.bias.detach()[(j // dv // rep) * dv + j % dv]
    Wn, bn, info = _restore(o.weight, o.bias, stats, kept_cols, col_const, cfg, cfg.restores)
    adapter.set_value_pair(block, _shrink_linear(v, rows=kept_groups), _set_linear(o, Wn, bn), keep_per_head)
    return {"v_head_dim": keep_per_head, "attn_solver": info}, kept_cols


def check_head_unit(adapter: Adapter) -> None:
    """Refuse ``attn_unit="head"`` for a family whose kv-head groups cannot be removed (Phi-3)."""
    if not adapter.removes_heads:
        raise ValueError(f"attn_unit='head' is not supported for {', '.join(adapter.model_types)} (fused q/k/v "
                         f"projection split by the config's head counts); use attn_unit='channel'")


def _prune_heads(adapter, block, config, stats, cfg, gen, keep) -> tuple[dict, torch.Tensor | None]:
    """Remove whole kv-head groups of ``block`` (``attn_unit="head"``): a group is one kv head (its k
    and v rows) and the query heads sharing it (their q rows and o_proj columns). Groups are scored
    by the method's score summed over their o_proj columns (the selection part decides, as for value
    channels), the o_proj is restored over the kept groups' columns by the method's restoration,
    the removed q/k/v rows (and biases) just go. ``keep``: kept kv heads (None: from the sparsity,
    ``kept_count``, at least one). Returns the report and the kept o_proj columns (None: nothing removed)."""
    check_head_unit(adapter)
    v, o = adapter.value_pair(block)
    n, kv = adapter.block_heads(block, config)
    dv, rep = v.out_features // kv, n // kv
    if keep is None:
        keep = kept_count(kv, cfg.attn_fraction, 1)
    info = {"v_head_dim": dv, "num_heads": n, "num_kv_heads": kv}
    if keep == kv:
        return info, None
    dev = o.weight.device
    groups = adapter.head_groups(block, config, dev)
    kept_groups = _select(cfg, judged_weight(cfg, adapter, block, "attn", o.weight), stats, keep, groups, 1, gen)
    kept_groups = torch.sort(kept_groups.to(dev)).values
    kept_cols = groups[kept_groups].reshape(-1)  # ascending: groups are contiguous column ranges
    col_const = None
    if v.bias is not None:  # o_proj input column (h, c) carries v.bias[g(h)*dv + c] as a constant
        j = torch.arange(n * dv, device=dev)
        col_const = v.bias.detach()[(j // dv // rep) * dv + j % dv]
    Wn, bn, solver = _restore(o.weight, o.bias, stats, kept_cols, col_const, cfg, cfg.restores)
    adapter.remove_heads(block, config, kept_groups, _set_linear(o, Wn, bn))
    info.update({"num_heads": keep * rep, "num_kv_heads": keep, "kept_kv_heads": kept_groups.tolist(),
                 "attn_solver": solver})
    return info, kept_cols


def prune_mlp(adapter: Adapter, block: nn.Module, stats: Stats, cfg: PruneConfig,
              gen: torch.Generator, k: int | None = None) -> tuple[dict, tuple | None]:
    """Remove MLP neurons and restore the down projection, keeping ``k`` (None: from the configured
    sparsity); returns the report and (kept, old projection, new projection)."""
    ins, out = adapter.mlp_pair(block)
    m = out.in_features
    if k is None:
        k = kept_count(m, cfg.mlp_fraction, cfg.mlp_multiple)
    if k == m:
        return {"mlp_width": m}, None
    kept = _select(cfg, judged_weight(cfg, adapter, block, "mlp", out.weight), stats, k, None, 1, gen)
    Wn, bn, info = _restore(out.weight, out.bias, stats, kept, None, cfg, cfg.restores)
    new_out = _set_linear(out, Wn, bn)
    adapter.set_mlp_pair(block, [_shrink_linear(l, rows=kept) for l in ins], new_out)
    return {"mlp_width": k, "mlp_solver": info}, (kept, out, new_out)


#: per structure: prune it from its statistics, ``(adapter, block, mcfg, stats, cfg, gen, keep) ->
#: (report, change)``; change: the kept o_proj columns ("attn") or (kept, old, new projection) ("mlp"),
#: None when nothing was removed
_PRUNERS = {"attn": _prune_values,
            "mlp": lambda adapter, block, mcfg, stats, cfg, gen, keep: prune_mlp(adapter, block, stats, cfg, gen, keep)}


@torch.no_grad()
def _residual_outputs(h_mid: list[torch.Tensor], z_batches: list[torch.Tensor], kept, down: nn.Linear,
                      like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of a pre-norm block whose MLP output is added to the residual stream last, per batch:
    ``h_mid + down(z[..., kept])``, what the block computes with its pruned MLP (the kept neurons'
    activations are unchanged by removing the others), in the model's dtype, shaped like ``like``."""
    res = spill.empty_like(like)
    dev = down.weight.device
    project = kept_linear(down, kept, spill.batch_shape(z_batches)[-1]) if len(z_batches) else down
    home = spill.batches_device(like) if len(like) else dev
    for j, (h, z) in enumerate(zip(h_mid, z_batches)):  # on the projection's device, wherever the batches are kept
        y = h.to(dev) + project(z.to(dev))
        res.append(y.view(spill.batch_shape(like, j)).to(home))
    return res


def _as_tokens(calibration) -> torch.Tensor:
    if isinstance(calibration, dict):
        calibration = calibration.get("input_ids")
    if isinstance(calibration, (list, tuple)):
        calibration = torch.stack([torch.as_tensor(c) for c in calibration])
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype not in (
            torch.int64, torch.int32):
        raise ValueError("calibration must be an integer token tensor of shape (nsamples, seqlen)")
    if calibration.shape[0] < 1 or calibration.shape[1] < 1:
        raise ValueError(f"calibration is empty: shape {tuple(calibration.shape)}")
    return calibration.long()


def _check_token_range(tokens: torch.Tensor, model: nn.Module) -> None:
    """Token ids outside the vocabulary would index past the embedding (an IndexError on CPU, a
    device-side assert on a GPU): refuse them up front, naming the argument."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is None:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"calibration: token ids must lie in [0, {vocab}) (the model's vocabulary), "
                         f"got ids from {lo} to {hi}")


#: the store budget on a CPU when ``PruneConfig.store_budget_bytes`` is None
STORE_BUDGET_CPU = 2 << 30


@dataclass(frozen=True)
class Placement:
    """Where the model lives during a run (``plan_placement``)."""

    #: the model (less its output head) moves to the device once, and home once at the end
    resident: bool = False
    #: blocks come one at a time from pinned host memory, the next one copied on a side stream
    prefetch: bool = False
    #: what ``PruneConfig.store_budget_bytes`` stands for in this run
    store_budget_bytes: int = STORE_BUDGET_CPU


def plan_placement(block_bytes: list[int], other_bytes: int, work_bytes: int, free_bytes: int | None,
                   store_budget_bytes: int | None = None, moves: bool = True, headroom: float = 0.9) -> Placement:
    """Where the model lives during a run, from sizes alone.

    ``block_bytes``: each decoder block's parameters and buffers; ``other_bytes``: the rest a pass
    runs (embeddings, final norm; not an output head, which no pass runs); ``work_bytes``: what the
    run keeps on the device besides (calibration activations, Gram matrices); ``free_bytes``: the
    device's free memory (``torch.cuda.mem_get_info``; None: a CPU run); ``moves``: whether the model
    lives elsewhere than the compute device and may be placed (the in-memory mover). Of the free
    memory ``headroom`` is counted on. The model is resident when it fits with the work; otherwise its
    blocks are prefetched (two on the device at a time). An unset store budget is a third of what is
    left (three stores at most: both projections' inputs, the one-pass statistics)."""
    if free_bytes is None:
        return Placement(store_budget_bytes=STORE_BUDGET_CPU if store_budget_bytes is None else store_budget_bytes)
    usable = int(free_bytes * headroom)
    model = sum(block_bytes) + other_bytes
    resident = moves and model + work_bytes <= usable
    prefetch = moves and not resident
    held = model if resident else (other_bytes + 2 * max(block_bytes, default=0) if moves else 0)
    left = max(usable - held - work_bytes, 0)
    budget = left // 3 if store_budget_bytes is None else store_budget_bytes
    return Placement(resident, prefetch, int(budget))


def _tensor_bytes(module: nn.Module, seen: set | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers (each tensor once; meta tensors count too)."""
    seen = set() if seen is None else seen
    total = 0
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _placement(model: nn.Module, calibration, cfg: PruneConfig, device: torch.device, movable: bool) -> Placement:
    """``plan_placement`` for this run; ``movable``: the in-memory mover (not lazy loading).
    ``FASP_EXT_PLACEMENT`` (resident, prefetch, blocks) forces the choice (bench/gpu_check.sh)."""
    if device.type != "cuda":
        return plan_placement([], 0, 0, None, cfg.store_budget_bytes)
    from .calibration import output_head

    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    seen: set = set()
    block_bytes = [_tensor_bytes(b, seen) for b in blocks]
    head = output_head(model)
    head_ids = {id(t) for t in head.parameters()} - {id(t) for b in blocks for t in b.parameters()} if head else set()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:  # a head tied to the embeddings is the embeddings
        head_ids -= {id(t) for t in emb.parameters()}
    seen |= head_ids
    other = _tensor_bytes(model, seen)
    tokens = _as_tokens(calibration)
    p = next(model.parameters())
    width = getattr(emb, "embedding_dim", 0) or 0
    mlp = adapter.mlp_width(blocks[0]) if len(blocks) else 0
    # the hidden states in and out of a block, the stored inputs aside, and a few Gram-sized matrices
    work = 3 * tokens.numel() * width * p.element_size() + 8 * 4 * mlp * mlp
    home = p.device
    free = torch.cuda.mem_get_info(device)[0]
    plan = plan_placement(block_bytes, other, work, free, cfg.store_budget_bytes,
                          moves=movable and home.type == "cpu" and not p.is_meta)
    force = os.environ.get("FASP_EXT_PLACEMENT", "")
    if force and plan.resident + plan.prefetch:  # only where the model may be placed at all
        plan = Placement(force == "resident", force == "prefetch", plan.store_budget_bytes)
    return plan


def prune(model: nn.Module, calibration, config: PruneConfig | None = None,
          mover: BlockMover | None = None) -> PruneReport:
    """Prune ``model`` in place by FASP on ``calibration`` tokens (nsamples x seqlen); return a report.

    Usable from any toolkit: no CLI, no global state. The model keeps its dtype; one block at a
    time runs on ``config.device``. ``mover`` brings each block to the device and back (default: in
    memory; fasp_ext/lazy.py loads blocks from a checkpoint at their turn and writes them when done).
    On a GPU the in-memory model is moved there once when it fits, or block by block from pinned
    memory with the next block copied ahead (``plan_placement``; docs/gpu.md).
    """
    cfg = config or PruneConfig()
    cfg.validate()
    device = torch.device(cfg.device) if cfg.device else next(model.parameters()).device
    place = _placement(model, calibration, cfg, device, movable=mover is None)
    home = next(model.parameters()).device
    if place.resident:
        from .calibration import ResidentMover

        mover = ResidentMover(home, device)
        mover.load(model)
    elif place.prefetch:
        from .calibration import PrefetchMover

        mover = PrefetchMover(home, device)
    folder = _spill_folder(model, calibration, cfg, device, mover)
    try:
        return _prune(model, calibration, cfg, mover, place.store_budget_bytes, folder)
    finally:
        if folder is not None:
            folder.close()
        if place.resident:
            mover.unload(model)


def _spill_folder(model: nn.Module, calibration, cfg: PruneConfig, device: torch.device,
                  mover: BlockMover | None) -> spill.SpillFolder | None:
    """The folder the calibration activations go to (``cfg.activations``), or None (in memory).
    "auto" spills when the blocks are loaded one at a time (``mover.block_by_block``) and the hidden
    states in and out of a block, kept on the host, come to ``spill.AUTO_MIN_BYTES`` or more."""
    p = next(model.parameters())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    width = getattr(emb, "embedding_dim", 0) or 0
    stream = 2 * _as_tokens(calibration).numel() * width * p.element_size()
    on_host = device.type == "cpu" or cfg.offload_activations
    if cfg.activations == "memory" or (cfg.activations == "auto" and not (
            getattr(mover, "block_by_block", False) and on_host and stream >= spill.AUTO_MIN_BYTES)):
        return None
    folder = spill.SpillFolder(cfg.activations_dir)
    try:
        spill.check_space(folder, stream)
    except ValueError:
        folder.close()
        raise
    return folder


def _prune(model: nn.Module, calibration, cfg: PruneConfig, mover: BlockMover | None,
           store_budget: int, folder: spill.SpillFolder | None = None) -> PruneReport:
    """``prune`` with the mover, the store budget and where the activations live decided."""
    adapter = adapter_for(model)
    tokens = _as_tokens(calibration)
    _check_token_range(tokens, model)
    mcfg = adapter.lm_config(model.config)
    ctx = adapter.max_context(mcfg)
    if ctx is not None and tokens.shape[1] > ctx:
        raise ValueError(f"seqlen {tokens.shape[1]} exceeds the model's context of {ctx} tokens")
    device = torch.device(cfg.device) if cfg.device else next(model.parameters()).device
    home = next(model.parameters()).device
    mover = mover or BlockMover(home)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    batch = cfg.batch_size or auto_batch_size(device, tokens.shape[1])
    timer = _Timer(device)
    t0 = time.perf_counter()
    report = PruneReport(cfg.method, cfg.sparsity, count_params(model), 0,
                         calibration_tokens=int(tokens.numel()), allocation=cfg.allocation_kind)
    all_tokens, tokens = tokens, distributed.shard(tokens)  # this process's windows (all of them when alone)
    report.world_size = distributed.world_size()
    report.batch_size = batch
    report.tokens_per_rank = [int(v) for v in distributed.all_reduce_numbers(
        *[tokens.numel() if r == distributed.rank() else 0 for r in range(report.world_size)], device=device)]
    was_training = model.training
    model.eval()
    blocks = adapter.blocks(model)
    if any(cfg.output_norm(adapter, blocks[0], w) is not None for w in ("attn", "mlp")):
        report.token_weighting = "auto"
    biased_before = _biased_linears(model)
    if cfg.attn_unit == "head" and cfg.attn_fraction > 0:
        check_head_unit(adapter)
        single = [i for i, b in enumerate(blocks) if adapter.block_heads(b, mcfg)[1] == 1]
        if single:  # a block keeps at least one group: nothing to remove from its attention
            log.warning("attn_unit='head': %d of %d blocks have a single kv head, whose attention is kept whole "
                        "(only the MLP of those blocks is pruned)", len(single), len(blocks))
    with timer("capture"):
        inputs = capture_block_inputs(model, blocks, tokens, batch, device, cfg.offload_activations,
                                      folder)
    prune_attn = cfg.attn_fraction > 0
    prune_mlp_ = cfg.mlp_fraction > 0
    keeps = [{"v_keep": None, "mlp_keep": None} for _ in blocks]
    allocate = ALLOCATIONS[cfg.allocation_kind].costs is not None and (prune_attn or prune_mlp_)
    # one-pass mode: the allocation's statistics come from the one dense pass itself when every
    # block's statistics fit the store budget (kept until the allocation is decided)
    fold = allocate and cfg.one_pass and _one_pass_stats_bytes(adapter, blocks[0], cfg) * len(blocks) <= \
        store_budget
    if allocate and not fold:
        n_alloc = cfg.allocation_windows or all_tokens.shape[0]
        n_tok = int(cfg.allocation_seqlen) or all_tokens.shape[1]
        sub_tokens = distributed.shard(all_tokens[:n_alloc, :n_tok], set_offset=False)
        report.allocation_windows = int(min(n_alloc, all_tokens.shape[0]))
        with timer("capture"):
            sub = capture_block_inputs(model, blocks, sub_tokens, batch, device, cfg.offload_activations,
                                       folder)
    mover.captured(model)  # from here on only the decoder blocks run
    replan = allocate and cfg.allocation_replan and not fold
    report.allocation_replan = replan
    if allocate and not fold:
        per_block, energies = allocation.dense_costs(adapter, blocks, mcfg, sub, cfg, device, timer, mover)
        keeps = allocation.decide(per_block, cfg)
        if replan:
            replanner = allocation.Replanner(per_block, energies, cfg)
        del sub
    pre_stats = None
    if fold:
        keeps, pre_stats = _one_pass_allocate(adapter, blocks, mcfg, inputs, cfg, device, timer, mover,
                                              int(cfg.val_every) if cfg.damp == "auto" else 0)
    need_gram = cfg.restores
    dense_inputs = None
    if cfg.target == "dense" and not cfg.one_pass:
        dense_inputs = inputs.with_hidden(spill.copy_of(inputs.hidden))
    val_every = int(cfg.val_every) if cfg.damp == "auto" else 0
    elsize = next(model.parameters()).element_size()
    z_bytes = tokens.numel() * adapter.mlp_width(blocks[0]) * elsize
    can_correct = adapter.mlp_is_residual_branch and z_bytes <= store_budget and adapter.is_pre_norm(mcfg) \
        and adapter.mlp_norm(blocks[0]) is not None
    # the attention's output-projection inputs, kept so the MLP pass replays the pruned attention
    # instead of recomputing it (exact: calibration.replay_attention); within the same budget
    zo_bytes = tokens.numel() * adapter.value_pair(blocks[0])[1].in_features * elsize
    can_replay = prune_attn and zo_bytes + (z_bytes if can_correct else 0) <= store_budget
    def prune_structure(s, block, i, inputs, info, dense_x, *, store, stop, keep_outputs=False,
                        replay=contextlib.nullcontext, extra_hook=None):
        """Prune one structure ``s`` (``units.STRUCTURES``) of block ``i`` in sequential mode: its
        output projection's input statistics from one forward of the block (stopped there when
        ``stop``; the inputs kept when ``store``; ``extra_hook(stats)`` adds a hook for that forward),
        the kept count (decided again when replanning), then the selection and restoration. Returns
        the statistics, the block's outputs (None unless ``keep_outputs``) and what the pruning changed."""
        out = s.out(adapter, block)
        keep = keeps[i][s.key]
        # a structure the allocation keeps whole is left as it is: no Gram matrix for it (unless
        # replanning may change that and has to see its curve)
        whole = keep is not None and keep == s.full(adapter, block, mcfg, cfg.attn_unit) and \
            not (replan and replanner.may_change(i, s.which))
        st = Stats.new(out.in_features, device, (need_gram or replan) and not whole, store=store,
                       val_every=val_every, precision=cfg.gram_precision_on(device))
        st.store_device = spill.batches_device(inputs.hidden)
        if store:  # the stored inputs are kept as the hidden states are (in memory or on disk)
            st.store = spill.empty_like(inputs.hidden)
        st.dense = dense_x
        hooks = [collect(out, st, stop=stop, norm=cfg.output_norm(adapter, block, s.which))]
        if extra_hook is not None:
            hooks.append(extra_hook(st))
        with timer(f"forward_{s.phase}_stats"), replay():
            outs = run_block(block, inputs, keep_outputs=keep_outputs)
        for h in hooks:
            h.remove()
        st.reduce()
        if replan:
            with timer("allocation_costs"):
                keeps[i][s.key] = replanner.decide(adapter, block, mcfg, i, s.which, st)
        with timer(f"solve_{s.phase}"):
            rep, change = _PRUNERS[s.which](adapter, block, mcfg, st, cfg, gen, keeps[i][s.key])
        info.update(rep)
        return st, outs, change

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    it = range(len(blocks))
    if cfg.progress and tqdm is not None:
        it = tqdm(it, desc=f"pruning blocks ({cfg.method} {cfg.sparsity:.0%})", unit="block")
    for i in it:
        block = mover.fetch(blocks, i, device)
        info: dict = {"block": i}
        inputs = inputs.at(i)  # block i runs with its own arguments (mask, window, position embeddings)
        if dense_inputs is not None:
            dense_inputs = dense_inputs.at(i)
        if cfg.one_pass:
            if pre_stats is not None:  # statistics gathered by the allocation's pass
                st_o, st_d = pre_stats[i]
                pre_stats[i] = None
                with timer("solve"):
                    info.update(_one_pass_apply(adapter, block, mcfg, st_o, st_d, cfg, gen, keeps[i]))
            else:
                info.update(_one_pass_block(adapter, block, mcfg, inputs, cfg, gen, timer, need_gram, val_every,
                                            keeps[i]))
            report.blocks.append(info)
            mover.release(blocks, i, block, final=True)
            continue
        x_dense = {"attn": None, "mlp": None}
        if dense_inputs is not None:  # the dense block on the dense stream: the restoration targets
            x_dense = {"attn": spill.empty_like(dense_inputs.hidden) if prune_attn else None,
                       "mlp": spill.empty_like(dense_inputs.hidden) if prune_mlp_ else None}
            hooks = [record(st_.out(adapter, block), x_dense[st_.which]) for st_ in STRUCTURES
                     if x_dense[st_.which] is not None]
            with timer("forward_dense_target"):
                dense_outs = run_block(block, dense_inputs, keep_outputs=True)
            for h in hooks:
                h.remove()
            dense_inputs = dense_inputs.with_hidden(dense_outs)
        replay = contextlib.nullcontext  # after pruning the attention: replays it from its stored inputs
        if replan:
            replanner.enter(i, inputs.hidden, device)
        attn, mlp = STRUCTURES
        if prune_attn:
            st, _, kept_cols = prune_structure(attn, block, i, inputs, info, x_dense["attn"], store=can_replay,
                                               stop=True)
            if can_replay:
                replay = functools.partial(replay_attention, adapter.attention(block), adapter.o_name, st.store,
                                           kept_cols)
            del st
        else:
            info["v_head_dim"] = adapter.value_head_dim(block, mcfg)
            info["num_heads"], info["num_kv_heads"] = adapter.block_heads(block, mcfg)
        if prune_mlp_:
            # with the correction the pass stops at the output projection, keeping its inputs and the
            # residual stream it is added to; the block's output is then computed from those
            h_mid = spill.empty_like(inputs.hidden)
            mid = (lambda st: record(adapter.mlp_norm(block), h_mid, st.store_device)) if can_correct else None
            st, outs, change = prune_structure(mlp, block, i, inputs, info, x_dense["mlp"], store=can_correct,
                                               stop=can_correct, keep_outputs=not can_correct, replay=replay,
                                               extra_hook=mid)
            with timer("propagate"):
                if can_correct:
                    outs = _residual_outputs(h_mid, st.store, change[0] if change else None,
                                             adapter.mlp_pair(block)[1], inputs.hidden)
                elif change is None:
                    pass
                else:
                    with replay():
                        outs = run_block(block, inputs, keep_outputs=True)
            del st
        else:
            info["mlp_width"] = adapter.mlp_width(block)
            with timer("propagate"), replay():
                outs = run_block(block, inputs, keep_outputs=True)
        del replay
        inputs = inputs.with_hidden(outs)
        report.blocks.append(info)
        mover.release(blocks, i, block, final=True)
    _record_sizes(adapter, model, report, biased_before)
    if folder is not None:
        report.activations, report.activations_written_bytes = "disk", folder.written
    model.train(was_training)
    report.params_after = count_params(model)
    report.times = timer.settle()
    report.times["total"] = time.perf_counter() - t0
    return report


def _one_pass_block(adapter, block, mcfg, inputs, cfg, gen, timer, need_gram, val_every, keep) -> dict:
    """Both statistics from one dense forward of the block; the next block sees the dense output."""
    with timer("forward_stats"):
        st_o, st_d = _one_pass_stats(adapter, block, inputs, cfg, need_gram, val_every)
    with timer("solve"):
        return _one_pass_apply(adapter, block, mcfg, st_o, st_d, cfg, gen, keep)


def _one_pass_stats(adapter, block, inputs, cfg, need_gram, val_every,
                    on_outputs=None) -> tuple[Stats | None, Stats | None]:
    """Statistics of both output projections' inputs from one dense forward of ``block``, whose
    outputs replace ``inputs.hidden`` (``on_outputs(outs)`` sees them first)."""
    (st_o, st_d), hooks = structure_stats(adapter, block, cfg, block_device(block), need_gram, val_every)
    outs = run_block(block, inputs, keep_outputs=True)
    for h in hooks:
        h.remove()
    for st in (st_o, st_d):
        if st is not None:
            st.reduce()
    if on_outputs is not None:
        on_outputs(outs)
    inputs.hidden[:] = outs
    return st_o, st_d


def _one_pass_apply(adapter, block, mcfg, st_o, st_d, cfg, gen, keep) -> dict:
    info: dict = {}
    if st_o is not None:
        info.update(prune_values(adapter, block, mcfg, st_o, cfg, gen, keep["v_keep"]))
    if st_d is not None:
        info.update(prune_mlp(adapter, block, st_d, cfg, gen, keep["mlp_keep"])[0])
    return info


def _one_pass_stats_bytes(adapter, block, cfg) -> int:
    """Bytes of one block's one-pass statistics (Gram matrices, twice with held-out damping)."""
    ms = ([adapter.value_pair(block)[1].in_features] if cfg.attn_fraction > 0 else []) + \
         ([adapter.mlp_pair(block)[1].in_features] if cfg.mlp_fraction > 0 else [])
    per = (2 if cfg.damp == "auto" else 1) if cfg.restores else 0
    return sum(4 * (per * m * m + 3 * m) for m in ms)


@torch.no_grad()
def _one_pass_allocate(adapter, blocks, mcfg, inputs, cfg, device, timer, mover,
                       val_every) -> tuple[list[dict], list[tuple]]:
    """One-pass mode with a non-uniform allocation: the one dense pass gathers every block's
    statistics, the allocation is decided from them (fasp_ext/allocation.py, with all calibration
    windows instead of the first ``allocation_samples``), and they are kept for the pruning, so no
    second dense pass runs. Returns the kept counts and the statistics per block."""
    from .allocation import block_costs, decide, stream_energy

    energy = ALLOCATIONS[cfg.allocation_kind].needs_gram
    need_gram = cfg.restores or energy
    per_block, stats = [], []
    steps_ = range(len(blocks))
    if cfg.progress:
        from tqdm.auto import tqdm

        steps_ = tqdm(steps_, desc=f"one-pass statistics + allocation ({cfg.allocation_kind})", unit="block")
    energies = [stream_energy(inputs.hidden, device) if energy else 0.0]  # entering block 0, then leaving each
    for i in steps_:
        block = mover.fetch(blocks, i, device)

        def on_outputs(o):
            energies.append(stream_energy(o, device) if energy else 0.0)
        with timer("forward_stats"):
            st_o, st_d = _one_pass_stats(adapter, block, inputs.at(i), cfg, need_gram, val_every,
                                         on_outputs=on_outputs)
        with timer("allocation_costs"):
            per_block.append(block_costs(adapter, block, mcfg, cfg, st_o, st_d, energies[i], energies[i + 1]))
        stats.append((st_o, st_d))
        mover.release(blocks, i, block, final=False)
    return decide(per_block, cfg), stats


def block_device(block: nn.Module) -> torch.device:
    return next(block.parameters()).device


def _biased_linears(model: nn.Module) -> set[str]:
    return {n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and mod.bias is not None}


def _record_sizes(adapter: Adapter, model: nn.Module, report: PruneReport, biased_before: set[str]) -> None:
    """Write the per-block sizes (and biases the pruning added) into the config, so the pruned
    architecture can be rebuilt by load_pruned."""
    cfg, lm = model.config, adapter.lm_config(model.config)
    blocks = adapter.blocks(model)
    n, kv, hd = adapter.head_geometry(lm)
    v_dims = [adapter.value_head_dim(b, lm) for b in blocks]
    widths = [adapter.mlp_width(b) for b in blocks]
    heads = [adapter.block_heads(b, lm) for b in blocks]
    if len(set(widths)) == 1:
        setattr(lm, adapter.mlp_size_key, widths[0])
    added = sorted(_biased_linears(model) - biased_before)
    pruned_heads = any(h != (n, kv) for h in heads)
    if any(d != hd for d in v_dims) or len(set(widths)) > 1 or added or pruned_heads:
        cfg.fasp_ext = {"version": 1, "v_head_dim": v_dims, "mlp_width": widths, "added_bias": added}
        if pruned_heads:  # kv-head groups removed (attn_unit="head"): per-layer head counts
            cfg.fasp_ext["num_attention_heads"] = [h[0] for h in heads]
            cfg.fasp_ext["num_key_value_heads"] = [h[1] for h in heads]
    elif hasattr(cfg, "fasp_ext"):
        del cfg.fasp_ext
