"""Fake (meta) kernels of the compiled ops, so torch.compile / FakeTensor can trace them.

Imported by fasp_ext._loader once fasp_ext._C has registered the op schemas. Only what needs no
data is checked and computed here (shapes, dtypes, devices); the value checks (index ranges,
NaN/Inf) run in the real kernels.
"""

from __future__ import annotations

import torch

from . import reference as ref

_LIB = "fasp_ext"


def _fail(msg: str):
    raise ValueError(msg)


@torch.library.register_fake(f"{_LIB}::accumulate_stats")
def _accumulate_stats_fake(X, s, H):
    ref.check_stats_args(X, s, H)  # shape/dtype/device only
    return None


@torch.library.register_fake(f"{_LIB}::score_select")
def _score_select_fake(W, s, k, groups, segments):
    if W.dim() != 2:
        _fail(f"score_select: W must be 2-D (out, m), got {W.dim()}-D")
    if s.device != W.device:
        _fail(f"score_select: s is on {s.device} but W is on {W.device}")
    if groups is not None and groups.device != W.device:
        _fail(f"score_select: groups is on {groups.device} but W is on {W.device}")
    G = W.shape[1] if groups is None else groups.shape[0]
    if k < 0 or k > G:
        _fail(f"score_select: k={k} out of range [0, {G}]")
    return W.new_empty((k,), dtype=torch.int64)


@torch.library.register_fake(f"{_LIB}::restore")
def _restore_fake(W, H, kept, damp, use_fp64, max_retries):
    if W.dim() != 2:
        _fail(f"restore: W must be 2-D (out, m), got {W.dim()}-D")
    if kept.dim() != 1:
        _fail(f"restore: kept must be a 1-D int64 tensor, got {kept.dtype} {kept.dim()}-D")
    for name, t in (("H", H), ("kept", kept)):
        if t.device != W.device:
            _fail(f"restore: {name} is on {t.device} but W is on {W.device}")
    out = W.new_empty((W.shape[0], kept.shape[0]))
    report = torch.empty((3,), dtype=torch.float64, device="cpu")  # always a CPU tensor
    return out, report
