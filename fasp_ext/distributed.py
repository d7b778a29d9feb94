"""Data-parallel calibration over torch.distributed.

Every statistic the pipeline collects (s, H, means, counts, the held-out parts, the allocation
pass's sums) is a sum over calibration tokens, so each process runs its share of the windows and
the sums are all-reduced before they are used: every rank then makes the same selection and the
same solve, and the result equals a single-process run on the same windows up to the rounding of
the summation order. ``torchrun --nproc_per_node N -m fasp_ext prune ...`` starts it (gloo on CPU,
NCCL on GPU, picked from the device); rank 0 alone writes the output.
"""

from __future__ import annotations

import datetime
import os

import torch

_offset = 0  # index of this rank's first calibration window among all windows (held-out sampling)


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def init_from_env(device: str) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False when running alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return active()
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get("FASP_EXT_DIST_TIMEOUT", "1800")))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend, timeout=timeout)
    return True


def device_for(device: str) -> str:
    """Each rank's own GPU under torchrun (``cuda`` means ``cuda:LOCAL_RANK``)."""
    if active() and device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def shard(tokens: torch.Tensor, set_offset: bool = True) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows; ``set_offset`` makes the global index
    of its first window the numbering base of held-out samples (``sample_offset``)."""
    global _offset
    if not active():
        if set_offset:
            _offset = 0
        return tokens
    n, w = tokens.shape[0], world_size()
    if n < w:
        raise ValueError(f"calibration: {n} windows cannot be shared by {w} processes (need at least one each)")
    mine = torch.tensor_split(torch.arange(n), w)[rank()]
    if set_offset:
        _offset = int(mine[0])
    return tokens[int(mine[0]):int(mine[-1]) + 1]


def sample_offset() -> int:
    return _offset


def all_reduce_(*tensors: torch.Tensor | None) -> None:
    """Sum tensors in place across ranks (no-op when alone)."""
    if not active():
        return
    for t in tensors:
        if t is not None:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def all_reduce_numbers(*xs: float, device="cpu") -> list[float]:
    """Sums of Python numbers across ranks (float64)."""
    if not active():
        return list(xs)
    t = torch.tensor(xs, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if active():
        torch.distributed.barrier()
