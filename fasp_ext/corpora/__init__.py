"""The offline demo corpora, kept out of the pruning package's way: Jane Austen's six novels and
the Jargon File, from two Debian packages, and (online only) the GPTQ/SparseGPT/Wanda ``datasets``
corpora. :func:`fasp_ext.data.load_text` turns a text spec into text through these.

Offline corpora come from two Debian packages, downloaded with ``apt-get download`` into a
cache directory (env ``FASP_EXT_DATA_DIR``, default ``~/.cache/fasp_ext/data``) and unpacked
with ``dpkg-deb -x`` (or a pure-Python ``ar``+``tar`` fallback):

* ``r-cran-janeaustenr``: Jane Austen's six novels as R character vectors (one line per element)
  in the lazy-load database ``usr/lib/R/site-library/janeaustenr/data/Rdata.{rdx,rdb}``, read
  with :mod:`fasp_ext.corpora.rdata` (why not PyPI ``rdata``: docs/code-map.md, "The texts").
* ``jargon-text``: the Jargon File 4.4.7 as ``usr/share/doc/jargon-text/jargon.txt.gz``.

``scripts/fetch_texts.sh`` does the same download/unpack from the shell.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Optional

APT_TIMEOUT_S = 120

_AUSTEN_PKG = "r-cran-janeaustenr"
_AUSTEN_REL = "usr/lib/R/site-library/janeaustenr/data/Rdata"  # + .rdx / .rdb
_JARGON_PKG = "jargon-text"
_JARGON_REL = "usr/share/doc/jargon-text/jargon.txt.gz"

# Book names as stored in the R package (in the package's order), with their titles.
AUSTEN_BOOKS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_AUSTEN_ALIASES = {
    "senseandsensibility": "sensesensibility", "sense": "sensesensibility", "ss": "sensesensibility",
    "prideandprejudice": "prideprejudice", "pride": "prideprejudice", "pp": "prideprejudice",
    "mansfield": "mansfieldpark", "northanger": "northangerabbey",
}

# The Jargon File body starts at its first glossary entry, ":(TM): //" (line 6805 of
# jargon.txt in jargon-text 4.4.7-4.1), right after the "0" letter-section header (line 6785)
# and its list of entry names.  Everything before is front matter (table of contents of the
# whole lexicon, introduction, construction/style essays).  The body runs to the end of the
# file (glossary A-Z, then the appendices and bibliography).
JARGON_BODY_MARKER = "   :(TM): //"
_JARGON_BODY_FALLBACK_LINE = 6805  # 1-based, used only if the marker is not found


# --------------------------------------------------------------------------------------
# Obtaining the Debian packages
# --------------------------------------------------------------------------------------

def data_dir() -> Path:
    """The text cache directory (env ``FASP_EXT_DATA_DIR``, default ``~/.cache/fasp_ext/data``)."""
    env = os.environ.get("FASP_EXT_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fasp_ext" / "data"


def _fetch_hint(pkg: str, cache: Path) -> str:
    return (
        f"run `scripts/fetch_texts.sh`, or by hand: `cd {cache} && apt-get download {pkg} && "
        f"dpkg-deb -x {pkg}_*.deb {pkg}` (set FASP_EXT_DATA_DIR to use another cache dir; "
        f"`apt-get update` first if apt cannot find the package)"
    )


def _extract_deb_python(deb: Path, dest: Path) -> None:
    """Unpack a .deb's data.tar.* with the standard library (fallback when dpkg-deb is missing)."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise RuntimeError(f"{deb} is not a Debian package (ar archive)")
        while True:
            hdr = f.read(60)
            if len(hdr) < 60:
                break
            name = hdr[:16].decode("ascii", "replace").strip().rstrip("/")
            size = int(hdr[48:58].decode("ascii").strip())
            payload = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    raise RuntimeError(f"{deb}: zstd-compressed data.tar needs dpkg-deb")
                with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tf:
                    try:
                        tf.extractall(dest, filter="data")
                    except TypeError:  # Python without extraction filters
                        tf.extractall(dest)
                return
    raise RuntimeError(f"{deb}: no data.tar member found")


def fetch_package(pkg: str, marker: str) -> Path:
    """Root of the unpacked Debian package ``pkg`` in :func:`data_dir`; downloads/unpacks if needed.

    ``marker`` is a path relative to the package root that must exist once unpacked.
    """
    cache = data_dir()
    root = cache / pkg
    if (root / marker).exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{pkg}_*.deb"))
    if not debs:
        try:
            proc = subprocess.run(
                ["apt-get", "download", pkg], cwd=cache, capture_output=True, text=True,
                timeout=APT_TIMEOUT_S, stdin=subprocess.DEVNULL,
            )
            err = (proc.stderr or proc.stdout).strip()
            ok = proc.returncode == 0
        except FileNotFoundError:
            ok, err = False, "apt-get not found"
        except subprocess.TimeoutExpired:
            ok, err = False, f"apt-get download timed out after {APT_TIMEOUT_S}s"
        debs = sorted(cache.glob(f"{pkg}_*.deb"))
        if not ok or not debs:
            raise RuntimeError(
                f"could not obtain Debian package {pkg!r} ({err or 'no .deb produced'}); "
                + _fetch_hint(pkg, cache)
            )
    deb = debs[-1]
    tmp = Path(tempfile.mkdtemp(prefix=f".{pkg}.tmp-", dir=cache))
    try:
        try:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, capture_output=True,
                           timeout=APT_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            _extract_deb_python(deb, tmp)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"dpkg-deb -x {deb} failed: {e.stderr.decode(errors='replace').strip()}; "
                               + _fetch_hint(pkg, cache)) from None
        if not (tmp / marker).exists():
            raise RuntimeError(f"{deb} does not contain {marker}; " + _fetch_hint(pkg, cache))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / marker).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# --------------------------------------------------------------------------------------
# Jane Austen
# --------------------------------------------------------------------------------------

_austen_cache: Optional[Dict[str, str]] = None


def _austen_db_base() -> str:
    for prefix in ("usr/lib/R/site-library", "usr/local/lib/R/site-library", "usr/lib/R/library"):
        base = Path("/") / prefix / "janeaustenr/data/Rdata"
        if base.with_suffix(".rdx").is_file() and base.with_suffix(".rdb").is_file():
            return str(base)
    root = fetch_package(_AUSTEN_PKG, _AUSTEN_REL + ".rdb")
    return str(root / _AUSTEN_REL)


def austen_texts() -> Dict[str, str]:
    """All novels of the ``janeaustenr`` R package: book name -> full text (lines joined with "\\n").

    Names are the package's object names: sensesensibility, prideprejudice, mansfieldpark, emma,
    northangerabbey, persuasion.
    """
    global _austen_cache
    if _austen_cache is None:
        from .rdata import LazyLoadDB

        db = LazyLoadDB(_austen_db_base())
        out: Dict[str, str] = {}
        for name in db.names():
            v = db[name]
            if getattr(v, "rtype", None) != "STRSXP":
                continue
            out[name] = "\n".join("" if s is None else s for s in v)
        if not out:
            raise RuntimeError(f"no character vectors found in {db.base}")
        _austen_cache = out
    return dict(_austen_cache)


def _austen_key(name: str) -> str:
    key = re.sub(r"[^a-z]", "", name.lower())
    return _AUSTEN_ALIASES.get(key, key)


def austen_text(name: str) -> str:
    """Full text of one novel; ``name`` like ``emma``, ``prideprejudice`` (also ``pride_and_prejudice``)."""
    texts = austen_texts()
    key = _austen_key(name)
    if key not in texts:
        raise ValueError(f"unknown Austen book {name!r}; available: {', '.join(sorted(texts))}")
    return texts[key]


# --------------------------------------------------------------------------------------
# The Jargon File
# --------------------------------------------------------------------------------------

def _jargon_path() -> Path:
    sys_path = Path("/") / _JARGON_REL
    if sys_path.is_file():
        return sys_path
    return fetch_package(_JARGON_PKG, _JARGON_REL) / _JARGON_REL


def jargon_text(body_only: bool = True) -> str:
    """The Jargon File 4.4.7 (Debian ``jargon-text``) as UTF-8 text.

    With ``body_only`` (default) the front matter is dropped and the text starts at the first
    glossary entry ``:(TM): //`` (line 6805 of the file; see :data:`JARGON_BODY_MARKER`).
    """
    with gzip.open(_jargon_path(), "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not body_only:
        return text
    lines = text.split("\n")
    start = None
    for i, line in enumerate(lines):
        if line.rstrip() == JARGON_BODY_MARKER.rstrip():
            start = i
            break
    if start is None:
        start = min(_JARGON_BODY_FALLBACK_LINE - 1, max(len(lines) - 1, 0))
    return "\n".join(lines[start:])


# --------------------------------------------------------------------------------------
# load_text
# --------------------------------------------------------------------------------------

# name -> (hf dataset path, config, {"eval": (split, joiner, data_files), "calib": ...}, text field)
DATASET_SPECS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1",
                  {"eval": ("test", "\n\n", None), "calib": ("train", " ", None)}, "text"),
    "c4": ("allenai/c4", None,
           {"eval": ("validation", " ", {"validation": "en/c4-validation.00000-of-00008.json.gz"}),
            "calib": ("train", " ", {"train": "en/c4-train.00000-of-01024.json.gz"})}, "text"),
    "ptb": ("ptb_text_only", "penn_treebank",
            {"eval": ("test", " ", None), "calib": ("train", " ", None)}, "sentence"),
}
_DATASET_ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wikitext2-raw": "wikitext2",
                    "penn_treebank": "ptb", "c4-en": "c4"}
_C4_EVAL_DOCS = 1100  # Wanda/SparseGPT c4 evaluation: first 1100 validation documents
_HUB_PROBE_TIMEOUT_S = 3.0


def _hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """TCP probe of the hub, bounded by ``timeout`` even when DNS resolution itself hangs."""
    import threading

    result = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout)
    return bool(result and result[0])


def _load_hf_dataset(name: str, split: str) -> str:
    offline_hint = (f"dataset {name!r} needs the Hugging Face hub, which is not reachable here; "
                    f"pass a local .txt file or directory instead (e.g. --text path/to/{name}.txt), "
                    f"or an offline corpus: austen:<book>, jargon")
    path, config, splits, field = DATASET_SPECS[name]
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")
    hf_split, joiner, data_files = splits[split]
    import importlib.util
    import sys

    if "datasets" not in sys.modules and importlib.util.find_spec("datasets") is None:
        raise ImportError(
            f"dataset {name!r} needs the `datasets` package, which is not installed "
            f"(pip install datasets); or pass a local .txt path / austen:<book> / jargon"
        )
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
           for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        offline = True
    else:
        offline = not _hub_reachable()
    if offline:
        # Only a dataset already in the local cache can work; never touch the network.  The env
        # vars must be set before `datasets` is first imported; patch its config if it already was.
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
        if "datasets" in sys.modules:
            cfg = getattr(sys.modules["datasets"], "config", None)
            for attr in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
                if cfg is not None and hasattr(cfg, attr):
                    setattr(cfg, attr, True)
    try:
        from datasets import load_dataset

        kwargs = {"split": hf_split}
        if data_files is not None:
            kwargs["data_files"] = data_files
        ds = load_dataset(path, config, **kwargs) if config else load_dataset(path, **kwargs)
    except Exception as e:  # connection errors, missing cache, ...
        if offline:
            raise ConnectionError(f"{offline_hint} ({type(e).__name__}: {str(e)[:300]})") from None
        raise RuntimeError(f"could not load dataset {name!r} ({path}, {hf_split}): {type(e).__name__}: "
                           f"{str(e)[:300]}; a local .txt path works too") from None
    texts = ds[field]
    if name == "c4" and split == "eval":
        texts = texts[:_C4_EVAL_DOCS]
    return joiner.join(texts)
