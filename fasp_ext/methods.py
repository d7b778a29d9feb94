"""Pruning methods as registered parts, looked up by name.

A run (``PruneConfig``) names four parts, each one entry of a table here:

- a **method** (``METHODS``, ``PruneConfig.method``): how a unit is scored, which restoration refits
  the shrunken projection, and the allocation it uses by default;
- a **selection** (``SELECTIONS``, ``PruneConfig.selection``): which units go, given the scores or
  the restoration ("score": the top scores; "obs", "spap": fasp_ext/selection.py);
- an **allocation** (``ALLOCATIONS``, ``PruneConfig.allocation``): how many units each block keeps
  (the parts are registered by fasp_ext/allocation.py, next to their cost curves);
- a **restoration** (``RESTORATIONS``, named by the method): what becomes of the output projection
  once its input units are gone ("least-squares", "mean", "none").

The pipeline (fasp_ext/pipeline.py) asks the parts, never a name: ``_select`` calls the selection
part, ``_restore`` the restoration part, ``PruneConfig.validate`` each part's ``check``, and the
command line takes its choices from the tables. Adding a method is one ``register_method`` call and
its test; docs/adding-a-method.md walks through the ``magnitude`` baseline at the end of this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import ops
from .damping import choose_damp


class Registry(dict):
    """Name -> part, in registration order; ``lookup`` names the choices when a name is unknown."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, part):
        if part.name in self:
            raise ValueError(f"{self.kind} {part.name!r} is registered already")
        self[part.name] = part
        return part

    def lookup(self, name: str, field: str | None = None):
        """The part called ``name``; a ValueError naming ``field`` and the choices when there is none."""
        if name not in self:
            raise ValueError(f"{field or self.kind} must be one of {', '.join(self)}, got {name!r}")
        return self[name]


def _names(parts) -> str:
    """'a' or 'a' or 'b' ...: the names of ``parts``, quoted, for a message."""
    return " or ".join(repr(p.name) for p in parts)


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """A pruning method: how units are scored and how the projection is restored."""

    name: str
    #: ``score(W, stats, gen) -> (m,)``: a score per input column of the output projection ``W``
    #: (higher is kept; value channels sum their columns' scores); ``stats``: its inputs' statistics
    #: (fasp_ext/calibration.py ``Stats``: s, mu, n, H), ``gen``: the run's seeded generator. None:
    #: the FASP/Wanda score sqrt(s_j) * sum_i |W[i, j]|, computed by the fused op (``ops.score_select``)
    score: Callable | None = None
    #: the restoration it uses (a name in ``RESTORATIONS``)
    restoration: str = "none"
    #: the allocation it uses when ``PruneConfig.allocation`` is None (a name in ``ALLOCATIONS``)
    default_allocation: str = "uniform"
    #: always fits a bias shift with the restoration (``PruneConfig.fits_intercept``)
    intercept: bool = False
    #: its restoration fits the pruned model's own error, so the error-driven selections (obs,
    #: spap) and the dense target (``target="dense"``) can run with it
    error_aware: bool = False
    #: weighs the calibration tokens by the sublayer output norm's scale (``token_weighting="auto"``)
    weighs_tokens: bool = False
    #: one line for the command line's help
    help: str = ""

    def check(self, cfg) -> None:
        """Refuse settings this method cannot run with (``PruneConfig.validate``)."""


METHODS = Registry("method")


def register_method(part, **fields):
    """Register a method: ``register_method(Method(...))``, or as a decorator of its score function,
    ``@register_method("name", restoration=..., ...)``. Returns what it was given."""
    if isinstance(part, Method):
        return METHODS.add(part)

    def wrap(score: Callable) -> Callable:
        METHODS.add(Method(part, score=score, **fields))
        return score
    return wrap


# ----------------------------------------------------------------------------- selections
@dataclass(frozen=True)
class Selection:
    """Which units a block keeps: ``select(cfg, method, W, stats, k, groups, segments, gen)`` returns
    the ``k`` kept unit indices, ascending (units: columns of ``W``, or rows of ``groups``, each a set
    of columns; ``segments`` equal parts, e.g. kv heads, keep ``k / segments`` each)."""

    name: str
    select: Callable
    #: models the restoration's error, so it needs a method with ``error_aware``
    error_aware: bool = False
    #: ``check(cfg)``: refuse bad values of this selection's own fields (None: it has none)
    fields: Callable | None = None
    help: str = ""

    def check(self, cfg, method: Method) -> None:
        if self.error_aware and not method.error_aware:
            needs = _names(m for m in METHODS.values() if m.error_aware)
            raise ValueError(f"selection={self.name!r} needs method {needs} (it uses the restoration), "
                             f"got {method.name!r}")
        if self.fields is not None:
            self.fields(cfg)


SELECTIONS = Registry("selection")


def register_selection(name: str, **fields):
    """Decorator: register the select function it decorates as selection ``name``."""
    def wrap(select: Callable) -> Callable:
        SELECTIONS.add(Selection(name, select, **fields))
        return select
    return wrap


# ----------------------------------------------------------------------------- allocations
@dataclass(frozen=True)
class Allocation:
    """How many units each block keeps (fasp_ext/allocation.py registers them).

    ``costs(W, stats, ks, groups, segments, cfg, energy) -> [cost per removal step]``: the cost of
    going from kept count ``ks[j]`` to ``ks[j + 1]`` (None: every block alike, no dense pass)."""

    name: str
    costs: Callable | None = None
    #: its costs need the Gram matrices and the residual stream's energy (the restored-error curves)
    needs_gram: bool = False
    #: value channels and MLP neurons compete in one ranking, with a budget in parameters
    joint: bool = False
    #: a step's cost is divided by the parameters it frees (joint rankings of errors)
    per_parameter: bool = False
    #: calibration windows of its dense pass by default (``PruneConfig.allocation_samples=None``)
    windows: int | None = None
    #: the sequential pass may decide each block's counts again from its own curve (``allocation_replan``)
    replans: bool = False
    #: what a method's default of this allocation becomes when ``mlp_sparsity``/``attn_sparsity`` is
    #: given (a joint budget would not keep each structure's total)
    per_structure: str | None = None
    help: str = ""

    def check(self, cfg) -> None:
        if cfg.allocation_replan and (cfg.one_pass or not self.replans):
            can = _names(a for a in ALLOCATIONS.values() if a.replans)
            raise ValueError(f"allocation_replan needs sequential mode (one_pass=False) and allocation {can}, "
                             f"got one_pass={cfg.one_pass} and allocation {self.name!r}")


ALLOCATIONS = Registry("allocation")


def register_allocation(part, **fields):
    """Register an allocation: ``register_allocation(Allocation(...))``, or as a decorator of its cost
    function, ``@register_allocation("name", ...)``."""
    if isinstance(part, Allocation):
        return ALLOCATIONS.add(part)

    def wrap(costs: Callable) -> Callable:
        ALLOCATIONS.add(Allocation(part, costs=costs, **fields))
        return costs
    return wrap


# ----------------------------------------------------------------------------- restorations
@dataclass
class Fit:
    """What a restoration starts from: the output projection ``W`` (out, m), its (new) bias in
    float32 (None: it has none and gets none), the statistics ``stats`` of its inputs, the kept
    columns, and the statistics to fit with: ``H, mu, n`` (and held-out ``Hv, muv, nv``) of the
    inputs less the removed columns' constants ``c`` (folded into the bias already; None: none)."""

    W: torch.Tensor
    bias: torch.Tensor | None
    stats: object
    kept: torch.Tensor
    H: torch.Tensor | None
    mu: torch.Tensor
    n: float
    Hv: torch.Tensor | None
    muv: torch.Tensor | None
    nv: float
    c: torch.Tensor | None = None

    def sliced(self, info: dict):
        """The kept columns as they are, with the bias: no refit."""
        return self.W[:, self.kept].contiguous(), None if self.bias is None else self.bias.to(self.W.dtype), info

    def removed(self) -> torch.Tensor:
        mask = torch.ones(self.W.shape[1], dtype=torch.bool, device=self.W.device)
        mask[self.kept] = False
        return mask


@dataclass(frozen=True)
class Restoration:
    """What becomes of the output projection: ``apply(fit, cfg, restore) -> (W', bias', info)``;
    ``restore``: whether the run refits by least squares (``PruneConfig.restores``)."""

    name: str
    apply: Callable
    #: refits by least squares (so the run collects the Gram matrices)
    least_squares: bool = False
    #: gives the projection a bias where it had none
    adds_bias: bool = False

    def check(self, cfg, method: Method) -> None:
        if cfg.target == "dense" and (not method.error_aware or cfg.one_pass or cfg.damp == "auto"
                                      or cfg.intercept):
            needs = _names(m for m in METHODS.values() if m.error_aware)
            raise ValueError(f"target='dense' needs method {needs}, sequential mode (one_pass=False), a numeric "
                             "damp and intercept=False")


RESTORATIONS = Registry("restoration")


def register_restoration(name: str, **fields):
    """Decorator: register the apply function it decorates as restoration ``name``."""
    def wrap(apply: Callable) -> Callable:
        RESTORATIONS.add(Restoration(name, apply, **fields))
        return apply
    return wrap


def choices(registry: Registry) -> list[str]:
    """The names registered in ``registry`` (every allocation included), for the command line."""
    from . import allocation  # noqa: F401  (registers the allocations)

    return list(registry)


def check(cfg) -> None:
    """Each part's own rules for ``cfg`` (``PruneConfig.validate`` runs the field checks around it)."""
    from . import allocation  # noqa: F401  (registers the allocations)

    method = METHODS.lookup(cfg.method, "method")
    method.check(cfg)
    SELECTIONS.lookup(cfg.selection, "selection").check(cfg, method)
    if cfg.allocation is not None:
        ALLOCATIONS.lookup(cfg.allocation, "allocation")
    ALLOCATIONS.lookup(cfg.allocation_kind, "allocation").check(cfg)
    RESTORATIONS.lookup(method.restoration, "restoration").check(cfg, method)


# ============================================================================= the parts
# ---- restorations
def _augment(H, mu, n):
    """Statistics of [x, 1]: the Gram of the inputs with a constant column appended."""
    m = H.shape[0]
    Ha = torch.empty(m + 1, m + 1, device=H.device, dtype=H.dtype)
    Ha[:m, :m] = H
    Ha[:m, m] = mu
    Ha[m, :m] = mu
    Ha[m, m] = float(n)
    return Ha


def restore_toward(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, kept: torch.Tensor, damp: float,
                   max_retries: int = 4) -> tuple[torch.Tensor, float]:
    """Kept columns refitted toward other targets: W' = (W D[:, S] + lam W[:, S]) (H[S, S] + lam I)^-1.

    With D = sum x_target x^T this minimises sum ||W x_target - W' x_S||^2 + lam ||W' - W[:, S]||^2
    (with D = H it is exactly ``ops.restore``). lam = damp * mean(diag H[S, S]), raised x10 (from a
    tiny floor when damp is 0) until the Cholesky factorisation succeeds. Solved in float64.
    """
    Hs = H.index_select(0, kept).index_select(1, kept).double()
    Wd = W.double()
    scale = float(Hs.diagonal().mean().clamp_min(1e-30))
    lam = float(damp) * scale
    eye = torch.eye(Hs.shape[0], dtype=torch.float64, device=Hs.device)
    for _ in range(max_retries + 1):
        L, info = torch.linalg.cholesky_ex(Hs + lam * eye)
        if int(info) == 0:
            break
        lam = max(lam * 10.0, 1e-8 * scale)
    else:
        raise RuntimeError("restore_toward: H[S, S] is not positive definite even after raising the damping")
    rhs = Wd @ D.index_select(1, kept).double() + lam * Wd.index_select(1, kept)
    return torch.cholesky_solve(rhs.t(), L).t().to(W.dtype), lam


@register_restoration("least-squares", least_squares=True)
def _least_squares(fit: Fit, cfg, restore: bool):
    """The kept columns refitted by damped least squares to the projection's own outputs
    (``ops.restore``; ``damp="auto"`` picks the damping on held-out windows), or to the dense
    model's (``target="dense"``: the statistics carry ``D``), with a bias shift where
    ``cfg.fits_intercept``."""
    W, new_bias, stats, kept_cols = fit.W, fit.bias, fit.stats, fit.kept
    info: dict = {"path": "none", "lam": 0.0}
    if restore and stats.D is not None:  # toward the dense model's outputs
        D = stats.D
        if fit.c is not None:  # the folded constants leave the target too
            D = D - torch.outer(fit.c, stats.mu)
        out, lam = restore_toward(W, stats.H, D, kept_cols, float(cfg.damp))
        info.update({"path": "cholesky-dense-target", "lam": lam, "damp": float(cfg.damp)})
        return out.contiguous(), None if new_bias is None else new_bias.to(W.dtype), info
    if not restore or fit.H is None:
        return fit.sliced(info)
    H, Hv, m = fit.H, fit.Hv, W.shape[1]
    Wt, kept_t = W, kept_cols
    if cfg.fits_intercept and new_bias is not None:
        H = _augment(H, fit.mu, fit.n)
        Hv = _augment(Hv, fit.muv, fit.nv) if Hv is not None else None
        Wt = torch.cat([W.float(), new_bias.unsqueeze(1)], 1)
        kept_t = torch.cat([kept_cols, torch.tensor([m], device=kept_cols.device)])
    damp = cfg.damp
    if damp == "auto":
        damp, errors = choose_damp(Wt, H - Hv, Hv, kept_t, cfg.damp_grid)
        info["heldout_error"] = {str(k): v for k, v in errors.items()}
    out, rep = ops.restore(Wt, H, kept_t, float(damp), cfg.fp64)
    info.update({"path": rep.path, "lam": rep.lam, "damp": float(damp)})
    if Wt is not W:
        out, new_bias = out[:, :-1], out[:, -1]
    return out.to(W.dtype).contiguous(), None if new_bias is None else new_bias.to(W.dtype), info


@register_restoration("mean", adds_bias=True)
def _mean_into_bias(fit: Fit, cfg, restore: bool):
    """FLAP's bias compensation: each removed input replaced by its calibration mean, moved into the
    bias; the kept columns stay as they are."""
    removed = fit.removed()
    fit.bias += fit.W.float()[:, removed] @ (fit.mu[removed] / max(fit.n, 1))
    return fit.sliced({"path": "none", "lam": 0.0})


@register_restoration("none")
def _no_restoration(fit: Fit, cfg, restore: bool):
    """The kept columns as they are."""
    return fit.sliced({"path": "none", "lam": 0.0})


# ---- selections
@register_selection("score", help="the method's score (default)")
def _by_score(cfg, method: Method, W, stats, k: int, groups, segments: int, gen):
    """The ``k`` units of highest ``method.score`` (per segment)."""
    if method.score is None:
        return ops.score_select(W, stats.s, k, groups, segments)
    scores = method.score(W, stats, gen)
    if groups is not None:
        scores = scores[groups].sum(1)
    from .reference import select_top

    return select_top(scores, k, segments)


@register_selection("obs", error_aware=True, help="greedy removal by the exact increase of the restored error")
def _by_obs(cfg, method, W, stats, k, groups, segments, gen):
    from .selection import obs_select

    return obs_select(W, stats.H, k, groups, segments, damp=cfg.selection_damp).to(W.device)


def _check_spap(cfg) -> None:
    if int(cfg.spap_rounds) < 1:
        raise ValueError(f"spap_rounds must be >= 1, got {cfg.spap_rounds!r}")


@register_selection("spap", error_aware=True, fields=_check_spap,
                    help="SPAP-style alternating re-selection and re-fit under a growing penalty")
def _by_penalty(cfg, method, W, stats, k, groups, segments, gen):
    from .selection import penalty_select

    start = ops.score_select(W, stats.s, k, groups, segments)
    return penalty_select(W, stats.H, k, groups, segments, damp=cfg.selection_damp,
                          rounds=int(cfg.spap_rounds), start=start).to(W.device)


# ---- methods (the order is the command line's)
register_method(Method("fasp", restoration="least-squares", default_allocation="error-am", error_aware=True,
                       weighs_tokens=True, help="score + least-squares restoration (default)"))
register_method(Method("wanda-sp", help="the same score, no restoration"))


@register_method("flap", restoration="mean", default_allocation="flap",
                 help="fluctuation score + bias compensation")
def _flap_score(W, stats, gen):
    from .calibration import fluctuation_scores

    return fluctuation_scores(W, stats)


@register_method("depth2", restoration="least-squares", intercept=True,
                 help="second-moment score + two-step reconstruction")
def _depth2_score(W, stats, gen):
    """Second moment of each unit's output contribution: E||W[:, j] x_j||^2."""
    return stats.s * W.float().pow(2).sum(0)


# The example of docs/adding-a-method.md: a method is its score and the parts it uses. Magnitude
# pruning keeps the units whose output-projection columns have the largest L2 norm; it ignores the
# activations and restores nothing.
@register_method("magnitude", restoration="none", default_allocation="uniform",
                 help="column L2 norm of the output projection")
def _magnitude_score(W, stats, gen):
    return W.float().pow(2).sum(0).sqrt()


@register_method("random", help="uniformly random units (seeded by PruneConfig.seed)")
def _random_score(W, stats, gen):
    return torch.rand(W.shape[1], generator=gen).to(W.device)
