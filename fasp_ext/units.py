"""The geometry of the pruned units, shared by the pipeline and the allocation.

A *structure* is one pair of linked projections the pipeline prunes: the value channels ("attn":
v_proj rows and the o_proj columns reading them, an equal count per kv head) and the MLP neurons
("mlp": the rows of the input projections and the columns of the down projection). ``STRUCTURES``
describes both, so a pass over them is written once; ``kept_count`` rounds a sparsity to a kept
count, ``value_groups`` maps value channels to o_proj columns, ``judged_weight`` is the output
projection's weight as the selection and the allocation judge it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def kept_count(m: int, fraction: float, multiple: int) -> int:
    """k = round((1 - fraction) * m), rounded to a multiple, at least one multiple (or m if smaller)."""
    if fraction <= 0.0:
        return m
    k = int(round((1.0 - fraction) * m))
    if multiple > 1:
        k = int(round(k / multiple)) * multiple
    return min(max(k, min(multiple, m), 1), m)


def value_groups(n: int, kv: int, dv: int, device) -> torch.Tensor:
    """(kv * dv, n / kv) o_proj columns per value channel: group (g, c) = channel c of kv head g =
    columns (g * rep + r) * dv + c for the rep = n / kv query heads sharing kv head g."""
    rep = n // kv
    g = torch.arange(kv, device=device).view(kv, 1, 1)
    c = torch.arange(dv, device=device).view(1, dv, 1)
    r = torch.arange(rep, device=device).view(1, 1, rep)
    return ((g * rep + r) * dv + c).reshape(kv * dv, rep)


def judged_weight(cfg, adapter, block: nn.Module, which: str, W: torch.Tensor) -> torch.Tensor:
    """The output projection's weight as the selection and the allocation judge it: where the block
    normalises the projection's output before the residual add (``cfg.output_norm``), row j scaled by
    the norm's gain g_j, as an error in output j reaches the stream multiplied by g_j. (The
    restoration fits each row on its own, so it is unchanged by the scaling.)"""
    norm = cfg.output_norm(adapter, block, which)
    if norm is None:
        return W
    with torch.no_grad():
        g = norm(torch.ones(1, W.shape[0], device=W.device, dtype=W.dtype)).reshape(-1).float()
    return W.float() * g.unsqueeze(1)


@dataclass(frozen=True)
class Structure:
    """One prunable structure of a block."""

    #: "attn" (value channels) or "mlp" (MLP neurons): the name adapters and the config use
    which: str
    #: the key of its kept count in the per-block allocation (``{"v_keep": .., "mlp_keep": ..}``)
    key: str
    #: the name of its phases in the report's timings ("forward_<phase>_stats", "solve_<phase>")
    phase: str
    #: ``out(adapter, block)``: the output projection whose input statistics decide the structure
    out: Callable
    #: ``full(adapter, block, mcfg, attn_unit="channel")``: the unit count a kept count is compared
    #: with (per kv head for value channels; the block's kv heads for ``attn_unit="head"``)
    full: Callable

    def fraction(self, cfg) -> float:
        """The structure's sparsity in ``cfg`` (0: not pruned)."""
        return cfg.attn_fraction if self.which == "attn" else cfg.mlp_fraction


STRUCTURES = (
    Structure("attn", "v_keep", "attention", lambda a, b: a.value_pair(b)[1],
              lambda a, b, mcfg, unit="channel": a.block_heads(b, mcfg)[1] if unit == "head"
              else a.value_pair(b)[0].out_features // a.block_heads(b, mcfg)[1]),
    Structure("mlp", "mlp_keep", "mlp", lambda a, b: a.mlp_pair(b)[1],
              lambda a, b, mcfg, unit="channel": a.mlp_pair(b)[1].in_features),
)


def structure_stats(adapter, block: nn.Module, cfg, device, gram: bool, val_every: int = 0):
    """One dense pass's statistics: per structure (``STRUCTURES`` order) a ``Stats`` of its output
    projection's inputs on ``device`` (None where ``cfg`` does not prune it), and the hooks that
    collect them (remove them after the forward)."""
    from .calibration import Stats, collect

    stats, hooks = [], []
    for s in STRUCTURES:
        if not s.fraction(cfg) > 0:
            stats.append(None)
            continue
        out = s.out(adapter, block)
        st = Stats.new(out.in_features, device, gram, val_every=val_every, precision=cfg.gram_precision_on(device))
        hooks.append(collect(out, st, norm=cfg.output_norm(adapter, block, s.which)))
        stats.append(st)
    return stats, hooks
