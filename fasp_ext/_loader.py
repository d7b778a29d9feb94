"""Loads the compiled op library if it was built; the package works without it."""

from __future__ import annotations

import torch

_LOADED = False
_ERROR: str | None = None
_DEVICES: set[str] = set()

try:  # the extension registers torch.ops.fasp_ext.* when imported
    from . import _C  # noqa: F401

    _LOADED = True
except Exception as e:  # pragma: no cover - depends on the build
    _ERROR = f"{type(e).__name__}: {e}"

if _LOADED:
    for _dev in ("cpu", "cuda"):
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key("fasp_ext::restore", _dev.upper()):
                _DEVICES.add(_dev)
        except Exception:  # pragma: no cover
            pass


def compiled_ops_for(device: torch.device):
    """torch.ops.fasp_ext when a compiled kernel exists for ``device``, else None."""
    if _LOADED and device.type in _DEVICES:
        return torch.ops.fasp_ext
    return None


def load_error() -> str | None:
    return _ERROR


def compiled_devices() -> list[str]:
    return sorted(_DEVICES)


def build_info() -> dict:
    """What was compiled: whether the library loaded, for which devices, and with what."""
    info = {"compiled": _LOADED, "devices": compiled_devices(), "torch": torch.__version__}
    if _ERROR:
        info["load_error"] = _ERROR
    return info
