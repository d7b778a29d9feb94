"""Calibration activations kept in files instead of memory (``PruneConfig.activations="disk"``).

The pipeline keeps every calibration window's hidden states: the inputs of the block being pruned,
its outputs, and (within ``store_budget_bytes``) the output projections' inputs that save a pass.
At a checkpoint's default calibration (128 x 2048 tokens) that is 2 x 262,144 x hidden x 2-4 bytes,
1-4 GiB for a 1-3B model: more than block-by-block loading needs for the model itself. With
``activations="disk"`` each of those per-batch lists is a :class:`DiskBatches`: ``append`` writes a
batch at the end of the list's own file, indexing and iteration read one batch into a fresh tensor.
The files are read and written with plain file I/O (no memory map), so the kernel's page cache holds
the data, reclaimable and outside this process's resident memory, and the process holds one batch
at a time. ``x[:] = other`` takes over ``other``'s file; a file is removed when no list uses it any
more, the folder when the run ends (``SpillFolder.close``).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

import torch

#: below this many bytes of activations, ``activations="auto"`` keeps them in memory (files would only
#: add system calls)
AUTO_MIN_BYTES = 64 << 20


class _File:
    """A file of the spill folder, removed when the last list holding it lets it go."""

    def __init__(self, path: Path):
        self.path = path

    def __del__(self):
        try:
            os.unlink(self.path)
        except OSError:
            pass


class SpillFolder:
    """A folder of this run's activation files (created here; removed whole by ``close``)."""

    def __init__(self, parent: str | os.PathLike | None = None):
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=".fasp-activations-", dir=parent))
        self._ids = itertools.count()
        #: bytes written over the run (each batch once per list it went into)
        self.written = 0

    def batches(self) -> "DiskBatches":
        return DiskBatches(self)

    def new_file(self) -> _File:
        path = self.path / f"{next(self._ids):06d}.bin"
        path.touch()
        return _File(path)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _bytes(t: torch.Tensor):
    return t.reshape(-1).view(torch.uint8).numpy()


class DiskBatches:
    """A list of tensors (one per calibration batch) whose contents live in a file of ``folder``.

    Supports what the pipeline does with its per-batch lists: ``append``, ``len``, ``x[i]``, iteration
    (one batch read at a time), ``x[:] = other`` and ``empty()`` (a new list in the same folder). A
    tensor read back is a fresh CPU tensor: changing it does not change the list.
    """

    def __init__(self, folder: SpillFolder):
        self.folder = folder
        self._file = folder.new_file()
        self._meta: list[tuple[int, tuple, torch.dtype]] = []  # offset, shape, dtype of each batch
        self._end = 0

    device = torch.device("cpu")

    def empty(self) -> "DiskBatches":
        return DiskBatches(self.folder)

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        t = (t.cpu() if t.device.type != "cpu" else t).contiguous()
        n = t.numel() * t.element_size()
        with open(self._file.path, "r+b") as f:
            f.seek(self._end)
            if n:
                f.write(memoryview(_bytes(t)))
        self._meta.append((self._end, tuple(t.shape), t.dtype))
        self._end += n
        self.folder.written += n

    def __len__(self) -> int:
        return len(self._meta)

    def shape(self, i: int) -> torch.Size:
        """Batch ``i``'s shape, without reading it."""
        return torch.Size(self._meta[i][1])

    def _read(self, f, i: int) -> torch.Tensor:
        offset, shape, dtype = self._meta[i]
        x = torch.empty(shape, dtype=dtype)
        n = x.numel() * x.element_size()
        if n:
            f.seek(offset)
            if f.readinto(_bytes(x)) != n:
                raise OSError(f"fasp_ext: activation file {self._file.path} ended early (was it removed?)")
        return x

    def __getitem__(self, i):
        if isinstance(i, slice):
            raise TypeError("DiskBatches takes one index at a time")
        if i < 0:
            i += len(self._meta)
        if not 0 <= i < len(self._meta):
            raise IndexError(i)
        with open(self._file.path, "rb") as f:
            return self._read(f, i)

    def __iter__(self):
        if not self._meta:
            return
        with open(self._file.path, "rb") as f:
            for i in range(len(self._meta)):
                yield self._read(f, i)

    def __setitem__(self, key, other) -> None:
        if key != slice(None):
            raise TypeError("DiskBatches supports x[:] = batches only")
        if isinstance(other, DiskBatches) and other.folder is self.folder:
            # take over the other list's file (it keeps it too: both lists then read the same batches)
            self._file, self._meta, self._end = other._file, list(other._meta), other._end
            return
        self._file, self._meta, self._end = self.folder.new_file(), [], 0
        for t in other:
            self.append(t)

    @property
    def nbytes(self) -> int:
        return self._end


def empty_like(batches) -> list | DiskBatches:
    """A new, empty per-batch list of the same kind as ``batches`` (in memory, or in the same folder)."""
    return batches.empty() if isinstance(batches, DiskBatches) else []


def batch_shape(batches, i: int = 0) -> torch.Size:
    """Batch ``i``'s shape (read from the list's index where the batches are on disk)."""
    return batches.shape(i) if isinstance(batches, DiskBatches) else batches[i].shape


def batches_device(batches) -> torch.device:
    """Where a list's batches are kept (host memory for a list on disk)."""
    return batches.device if isinstance(batches, DiskBatches) else batches[0].device


def copy_of(batches) -> list | DiskBatches:
    """An independent copy of a per-batch list (a new file for one on disk)."""
    if isinstance(batches, DiskBatches):
        out = batches.empty()
        for t in batches:
            out.append(t)
        return out
    return [h.clone() for h in batches]


def check_space(folder: SpillFolder, need: int, arg: str = "activations_dir") -> None:
    """Refuse to start when the spill folder's file system has less than ``need`` bytes (+ 5 %) free."""
    free = shutil.disk_usage(folder.path).free
    if need * 1.05 > free:
        raise ValueError(f"{arg}: {folder.path.parent} has {free / 2**30:.2f} GiB free, the calibration "
                         f"activations need about {need / 2**30:.2f} GiB on disk (fewer nsamples or seqlen, "
                         f"another {arg}, or activations in memory)")
