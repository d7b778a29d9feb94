"""Counting, on the CPU, what would make the host wait on a GPU during a prune.

``SyncCounter`` is a TorchDispatchMode plus a few patches. It counts, per call site:

- ``scalar``: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``);
- ``d2h``: device-to-host copies (``aten._to_copy`` / ``copy_`` from a non-CPU tensor to the CPU on a
  real device; on the CPU, where those are no-ops, every ``Tensor.tolist``, ``.numpy`` and ``.cpu``
  call, each of which is a copy back when the tensor lives on a GPU). What ``.cpu()`` returns is
  marked as host memory (a copy, on the CPU), and reading it, or the report tensor ``restore``
  returns on the CPU on every device, is not counted again. ``Tensor.to(device)`` is not counted on
  the CPU, where the compute device and the host are one (the blocks' moves home, once per block,
  are counted on a GPU by bench/gpu_check.sh with torch.cuda.set_sync_debug_mode);
- ``shape``: ops whose output shape depends on the data (``nonzero``, ``masked_select``, ``unique``,
  indexing with a boolean mask), which read a count back;
- ``synchronize``: ``torch.cuda.synchronize`` and the synchronisation of a (fake) CUDA event;
- ``op``: calls of the compiled ops (``fasp_ext::*``, and their plain-torch fallbacks
  ``fasp_ext_ref::*``), weighed by the host waits the CUDA kernels declare per call
  (``fasp_ext.ops.HOST_SYNCS``): the op is opaque to the mode, its kernel's waits are not.

A count goes to the innermost caller outside torch and this file: a site in ``fasp_ext/`` counts
toward the budget (``fasp``), others (transformers' own model code) are kept apart (``model``).
"""

from __future__ import annotations

import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SHAPE_OPS = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive", "argwhere",
              "masked_scatter", "masked_scatter_"}
_HERE = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def _site(depth: int = 2) -> tuple[str, str]:
    """(owner, "file:line function") of the innermost frame outside torch and this file."""
    f = sys._getframe(depth)
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if fn != _HERE and not fn.startswith(_TORCH) and "contextlib" not in fn:
            break
        f = f.f_back
    if f is None:
        return "model", "?"
    fn = os.path.abspath(f.f_code.co_filename)
    owner = "fasp" if f"{os.sep}fasp_ext{os.sep}" in fn and f"{os.sep}tests{os.sep}" not in fn else "model"
    return owner, f"{os.path.basename(fn)}:{f.f_lineno} {f.f_code.co_name}"


def _target(a, k) -> str | None:
    """The device type ``Tensor.to(*a, **k)`` moves to (None: no device given)."""
    d = k.get("device")
    for v in a[1:]:
        if isinstance(v, (str, torch.device)):
            d = v
        elif isinstance(v, torch.Tensor):
            d = v.device
    return None if d is None else torch.device(d).type


def _mark_host(t: torch.Tensor) -> torch.Tensor:
    t._fasp_host = True
    return t


def _is_host(t) -> bool:
    """Whether ``t`` (or the tensor it views) was marked as host memory."""
    if not isinstance(t, torch.Tensor):
        return False
    return getattr(t, "_fasp_host", False) or getattr(t._base, "_fasp_host", False) if t._base is not None \
        else getattr(t, "_fasp_host", False)


class FakeEvent:
    """Stands in for torch.cuda.Event on the CPU: ``record`` notes the wall clock, ``synchronize``
    counts as one host wait (on the counter active at the time)."""

    active: "SyncCounter | None" = None

    def __init__(self, enable_timing: bool = False, **_):
        self.t = None

    def record(self, stream=None):
        import time

        self.t = time.perf_counter()

    def synchronize(self):
        if FakeEvent.active is not None:
            FakeEvent.active.add("synchronize", *_site())

    def query(self):
        return True

    def elapsed_time(self, end: "FakeEvent") -> float:
        return (end.t - self.t) * 1e3


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as c: ...``; then ``c.total()`` (fasp_ext's waits), ``c.by_kind()``, ``c.sites``."""

    def __init__(self):
        super().__init__()
        from fasp_ext import ops

        self.costs = dict(ops.HOST_SYNCS)
        self.sites: collections.Counter = collections.Counter()  # (owner, kind, site) -> count
        self._patches = []

    def add(self, kind: str, owner: str, site: str, n: int = 1) -> None:
        if n:
            self.sites[owner, kind, site] += n

    def owned(self, owner: str = "fasp") -> dict:
        """{(kind, site): count} of ``owner``'s waits."""
        return {(k, s): n for (o, k, s), n in self.sites.items() if o == owner}

    def total(self, owner: str = "fasp") -> int:
        return sum(n for (o, _, _), n in self.sites.items() if o == owner)

    def by_kind(self, owner: str = "fasp") -> dict:
        out = collections.Counter()
        for (o, k, _), n in self.sites.items():
            if o == owner:
                out[k] += n
        return dict(out)

    def report(self, owner: str = "fasp") -> str:
        return "\n".join(f"{n:5d}  {k:11s} {s}" for (o, k, s), n in sorted(self.sites.items()) if o == owner)

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        packet = func.overloadpacket.__name__
        if args and _is_host(args[0]) and packet in ("_local_scalar_dense", "_to_copy", "copy_"):
            return func(*args, **kwargs)
        if name in self.costs:
            self.add("op", *_site(), n=self.costs[name])
            out = func(*args, **kwargs)
            if name.endswith("::restore"):  # its report is a CPU tensor on every device
                _mark_host(out[1])
            return out
        elif name.startswith(("fasp_ext::", "fasp_ext_ref::")):
            raise AssertionError(f"{name} has no entry in fasp_ext.ops.HOST_SYNCS")
        elif packet == "_local_scalar_dense":
            self.add("scalar", *_site())
        elif packet in _SHAPE_OPS:
            self.add("shape", *_site())
        elif packet in ("index", "index_put", "index_put_", "_index_put_impl_"):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in idx or ()):
                self.add("shape", *_site())
        elif packet == "_to_copy":
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type == "cpu" and args[0].device.type != "cpu":
                self.add("d2h", *_site())
        elif packet == "copy_":
            if args[0].device.type == "cpu" and args[1].device.type != "cpu":
                self.add("d2h", *_site())
        return func(*args, **kwargs)

    # ------------------------------------------------------------------ patches
    def _patch(self, obj, attr, kind, host_copy: bool = False):
        orig = getattr(obj, attr)
        counter = self

        def wrapper(*a, **k):
            if host_copy:
                t = a[0]
                out = orig(*a, **k)
                if attr == "to" and _target(a, k) != "cpu":  # a dtype change, or to another device
                    return out
                if not (isinstance(out, torch.Tensor) and out.device.type == "cpu") or _is_host(t):
                    return out
                counter.add(kind, *_site())
                if out is t or out.data_ptr() == t.data_ptr():
                    out = out.clone()
                return _mark_host(out)
            if not (a and isinstance(a[0], torch.Tensor) and _is_host(a[0])):
                counter.add(kind, *_site())
            return orig(*a, **k)

        setattr(obj, attr, wrapper)
        self._patches.append((obj, attr, orig))

    def __enter__(self):
        for attr in ("tolist", "numpy"):
            self._patch(torch.Tensor, attr, "d2h")
        self._patch(torch.Tensor, "cpu", "d2h", host_copy=True)
        self._patch(torch.cuda, "synchronize", "synchronize")
        FakeEvent.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            FakeEvent.active = None
            for obj, attr, orig in reversed(self._patches):
                setattr(obj, attr, orig)
            self._patches.clear()
