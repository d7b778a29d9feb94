"""Loads the compiled op library if it was built; the package works without it."""

from __future__ import annotations

import json

import torch

_LOADED = False
_ERROR: str | None = None
_DEVICES: set[str] = set()  # devices with a compiled kernel for every op
_KERNELS: set[tuple[str, str]] = set()  # (op, device) pairs with a compiled kernel
OPS = ("accumulate_stats", "score_select", "restore")

try:  # the extension registers torch.ops.fasp_ext.* when imported
    from . import _C  # noqa: F401

    _LOADED = True
except Exception as e:  # pragma: no cover - depends on the build
    _ERROR = f"{type(e).__name__}: {e}"

if _LOADED:
    try:  # fake kernels for torch.compile; a failure here must not hide the compiled ops
        from . import _fake

        _fake.register("fasp_ext")
    except Exception as e:  # pragma: no cover
        _ERROR = f"fake kernels not registered: {type(e).__name__}: {e}"
    for _dev in ("cpu", "cuda"):
        for _op in OPS:
            try:
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"fasp_ext::{_op}", _dev.upper()):
                    _KERNELS.add((_op, _dev))
            except Exception:  # pragma: no cover
                pass
        if all((_op, _dev) in _KERNELS for _op in OPS):
            _DEVICES.add(_dev)


def compiled_ops_for(device: torch.device, op: str | None = None):
    """torch.ops.fasp_ext when a compiled kernel exists for ``device`` (for ``op``, or for every
    op when ``op`` is None), else None."""
    if not _LOADED:
        return None
    if op is None:
        ok = device.type in _DEVICES
    else:
        ok = (op, device.type) in _KERNELS
    return torch.ops.fasp_ext if ok else None


def compiled_kernels() -> dict[str, list[str]]:
    """{device: [ops with a compiled kernel]}."""
    out: dict[str, list[str]] = {}
    for op, dev in sorted(_KERNELS):
        out.setdefault(dev, []).append(op)
    return out


def load_error() -> str | None:
    return _ERROR


def compiled_devices() -> list[str]:
    return sorted(_DEVICES)


def _compiled_record() -> dict:
    """The build record compiled into the library (csrc/build_info.cpp), or {}."""
    if not _LOADED:
        return {}
    try:
        return json.loads(torch.ops.fasp_ext.build_info())
    except Exception:  # pragma: no cover - a library built before the record existed
        return {}


def build_info() -> dict:
    """What was compiled: whether the library loaded, for which devices, and with what.

    Keys: compiled (bool), devices (devices with compiled kernels), torch (running version), and
    from the build record: torch_built_against, cuda_compiled, cuda_version, cuda_archs,
    build_system, sources; load_error when the library is absent or failed to load.
    """
    info = {
        "compiled": _LOADED,
        "devices": compiled_devices(),
        "kernels": compiled_kernels(),
        "torch": torch.__version__,
    }
    rec = _compiled_record()
    info.update({k: v for k, v in rec.items() if k not in info})
    info.setdefault("cuda_compiled", False)
    if _ERROR:
        info["load_error"] = _ERROR
    return info
