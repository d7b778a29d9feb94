"""Offline text data: Jane Austen, the Jargon File, local .txt files, and (online only) the
GPTQ/SparseGPT/Wanda ``datasets`` corpora; calibration/evaluation windows and perplexity.

Offline corpora come from two Debian packages, downloaded with ``apt-get download`` into a
cache directory (env ``FASP_EXT_DATA_DIR``, default ``~/.cache/fasp_ext/data``) and unpacked
with ``dpkg-deb -x`` (or a pure-Python ``ar``+``tar`` fallback):

* ``r-cran-janeaustenr``: Jane Austen's six novels as R character vectors (one line per element)
  in the lazy-load database ``usr/lib/R/site-library/janeaustenr/data/Rdata.{rdx,rdb}``, read
  with :mod:`fasp_ext.rdata`.
* ``jargon-text``: the Jargon File 4.4.7 as ``usr/share/doc/jargon-text/jargon.txt.gz``.

``scripts/fetch_texts.sh`` does the same download/unpack from the shell.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import random
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch

__all__ = [
    "data_dir",
    "fetch_package",
    "AUSTEN_BOOKS",
    "austen_texts",
    "austen_text",
    "jargon_text",
    "JARGON_BODY_MARKER",
    "DATASET_SPECS",
    "load_text",
    "tokenize_text",
    "calibration_windows",
    "window_starts",
    "calibration_coverage",
    "undecodable_fraction",
    "eval_windows",
    "perplexity",
]

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


def _read_path(p: Path) -> str:
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() == ".txt")
        if not files:
            raise FileNotFoundError(f"text directory {str(p)!r} contains no .txt files")
        return "\n\n".join(q.read_text(encoding="utf-8", errors="replace") for q in files)
    return p.read_text(encoding="utf-8", errors="replace")


def load_text(spec: str, split: str = "eval") -> str:
    """Text for ``spec``:

    * a path to a ``.txt`` file, or a directory of ``.txt`` files (sorted, joined with "\\n\\n");
    * a comma-separated list of any of these specs (joined with "\\n\\n");
    * ``austen:<book>`` (``austen:emma``, ``austen:prideprejudice``...; ``austen`` or ``austen:all``
      joins all six novels in the package's order);
    * ``jargon`` (Jargon File body, :func:`jargon_text`), ``jargon:full`` (whole file);
    * ``wikitext2`` / ``c4`` / ``ptb`` via ``datasets`` with the GPTQ/SparseGPT/Wanda conventions
      (``split="eval"``: wikitext2 test joined by "\\n\\n", ptb test, c4 validation shard 0 first
      1100 docs; ``split="calib"``: the train splits).  ``wikitext2:train`` etc. are also accepted.
      These need the network: offline they fail fast with a ``ConnectionError``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"text spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    p = Path(spec).expanduser()
    if p.exists():
        return _read_path(p)
    if "," in spec:
        parts = [s.strip() for s in spec.split(",") if s.strip()]
        if not parts:
            raise ValueError(f"text spec {spec!r} lists nothing")
        return "\n\n".join(load_text(s, split=split) for s in parts)
    low = spec.lower()
    if low == "austen" or low.startswith("austen:"):
        book = spec.split(":", 1)[1].strip() if ":" in spec else "all"
        if book.lower() in ("", "all", "*"):
            texts = austen_texts()
            return "\n\n".join(texts[k] for k in AUSTEN_BOOKS if k in texts)
        return austen_text(book)
    if low in ("jargon", "jargon:body"):
        return jargon_text(body_only=True)
    if low in ("jargon:full", "jargon:all"):
        return jargon_text(body_only=False)
    name, _, sub = low.partition(":")
    name = _DATASET_ALIASES.get(name, name)
    if name in DATASET_SPECS:
        if sub:
            sub = {"test": "eval", "validation": "eval", "train": "calib"}.get(sub, sub)
        return _load_hf_dataset(name, sub or split)
    if "/" in spec or os.sep in spec or low.endswith(".txt") or spec.startswith((".", "~")):
        raise FileNotFoundError(f"text path {spec!r} does not exist")
    raise ValueError(
        f"unknown text spec {spec!r}: expected a .txt path, a directory of .txt files, a comma-separated "
        f"list, austen:<book> ({', '.join(AUSTEN_BOOKS)}), jargon, or one of {', '.join(DATASET_SPECS)}"
    )


# --------------------------------------------------------------------------------------
# Tokenising and windows
# --------------------------------------------------------------------------------------

def tokenize_text(tokenizer, text: str, add_special_tokens: bool = True) -> torch.Tensor:
    """Token ids (1-D LongTensor) of a possibly very long text, in one pass.

    Fast tokenizers are driven through their Rust backend (no max-length warning, a novel takes
    about a second); others fall back to ``tokenizer(text)`` with the length check silenced.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode"):
        ids = backend.encode(text, add_special_tokens=add_special_tokens).ids
    else:
        import logging

        log = logging.getLogger("transformers.tokenization_utils_base")
        old = log.level
        log.setLevel(logging.ERROR)
        try:
            ids = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
        finally:
            log.setLevel(old)
    return torch.tensor(ids, dtype=torch.long)


def _token_stream(tokenizer, text) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        return text.reshape(-1).long()
    if not isinstance(text, str):
        raise TypeError(f"text must be a str (or a 1-D tensor of token ids), got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty")
    return tokenize_text(tokenizer, text)


BOS_MODES = ("auto", "always", "never")


def bos_token(tokenizer, bos: str = "auto") -> Optional[int]:
    """The token every window starts with, or None: ``auto`` gives the BOS id when the tokenizer
    adds one when encoding (Gemma, LLaMA 2/3, OPT's ``</s>``; not SmolLM2 or Qwen),
    ``always`` the tokenizer's BOS whatever it does, ``never`` none (windows are plain slices of the
    token stream, the GPTQ / SparseGPT / Wanda convention)."""
    if bos not in BOS_MODES:
        raise ValueError(f"bos must be one of {', '.join(BOS_MODES)}, got {bos!r}")
    if bos == "never" or tokenizer is None:
        return None
    bid = getattr(tokenizer, "bos_token_id", None)
    if bos == "always":
        if bid is None:
            raise ValueError("bos='always' but the tokenizer has no BOS token")
        return int(bid)
    if bid is None:
        return None
    with_special = tokenize_text(tokenizer, "a", add_special_tokens=True)
    plain = tokenize_text(tokenizer, "a", add_special_tokens=False)
    adds = with_special.numel() > plain.numel() and int(with_special[0]) == int(bid)
    return int(bid) if adds else None


def _window_stream(tokenizer, text, bos: str) -> tuple[torch.Tensor, Optional[int]]:
    """(token stream, BOS id or None); with a BOS the stream is tokenized without special tokens."""
    bid = bos_token(tokenizer, bos)
    if bid is None or isinstance(text, torch.Tensor):
        return _token_stream(tokenizer, text), bid
    if not isinstance(text, str):
        raise TypeError(f"text must be a str (or a 1-D tensor of token ids), got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty")
    return tokenize_text(tokenizer, text, add_special_tokens=False), bid


def calibration_windows(tokenizer, text, nsamples: int, seqlen: int, seed: int = 0,
                        bos: str = "auto", info: Optional[dict] = None) -> torch.Tensor:
    """GPTQ-style calibration set: ``nsamples`` random windows of ``seqlen`` tokens, ``(nsamples, seqlen)``.

    The text is tokenized once; window ``i`` starts at ``random.Random(seed).randint(0, n - L - 1)``
    (the i-th draw) -- the same draws as GPTQ's ``random.seed(seed); random.randint(...)`` -- with
    L = seqlen text tokens, or, when windows start with BOS (``bos``, see ``bos_token``), BOS then
    L = seqlen - 1 text tokens: each window is then what the model sees at the start of a document.
    A dict passed as ``info`` receives :func:`calibration_coverage` of the draws.
    """
    if int(nsamples) < 1:
        raise ValueError(f"nsamples must be >= 1, got {nsamples}")
    if int(seqlen) < 1:
        raise ValueError(f"seqlen must be >= 1, got {seqlen}")
    ids, bid = _window_stream(tokenizer, text, bos)
    if bid is not None and seqlen < 2:
        raise ValueError("seqlen must be >= 2 when windows start with BOS")
    L = seqlen - (bid is not None)
    n = ids.numel()
    if n < L + 1:
        need = "seqlen" if bid is not None else "seqlen+1"  # BOS takes one position of the window
        raise ValueError(f"text has {n} tokens, need at least {need} = {L + 1} for calibration windows")
    out = torch.empty((nsamples, seqlen), dtype=torch.long)
    for i, start in enumerate(window_starts(n, nsamples, L, seed)):
        out[i, seqlen - L:] = ids[start:start + L]
    if bid is not None:
        out[:, 0] = bid
    if info is not None:
        info.update(calibration_coverage(n, nsamples, L, seed))
    return out


def window_starts(n_tokens: int, nsamples: int, length: int, seed: int = 0) -> list[int]:
    """Start positions of ``length``-token calibration windows over a text of ``n_tokens`` tokens
    (the GPTQ draws)."""
    rng = random.Random(seed)
    return [rng.randint(0, n_tokens - length - 1) for _ in range(nsamples)]


def calibration_coverage(n_tokens: int, nsamples: int, length: int, seed: int = 0) -> dict:
    """How much of the text the calibration windows see: distinct token positions covered, and
    their share of the ``nsamples * length`` text tokens requested (1.0: no window overlaps another)."""
    covered = torch.zeros(n_tokens, dtype=torch.bool)
    for s in window_starts(n_tokens, nsamples, length, seed):
        covered[s:s + length] = True
    unique = int(covered.sum())
    return {"text_tokens": int(n_tokens), "requested_tokens": int(nsamples * length), "unique_positions": unique,
            "coverage": unique / float(nsamples * length)}


_UNDECODABLE = re.compile("[\ufffd\x00-\x08\x0e-\x1f]")


def undecodable_fraction(text: str) -> float:
    """Share of characters that are replacement characters (bytes that were not UTF-8) or control
    characters other than whitespace: near 0 for prose, above one half for a binary file."""
    if not text:
        return 0.0
    return len(_UNDECODABLE.findall(text)) / len(text)


def eval_windows(tokenizer, text, seqlen: int, max_windows: Optional[int] = None,
                 bos: str = "auto") -> torch.Tensor:
    """Non-overlapping ``seqlen``-token windows over the whole token stream, ``(n, seqlen)``,
    ``n = n_tokens // seqlen`` (Wanda/SparseGPT convention), optionally the first ``max_windows``.

    When windows start with BOS (``bos``, see ``bos_token``) each window is BOS then the next
    ``seqlen - 1`` text tokens (``n = n_tokens // (seqlen - 1)``): every text token is scored once,
    each window as an independent document, as lm-evaluation-harness scores a document's first
    rolling window (BOS as the prefix token) and as BOS-trained models (Gemma) expect their input.
    """
    if int(seqlen) < 1:
        raise ValueError(f"seqlen must be >= 1, got {seqlen}")
    if max_windows is not None and int(max_windows) < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    ids, bid = _window_stream(tokenizer, text, bos)
    if bid is not None and seqlen < 2:
        raise ValueError("seqlen must be >= 2 when windows start with BOS")
    L = seqlen - (bid is not None)
    n = ids.numel() // L
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, int(max_windows))
    out = ids[: n * L].reshape(n, L)
    if bid is not None:
        out = torch.cat([torch.full((n, 1), bid, dtype=out.dtype), out], 1)
    return out.clone()


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, device=None, progress: bool = True,
               desc: str = "perplexity") -> float:
    """Perplexity over ``windows`` (``(n, seqlen)`` token ids): ``exp`` of the mean over windows of
    each window's mean next-token NLL (standard shifted causal-LM loss, as in Wanda/SparseGPT eval).
    ``desc`` labels the progress bar (e.g. which text, before or after pruning)."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError("windows must be a 2-D LongTensor (n, seqlen)")
    n, seqlen = windows.shape
    if n == 0 or seqlen < 2:
        raise ValueError(f"need at least one window of >= 2 tokens, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total = 0.0
    it = range(0, n, batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=desc, unit="win")
    try:
        for i in it:
            batch = windows[i:i + batch_size].to(device)
            logits = model(batch, use_cache=False).logits
            for j in range(batch.shape[0]):  # per window keeps the fp32 copy small
                lg = logits[j, :-1].float()
                total += torch.nn.functional.cross_entropy(lg, batch[j, 1:]).item()
            del logits
            if bar is not None:
                bar.update(batch.shape[0])
                bar.set_postfix(ppl=f"{math.exp(total / min(i + batch_size, n)):.3f}")
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    return float(math.exp(total / n))
