"""Never lose a user's files, never fail late: output-folder rules, early checks, signals.

Everything that writes a result goes through :class:`OutputFolder`: the result is written to a
hidden temporary sibling of ``out`` (its name carries the writer's pid), and published with
renames only, so an interrupted run never leaves a half-written ``out`` and never removes a
previous result before the new one is in place:

1. ``out`` exists: it is renamed aside to ``.<name>.fasp-old-<pid>-<rand>``;
2. the temporary folder is renamed to ``out`` (on failure the old folder is renamed back);
3. only then is the old folder deleted.

A run killed between those steps (SIGKILL, power loss) leaves hidden folders that name its pid;
the next run that writes next to them (:func:`sweep_stale`) removes the temporary ones and puts
an old result whose replacement never arrived back in place.

``--overwrite`` may only replace an empty folder or a previous fasp_ext output (a folder holding
the marker file :data:`MARKER` and nothing that the marker does not list), and never the empty
path, the current folder or any folder above it, the home or root folder, or a folder holding
the input model or the calibration/evaluation files (:func:`check_out`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import struct
import threading
from pathlib import Path

log = logging.getLogger("fasp_ext")

#: marker file written into every output folder: says it is fasp_ext's and which files it wrote
MARKER = ".fasp_ext_output.json"
_TMP = ".fasp-tmp-"
_OLD = ".fasp-old-"
# files a save_pretrained folder of earlier fasp_ext versions (no marker) may hold
_LEGACY_FILES = re.compile(
    r"^(config\.json|generation_config\.json|fasp_report\.json|README\.md|model(-\d+-of-\d+)?\.safetensors|"
    r"model\.safetensors\.index\.json|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|"
    r"added_tokens\.json|vocab\.json|merges\.txt|chat_template\.(jinja|json))$")


class UserError(ValueError):
    """A mistake in what the user asked for; the command line prints it on one line and exits 2."""


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (the counterpart of KeyboardInterrupt for SIGINT)."""


# ----------------------------------------------------------------------------- signals
_received: list[int] = []


def _on_signal(signum, frame):  # noqa: ARG001
    _received.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def signal_received() -> int | None:
    """The first SIGINT/SIGTERM seen inside :func:`handle_signals`, even if its exception was
    swallowed (Python drops exceptions raised in destructors); None when none came."""
    return _received[0] if _received else None


def check_not_interrupted() -> None:
    """Raise again for a signal whose exception was swallowed, so nothing is published after it."""
    sig = signal_received()
    if sig == signal.SIGINT:
        raise KeyboardInterrupt
    if sig is not None:
        raise Terminated(sig)


@contextlib.contextmanager
def handle_signals():
    """SIGINT raises KeyboardInterrupt and SIGTERM raises :class:`Terminated` inside the block, and
    both are remembered (:func:`signal_received`). Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- output folders
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_fasp_output(path: Path) -> tuple[bool, str]:
    """Whether ``path`` is a folder fasp_ext wrote (and holds nothing else); the reason if not."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False, "it is not a folder"
    entries = sorted(p.name for p in path.iterdir())
    marker = path / MARKER
    if marker.is_file():
        try:
            listed = set(json.loads(marker.read_text())["files"]) | {MARKER}
        except (ValueError, KeyError, TypeError, OSError):
            return False, f"its {MARKER} is not readable"
        extra = [e for e in entries if e not in listed]
    elif (path / "fasp_report.json").is_file() and (path / "config.json").is_file():
        extra = [e for e in entries if not _LEGACY_FILES.match(e)]  # an output of an earlier version
    else:
        return False, "it is not a fasp_ext output (no fasp_report.json / marker)"
    extra += [e for e in entries if (path / e).is_dir() or (path / e).is_symlink()]
    if extra:
        return False, f"it holds files fasp_ext did not write: {', '.join(sorted(set(extra))[:5])}"
    return True, ""


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def resolve_out(out, arg: str = "--out") -> Path:
    """The absolute output path; refuses the empty path and symbolic links."""
    if out is None or not str(out).strip():
        raise UserError(f"{arg}: empty path (an unset shell variable?); name the output folder")
    raw = Path(str(out)).expanduser()
    if raw.is_symlink():
        raise UserError(f"{arg}: {raw} is a symbolic link; name the real folder")
    return Path(os.path.abspath(raw))


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_out(out, overwrite: bool, protected=(), arg: str = "--out") -> Path:
    """Validate an output folder before any work; return its absolute path.

    ``protected``: paths that must survive (the input model folder, the calibration files): ``out``
    may not be one of them or hold one of them.
    """
    p = resolve_out(out, arg)
    cwd = Path.cwd().resolve()
    forbidden = {Path("/"): "the root folder", Path.home().resolve(): "your home folder"}
    for f, what in forbidden.items():
        if p.resolve() == f:
            raise UserError(f"{arg}: {p} is {what}; name a new folder for the pruned model")
    if _is_within(cwd, p):
        raise UserError(f"{arg}: {p} is the current folder or a folder above it; name a new folder")
    for q in protected:
        if q is None:
            continue
        q = Path(q).expanduser()
        if q.exists() and _is_within(q, p):
            raise UserError(f"{arg}: {p} holds the input {q} (the model or a text); name another folder")
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise UserError(f"{arg}: {p} exists and is not a folder")
        if not overwrite:
            raise FileExistsError(f"{arg}: {p} already exists (use --overwrite to replace a previous fasp_ext output)")
        if any(p.iterdir()):
            ok, why = is_fasp_output(p)
            if not ok:
                raise UserError(f"{arg}: refusing to replace {p}: {why}")
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise UserError(f"{arg}: {base} is not a folder")
    try:
        probe = base / f".fasp-probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise UserError(f"{arg}: cannot write in {base} ({e.strerror or e})") from None
    return p


def check_free_space(out: Path, need_min: int, need_max: int | None = None, arg: str = "--out") -> None:
    """Refuse when the free space where ``out`` goes is below ``need_min`` bytes (the result cannot
    fit); warn when it is below ``need_max`` (it may not)."""
    base = _nearest_existing(Path(out).parent)
    free = shutil.disk_usage(base).free
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    if free < need_min:
        raise UserError(f"{arg}: {base} has {gb(free)} free, the pruned model needs at least {gb(need_min)}")
    if need_max is not None and free < need_max:
        log.warning("%s: %s has %s free; the pruned model may need up to %s", arg, base, gb(free), gb(need_max))


def sweep_stale(out: Path) -> list[str]:
    """Clean up after runs that were killed while writing ``out``: remove their temporary folders
    and put back a previous result that was moved aside but never replaced. Returns what was done."""
    out = Path(out)
    parent, done = out.parent, []
    if not parent.is_dir():
        return done
    pat = re.compile(re.escape(f".{out.name}") + r"\.(fasp-tmp|fasp-old)-(\d+)-[0-9a-f]+$")
    for q in sorted(parent.iterdir()):
        m = pat.match(q.name)
        if not m or not q.is_dir() or q.is_symlink():
            continue
        kind, pid = m.group(1), int(m.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if kind == "fasp-old" and not out.exists():
            os.rename(q, out)
            done.append(f"restored {out} from {q.name}, left by a killed run (pid {pid})")
        else:
            shutil.rmtree(q, ignore_errors=True)
            done.append(f"removed {q.name}, left by a killed run (pid {pid})")
    for d in done:
        log.warning("%s", d)
    return done


class OutputFolder:
    """Write a result into a temporary sibling of ``out``, then publish it (see the module doc).

    >>> with OutputFolder(out, overwrite=True) as tmp:   # doctest: +SKIP
    ...     write_files(tmp)
    ...     folder.publish()
    Leaving the block without ``publish`` (an error, a signal) removes the temporary folder.
    """

    def __init__(self, out, overwrite: bool = False, protected=(), arg: str = "out"):
        self.out = check_out(out, overwrite, protected, arg=arg)
        self.overwrite, self.protected, self.arg = overwrite, tuple(protected), arg
        self.tmp: Path | None = None
        self.published = False

    def _sibling(self, tag: str) -> Path:
        return self.out.parent / f".{self.out.name}{tag}{os.getpid()}-{secrets.token_hex(4)}"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(self.out)
        self.tmp = self._sibling(_TMP)
        self.tmp.mkdir(mode=0o777 & ~_umask())
        return self.tmp

    def publish(self) -> Path:
        assert self.tmp is not None, "publish() outside the with block"
        check_not_interrupted()
        files = sorted(p.name for p in self.tmp.iterdir())
        (self.tmp / MARKER).write_text(json.dumps({"tool": "fasp_ext", "files": files}, indent=1) + "\n")
        mask = _umask()
        for p in self.tmp.iterdir():
            if p.is_file():
                os.chmod(p, 0o666 & ~mask)
        check_out(self.out, self.overwrite, self.protected, arg=self.arg)  # nothing changed while we ran
        check_not_interrupted()
        old = None
        if self.out.exists():
            old = self._sibling(_OLD)
            os.rename(self.out, old)
        try:
            os.rename(self.tmp, self.out)
        except BaseException:
            if old is not None:
                os.rename(old, self.out)
            raise
        self.published = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def __exit__(self, *exc) -> None:
        if not self.published and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- model folders
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_header(path: Path, arg: str = "--model") -> dict:
    """The tensor table of a safetensors file (name -> {dtype, shape, data_offsets}), checked against
    the file size so a truncated or corrupt file is found before anything is loaded."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{arg}: {path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise UserError(f"{arg}: {path} is corrupt (header length {n} does not fit the file)")
            table = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{arg}: {path} is corrupt (unreadable safetensors header)") from None
    except OSError as e:
        raise UserError(f"{arg}: cannot read {path} ({e.strerror or e})") from None
    if not isinstance(table, dict):
        raise UserError(f"{arg}: {path} is corrupt (safetensors header is not a table)")
    table.pop("__metadata__", None)
    end = 0
    for name, t in table.items():
        try:
            a, b = (int(x) for x in t["data_offsets"])
            shape = [int(s) for s in t["shape"]]
            nbytes = _ST_DTYPE_BYTES[t["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{arg}: {path} is corrupt or uses an unsupported dtype (tensor {name!r})") from None
        numel = 1
        for s in shape:
            numel *= s
        if a < 0 or b - a != numel * nbytes:
            raise UserError(f"{arg}: {path} is corrupt (tensor {name!r} has the wrong byte size)")
        end = max(end, b)
    if 8 + n + end != size:
        raise UserError(f"{arg}: {path} is truncated or corrupt ({size} bytes, the header describes {8 + n + end})")
    return table


def weight_files(folder: Path, arg: str = "--model") -> list[Path]:
    """The safetensors files a checkpoint folder declares: ``model.safetensors``, or the shards its
    ``model.safetensors.index.json`` names. Pickle checkpoints (``*.bin``) are refused."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(wmap.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{arg}: {index} is not a valid safetensors index") from None
        files = []
        for s in shards:
            if not isinstance(s, str) or Path(s).name != s or not s.endswith(".safetensors"):
                raise UserError(f"{arg}: {index} names an invalid shard {s!r}")
            if not (folder / s).is_file():
                raise UserError(f"{arg}: shard {s} named by {index.name} is missing from {folder}")
            files.append(folder / s)
        return files
    if single.is_file():
        return [single]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise UserError(f"{arg}: {folder} holds only pickle weights (*.bin); fasp_ext reads safetensors only "
                        f"(convert with save_pretrained(..., safe_serialization=True))")
    raise UserError(f"{arg}: no model.safetensors (or safetensors index) in {folder}")


def read_config(folder: Path, arg: str = "--model") -> dict:
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        raise UserError(f"{arg}: no config.json in {folder} (expected a save_pretrained folder)")
    try:
        data = json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{arg}: {cfg} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{arg}: {cfg} is not a JSON object")
    return data


def check_model_folder(folder, arg: str = "--model") -> tuple[dict, int]:
    """Check a local checkpoint folder without loading a weight: config present and of a supported
    family, weights present, every safetensors header readable. Returns (config dict, parameter
    count)."""
    from .adapters import supported_model_types

    folder = Path(folder)
    cfg = read_config(folder, arg)
    mt = cfg.get("model_type")
    if mt not in supported_model_types():
        raise UserError(f"{arg}: unsupported architecture {mt!r} in {folder / 'config.json'}; fasp_ext supports "
                        f"{', '.join(supported_model_types())}")
    params, seen = 0, {}
    for f in weight_files(folder, arg):
        for name, t in safetensors_header(f, arg).items():
            if name in seen:
                raise UserError(f"{arg}: tensor {name!r} is in both {seen[name]} and {f.name}")
            seen[name] = f.name
            n = 1
            for s in t["shape"]:
                n *= int(s)
            params += n
    return cfg, params


#: the dtypes a model is pruned in, by the names configs and safetensors headers give them
_DTYPE_NAMES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "half": "float16", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32",
                "float64": "float32"}


def checkpoint_dtype(folder, arg: str = "--model") -> str:
    """The dtype a checkpoint folder keeps its weights in, as transformers' ``dtype="auto"`` reads
    it: the config's ``dtype`` (or ``torch_dtype``; a multimodal model's ``text_config`` first), else
    the most common floating dtype in the safetensors headers. float64 is pruned in float32.
    Returns ``"float32"``, ``"bfloat16"`` or ``"float16"``."""
    folder = Path(folder)
    cfg = read_config(folder, arg)
    for c in (cfg.get("text_config"), cfg):
        if isinstance(c, dict):
            for key in ("dtype", "torch_dtype"):
                v = c.get(key)
                if isinstance(v, str) and v.replace("torch.", "") in _DTYPE_NAMES:
                    return _DTYPE_NAMES[v.replace("torch.", "")]
    counts: dict[str, int] = {}
    for f in weight_files(folder, arg):
        for t in safetensors_header(f, arg).values():
            name = _DTYPE_NAMES.get(t.get("dtype"))
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
    return max(counts, key=counts.get) if counts else "float32"


def check_device(device: str | None, arg: str = "--device") -> str:
    """The compute device, checked before anything is loaded."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"{arg}: {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{arg} {device}: CUDA is not available (this torch "
                            f"{'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'})")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UserError(f"{arg} {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif d.type != "cpu":
        raise UserError(f"{arg}: {device!r} is not supported (use cpu or cuda)")
    return str(d)
