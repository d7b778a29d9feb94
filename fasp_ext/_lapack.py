"""LAPACK's Cholesky factorisation in place, for the allocation's error curves on a CPU.

``torch.linalg.cholesky_ex`` copies its input into column-major order, factorises, then zeroes the
lower triangle's complement with ``tril``: at 1536 x 1536 in float64 on two threads of this project's
2-core Xeon, 21 ms against 10.5 ms for the factorisation alone (one measurement, December 2026).
torch's x86-64 Linux wheels export LAPACK's ``dpotrf_`` from libtorch_cpu (MKL, linked in), as the
compiled restore kernel also uses (csrc/cpu/restore.cpp): called on a row-major symmetric matrix
with ``uplo = 'L'`` it factorises in place, leaving ``L^T`` in the upper triangle, bitwise the factor
torch returns (checked once at first use). Anywhere else (no such symbol, another platform, or
``FASP_EXT_POTRF=0``) torch's own call is used.
"""

from __future__ import annotations

import ctypes
import os

import torch

_POTRF = None  # dpotrf_ once found and checked; False when not usable


def _find():
    if os.environ.get("FASP_EXT_POTRF", "1") == "0":
        return False
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"),
                          mode=getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 1))
        fn = lib.dpotrf_
    except (OSError, AttributeError):
        return False
    fn.restype = None
    # one small check against torch: a 7 x 7 positive definite matrix, the same factor bit for bit
    x = torch.arange(49, dtype=torch.float64).reshape(7, 7).sin()
    a = x @ x.t() + torch.eye(7, dtype=torch.float64)
    u = a.clone()
    if _call(fn, u) != 0 or not torch.equal(u.triu(), torch.linalg.cholesky(a).t()):
        return False
    return fn


def _call(fn, a: torch.Tensor) -> int:
    n, info = ctypes.c_int(a.shape[0]), ctypes.c_int(0)
    fn(ctypes.c_char_p(b"L"), ctypes.byref(n), ctypes.c_void_p(a.data_ptr()), ctypes.byref(n), ctypes.byref(info))
    return info.value


def cholesky_upper_(a: torch.Tensor) -> int:
    """Factorise the symmetric positive definite ``a`` = L L^T in place: its upper triangle becomes
    L^T (the transpose of ``torch.linalg.cholesky(a)``); what its strict lower triangle then holds is
    unspecified. Returns LAPACK's info: 0 on success, > 0 when ``a`` is not positive definite (``a``
    is then partly overwritten)."""
    global _POTRF
    if a.device.type == "cpu" and a.dtype == torch.float64 and a.dim() == 2 and a.is_contiguous() \
            and 0 < a.shape[0] < 2**31:
        if _POTRF is None:
            _POTRF = _find()
        if _POTRF:
            return _call(_POTRF, a)
    L, info = torch.linalg.cholesky_ex(a)
    a.copy_(L.t())
    return int(info)
