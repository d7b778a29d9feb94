"""Fake (meta) kernels of the ops, so torch.compile / FakeTensor can trace them.

The same functions serve the compiled ops (``fasp_ext::*``, registered by :func:`register` once
fasp_ext._C has declared the schemas) and the plain-torch fallback ops (``fasp_ext_ref::*``, see
fasp_ext/ops.py). Only what needs no data is checked and computed here (shapes, dtypes, devices);
the value checks (index ranges, NaN/Inf) run in the real kernels.
"""

from __future__ import annotations

import torch

from . import reference as ref


def _fail(msg: str):
    raise ValueError(msg)


def accumulate_stats_fake(X, s, H):
    ref.check_stats_args(X, s, H)  # shape/dtype/device only
    return None


def accumulate_stats_deferred_fake(X, s, H, bad):
    ref.check_stats_args(X, s, H)
    return None


def score_select_fake(W, s, k, groups, segments):
    ref.check_score_meta(W, s, k, groups, segments)
    return W.new_empty((k,), dtype=torch.int64)


def restore_fake(W, H, kept, damp, use_fp64, max_retries):
    ref.check_restore_meta(W, H, kept, damp, max_retries)
    out = W.new_empty((W.shape[0], kept.shape[0]))
    report = torch.empty((3,), dtype=torch.float64, device="cpu")  # always a CPU tensor
    return out, report


def register(lib: str) -> None:
    torch.library.register_fake(f"{lib}::accumulate_stats")(accumulate_stats_fake)
    torch.library.register_fake(f"{lib}::score_select")(score_select_fake)
    torch.library.register_fake(f"{lib}::restore")(restore_fake)
    for op in ("accumulate_stats_deferred", "accumulate_stats_lower"):  # declared by CUDA builds only
        if torch._C._dispatch_has_kernel(f"{lib}::{op}"):
            torch.library.register_fake(f"{lib}::{op}")(accumulate_stats_deferred_fake)
