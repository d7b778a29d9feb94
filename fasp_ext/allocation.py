"""Non-uniform allocation: how many units each block keeps, for the same total as uniform pruning.

One dense pass over the calibration set (statistics for every block from the dense model's own
activations, as in one-pass mode) gives each block and structure (value channels, MLP neurons) a
cost for every removal step; a greedy pass then removes, across all blocks of a structure, the
cheapest step until the structure's total kept count equals what uniform pruning would keep. The
budget is per structure, so ``mlp_sparsity``/``attn_sparsity`` still hold overall.

Costs:

- ``"error"``: the restored calibration error of the projection at each kept count, for the units
  the run's selection removes: with the default score selection, the score order's exact curve from
  one Cholesky per matrix (``score_order_curve``); with ``selection="obs"``, the greedy OBS run's
  own curve (fasp_ext/selection.py). Relative to the energy of the residual stream the
  projection adds to (the block's input for the attention, its output for the MLP): the next block
  normalises that stream, so this is the relative perturbation it sees. (Relative to the
  projection's own output energy instead, the allocation was much worse on SmolLM2; see
  bench/results/options30_smollm2.md.)

The dense pass uses the first ``PruneConfig.allocation_windows`` calibration windows only (12 for
"error-am", 16 for "error", 32 for FLAP's rankings, unless ``allocation_samples`` says otherwise): the curves need far
less data than the restoration, and the pass then costs a fraction of a calibration forward.
- ``"error-am"``: the same curves ranked across blocks *and* structures: value channels and MLP
  neurons compete in one greedy, each step costed by its error per parameter it frees (both are
  relative perturbations of the residual stream), and the budget is in parameters, so the split
  between attention and MLP moves too (as ``"flap-am"`` does for FLAP's scores).
- ``"flap"``: FLAP's adaptive structure (An et al., 2024) across layers, per module ("AL-MM"): the
  fluctuation score of each unit, standardised per block (mean 0, std 1), ranked across blocks.
- ``"flap-am"``: the same scores ranked across layers *and* modules ("AL-AM", FLAP's own default):
  value channels and MLP neurons compete in one ranking, and the budget is in parameters (a unit
  weighs the parameters its removal frees), so the split between attention and MLP moves too; the
  total of pruned parameters is what uniform pruning removes, up to the rounding of the steps.

With ``allocation_replan`` (sequential mode, error curves) the kept counts are decided again block by
block during the sequential pass, from each block's own curve over every window (``Replanner``); the
dense pass's curves then only forecast the blocks not reached yet.

A block keeps at least ``1 - max_block_sparsity`` of each structure (default: removes at most 1.5x
the structure's overall sparsity, and never more than 90 %).
"""

from __future__ import annotations

import heapq

import torch

from . import distributed, spill
from .calibration import Stats, fluctuation_scores, run_block
from .methods import ALLOCATIONS, Allocation, register_allocation
from .units import judged_weight, kept_count, structure_stats, value_groups

#: default cap on a block's sparsity, relative to the structure's overall sparsity (why 1.5x, not 2x
#: or 1.25x: docs/decisions.md)
DEFAULT_CAP = 1.5


def _steps(full: int, lowest: int, step: int) -> list[int]:
    """Allowed kept counts from ``full`` down to ``lowest`` in multiples of ``step`` (full included)."""
    ks = [full]
    k = (full // step) * step
    if k == full:
        k -= step
    while k >= max(lowest, step):
        ks.append(k)
        k -= step
    return ks


def greedy_budget(costs: list[list[float]], counts: list[list[int]], budget: int) -> list[int]:
    """Per block, the index into ``counts[b]`` reached by removing the cheapest next step of any
    block until sum of kept counts <= ``budget``. ``costs[b][j]`` is the cost of going from
    counts[b][j] to counts[b][j + 1]."""
    pos = [0] * len(counts)
    total = sum(c[0] for c in counts)
    heap = [(costs[b][0], b) for b in range(len(counts)) if len(counts[b]) > 1]
    heapq.heapify(heap)
    while total > budget and heap:
        _, b = heapq.heappop(heap)
        j = pos[b]
        total -= counts[b][j] - counts[b][j + 1]
        pos[b] = j + 1
        if j + 2 < len(counts[b]):
            heapq.heappush(heap, (costs[b][j + 1], b))
    return pos


def _error_costs(W, stats: Stats, ks: list[int], groups, segments: int, damp: float, energy: float,
                 selection: str = "score") -> list[float]:
    from .selection import obs_select, score_order_curve

    units = W.shape[1] if groups is None else groups.shape[0]
    scale = units // ks[0]  # counts are per segment (value channels) or per column (MLP)
    if selection == "obs":  # the greedy's own curve, at its chunk boundaries
        _, (ck, ce) = obs_select(W, stats.H, ks[-1] * scale, groups, segments, damp=damp, return_curve=True)
        ck = torch.tensor(ck[::-1], dtype=torch.float64)  # ascending kept counts
        ce = torch.tensor(ce[::-1], dtype=torch.float64)
        err = [_interp(ck, ce, k * scale) / energy for k in ks]
    else:
        curve = score_order_curve(W, stats.s, stats.H, groups, segments, damp=damp,
                                  upto=(ks[0] - ks[-1]) * scale).cpu()  # as far as the cap lets a block go
        err = [float(curve[(ks[0] - k) * scale]) / energy for k in ks]
    return [max(b - a, 0.0) for a, b in zip(err, err[1:])]


def _error_step_costs(W, stats: Stats, ks, groups, segments: int, cfg, energy: float) -> list[float]:
    """The "error" allocations' costs: the restored-error curve of the run's selection, relative to
    the energy of the residual stream the projection adds to."""
    return _error_costs(W, stats, ks, groups, segments, cfg.selection_damp, max(energy, 1e-30), cfg.selection)


def _interp(x: torch.Tensor, y: torch.Tensor, x0: float) -> float:
    i = int(torch.searchsorted(x, torch.tensor(float(x0), dtype=x.dtype)))
    if i < len(x) and x[i] == x0:
        return float(y[i])
    i = min(max(i, 1), len(x) - 1)
    t = (x0 - x[i - 1]) / (x[i] - x[i - 1])
    return float(y[i - 1] + t * (y[i] - y[i - 1]))


def _flap_costs(W, stats: Stats, ks: list[int], groups, segments: int) -> list[float]:
    score = fluctuation_scores(W, stats)
    if groups is not None:
        score = score[groups].sum(1)
    score = (score - score.mean()) / score.std().clamp_min(1e-30)
    per_seg = score.view(segments, -1).sort(1).values  # ascending within each segment
    costs = []
    for a, b in zip(ks, ks[1:]):  # removing kept counts a -> b drops ranks (full - a) .. (full - b) - 1
        lo, hi = ks[0] - a, ks[0] - b
        costs.append(float(per_seg[:, lo:hi].mean()))
    return costs


@torch.no_grad()
def dense_costs(adapter, blocks, mcfg, inputs, cfg, device, timer, mover=None) -> tuple[list[list], list[tuple]]:
    """The allocation's dense pass: every block's ``block_costs`` entry (``decide`` turns them into
    kept counts), and per block the residual stream's energy entering and leaving it (``(0.0, 0.0)``
    for the FLAP rankings). Runs the blocks densely over ``inputs``, whose hidden states it
    overwrites with the dense outputs."""
    if mover is None:
        from .calibration import BlockMover

        mover = BlockMover(next(blocks[0].parameters()).device)
    need_gram = ALLOCATIONS[cfg.allocation_kind].needs_gram
    per_block = []  # per block: (attn, mlp), each (kept counts, step costs, parameters per unit) or None
    steps_ = range(len(blocks))
    if cfg.progress:  # the dense pass takes a while on a CPU: say so (issue 14)
        from tqdm.auto import tqdm

        n_win = sum(spill.batch_shape(inputs.hidden, j)[0] for j in range(len(inputs.hidden)))  # not read from disk
        steps_ = tqdm(steps_, desc=f"allocation ({cfg.allocation_kind}): dense pass over {n_win} windows",
                      unit="block")
    # the stream's energy entering each block is the energy leaving the one before: one sum per boundary
    energy_in = stream_energy(inputs.hidden, device) if need_gram else 0.0
    energies = []
    for i in steps_:
        block = mover.fetch(blocks, i, device)
        (st_o, st_d), hooks = structure_stats(adapter, block, cfg, device, need_gram)
        with timer("allocation_forward"):
            outs = run_block(block, inputs.at(i), keep_outputs=True)
        for h in hooks:
            h.remove()
        for st in (st_o, st_d):
            if st is not None:
                st.reduce()
        energy_out = stream_energy(outs, device) if need_gram else 0.0
        inputs.hidden[:] = outs
        with timer("allocation_costs"):
            per_block.append(block_costs(adapter, block, mcfg, cfg, st_o, st_d, energy_in, energy_out))
        energies.append((energy_in, energy_out))
        energy_in = energy_out
        mover.release(blocks, i, block, final=False)
    return per_block, energies


def stream_energy(hidden: list[torch.Tensor], device) -> float:
    """Sum of squares of the residual stream over every calibration token (of every process)."""
    # one fused reduction per batch (no squared copy of the stream), summed on the device in float64
    # (each norm squared there, as Python squared it before) and read back once, not once per batch
    total = None
    for x in hidden:
        sq = torch.linalg.vector_norm(x, dtype=torch.float32).double().square()
        total = sq if total is None else total + sq
    total = 0.0 if total is None else float(total)
    return distributed.all_reduce_numbers(total, device=device)[0]


def block_costs(adapter, block, mcfg, cfg, st_o: Stats | None, st_d: Stats | None, energy_in: float,
                energy_out: float) -> list:
    """One block's entry for ``decide``: per structure (value channels, MLP neurons) the allowed kept
    counts, the cost of each removal step and the parameters one unit weighs (None: not pruned).
    ``st_o``/``st_d``: statistics of the output projections' inputs on the dense stream (with the Gram
    matrix for the "error" allocation, which also needs the stream's energy entering and leaving)."""
    entry = []
    for st, frac, which in ((st_o, cfg.attn_fraction, "attn"), (st_d, cfg.mlp_fraction, "mlp")):
        if st is None:
            entry.append(None)
            continue
        if which == "attn":
            v, o = adapter.value_pair(block)
            n, kv = adapter.block_heads(block, mcfg)
            W = judged_weight(cfg, adapter, block, "attn", o.weight)
            if cfg.attn_unit == "head":  # whole kv-head groups: counts are the block's kv heads
                full, step = kv, 1
                groups, segments = adapter.head_groups(block, mcfg, W.device), 1
            else:
                full, step = v.out_features // kv, cfg.attn_multiple
                groups, segments = value_groups(n, kv, full, W.device), kv
        else:
            full, step = adapter.mlp_width(block), cfg.mlp_multiple
            W = judged_weight(cfg, adapter, block, "mlp", adapter.mlp_pair(block)[1].weight)
            groups, segments = None, 1
        cap = cfg.max_block_sparsity if cfg.max_block_sparsity is not None else min(0.9, DEFAULT_CAP * frac)
        lowest = kept_count(full, min(cap, 1.0 - 1.0 / full), step) if full > 1 else full
        ks = _steps(full, lowest, step)
        if len(ks) < 2:
            entry.append((ks, [], 1))
            continue
        costs = ALLOCATIONS[cfg.allocation_kind].costs(W, st, ks, groups, segments, cfg,
                                                      energy_in if which == "attn" else energy_out)
        entry.append((ks, costs, _unit_params(adapter, block, mcfg, which, cfg.attn_unit)))
    return entry


def decide(per_block: list[list], cfg, fixed: dict | None = None) -> list[dict]:
    """Kept counts per block from every block's ``block_costs``: one greedy per structure, or
    (flap-am, error-am) one over both with counts weighed in parameters, to the total uniform pruning
    keeps. error-am compares the error of each step per parameter it frees (both structures' errors
    are relative perturbations of the residual stream); flap-am compares its per-unit scores.

    ``fixed``: ``{(block, "v_keep" or "mlp_keep"): kept count}`` already decided (and applied): those
    stay as they are, and the others share what is left of the budget (``allocation_replan``)."""
    fixed = fixed or {}

    kind = ALLOCATIONS[cfg.allocation_kind]
    parts = [(idx, key, frac, mult) for idx, key, frac, mult in
             ((0, "v_keep", cfg.attn_fraction, cfg.attn_multiple), (1, "mlp_keep", cfg.mlp_fraction, cfg.mlp_multiple))
             if frac > 0 and per_block[0][idx] is not None]
    joint = kind.joint
    groups_ = [parts] if joint else [[p] for p in parts]
    result = [{"v_keep": None, "mlp_keep": None} for _ in per_block]
    for group in groups_:
        keys, steps, costs, weights, uniform, spent = [], [], [], [], [], 0
        for idx, key, frac, mult in group:
            for b in range(len(per_block)):
                ks, c, unit = per_block[b][idx]
                w = unit if joint else 1
                if (b, key) in fixed:  # decided already: what it keeps counts against the budget
                    spent += fixed[b, key] * w - kept_count(ks[0], frac, mult) * w
                    result[b][key] = fixed[b, key]
                    continue
                keys.append((b, key))
                steps.append(ks)
                if kind.per_parameter:  # a step's cost (error) per parameter it frees
                    c = [cj / max((ks[j] - ks[j + 1]) * unit, 1) for j, cj in enumerate(c)]
                costs.append(c)
                weights.append(w)
                uniform.append(kept_count(ks[0], frac, mult))
        budget = sum(k * w for k, w in zip(uniform, weights)) - spent
        pos = greedy_budget(costs, [[k * w for k in ks] for ks, w in zip(steps, weights)], budget)
        for (b, key), ks, p in zip(keys, steps, pos):
            result[b][key] = ks[p]
    return result


class Replanner:
    """``allocation_replan``: the sequential pass decides each block's kept counts again just before
    pruning it, from the block's own statistics (every calibration window, the pruned model's stream),
    over what is left of the budget. The dense pass's curves (``dense_costs``) stand in for the blocks
    not reached yet, scaled per structure by how the curves computed so far compare with the dense
    pass's for the same blocks (curves from few windows fit their own tokens too well, and so
    understate the error; left as they are, the blocks still ahead would look cheap)."""

    def __init__(self, per_block: list[list], energies: list[tuple], cfg):
        self.dense = per_block                      # the dense pass's entries, as they came
        self.now = [list(e) for e in per_block]     # what decide sees: computed ones, scaled forecasts
        self.energies = energies
        self.cfg = cfg
        self.fixed: dict = {}
        self.seen = {0: [0.0, 0.0], 1: [0.0, 0.0]}  # per structure: sums of computed and dense costs
        self.e_in = 0.0

    def enter(self, i: int, hidden, device) -> None:
        """Block ``i`` starts: the energy of the stream it adds to (the allocation's normaliser)."""
        self.e_in = stream_energy(hidden, device)

    def may_change(self, i: int, which: str) -> bool:
        """Whether block ``i``'s structure has more than one allowed kept count (so needs its curve)."""
        entry = self.dense[i][0 if which == "attn" else 1]
        return entry is not None and len(entry[0]) > 1

    def decide(self, adapter, block, mcfg, i: int, which: str, st: Stats) -> int:
        """The kept count of block ``i``'s ``which`` ("attn": per kv head, "mlp") from ``st``, its input
        statistics on the pruned model's stream, and the others' curves; fixed from then on."""
        idx = 0 if which == "attn" else 1
        if which == "attn":
            entry = block_costs(adapter, block, mcfg, self.cfg, st, None, self.e_in, 0.0)[0]
        else:  # the MLP adds to the block's output: the dense pass's ratio of the block's output
            e_in, e_out = self.energies[i]  # energy to its input's, on this stream's input energy
            entry = block_costs(adapter, block, mcfg, self.cfg, None, st, 0.0,
                                self.e_in * e_out / e_in if e_in > 0 else e_out)[1]
        self.now[i][idx] = entry
        self.seen[idx][0] += sum(entry[1])
        self.seen[idx][1] += sum(self.dense[i][idx][1])
        for j in (0, 1):  # the forecasts of the structures not decided yet, scaled
            num, den = self.seen[j]
            scale = num / den if num > 0 and den > 0 else 1.0
            for b in range(i, len(self.dense)):
                d = self.dense[b][j]
                if d is not None and (b, ("v_keep", "mlp_keep")[j]) not in self.fixed and not (b == i and j == idx):
                    self.now[b][j] = (d[0], [c * scale for c in d[1]], d[2])
        key = ("v_keep", "mlp_keep")[idx]
        self.fixed[i, key] = decide(self.now, self.cfg, self.fixed)[i][key]
        return self.fixed[i, key]


def _unit_params(adapter, block, mcfg, which: str, attn_unit: str = "channel") -> int:
    """Parameters freed by one step unit: a value channel in every kv head (its v_proj rows and the
    o_proj columns of every query head reading it), a whole kv-head group (``attn_unit="head"``: its
    q, k and v rows with their biases and its o_proj columns), or one MLP neuron (its input rows,
    output column)."""
    if which == "attn":
        v, o = adapter.value_pair(block)
        n, kv = adapter.block_heads(block, mcfg)
        if attn_unit == "head":
            a = adapter.attention(block)
            rep, hd, dv = n // kv, adapter.head_geometry(mcfg)[2], v.out_features // kv
            row = lambda lin: lin.in_features + (lin.bias is not None)  # noqa: E731
            return (rep * hd * row(getattr(a, adapter.q_name)) + hd * row(getattr(a, adapter.k_name))
                    + dv * row(v) + rep * dv * o.out_features)
        return kv * (v.in_features + (v.bias is not None)) + n * o.out_features
    ins, out = adapter.mlp_pair(block)
    return sum(lin.in_features + (lin.bias is not None) for lin in ins) + out.out_features


# ----------------------------------------------------------------------------- the registered parts
# (methods.ALLOCATIONS; the order is the command line's. Windows: docs/decisions.md)
register_allocation(Allocation("uniform", help="every block alike"))
register_allocation("error", needs_gram=True, windows=16, replans=True,
                    help="restored-error curves ranked across blocks, per structure")(_error_step_costs)
register_allocation("error-am", needs_gram=True, joint=True, per_parameter=True, windows=12, replans=True,
                    per_structure="error",
                    help="restored-error curves ranked across blocks and structures, per parameter")(_error_step_costs)
register_allocation("flap", windows=32, help="FLAP's standardised fluctuation scores ranked across blocks")(
    lambda W, stats, ks, groups, segments, cfg, energy: _flap_costs(W, stats, ks, groups, segments))
register_allocation("flap-am", joint=True, windows=32, per_structure="flap",
                    help="FLAP's scores ranked across blocks and structures")(
    lambda W, stats, ks, groups, segments, cfg, energy: _flap_costs(W, stats, ks, groups, segments))
#: the allocations that rank restored-error curves (they need the Gram matrices and stream energies)
ERROR_KINDS = tuple(name for name, a in ALLOCATIONS.items() if a.needs_gram)
