"""Texts, calibration/evaluation windows and perplexity.

A text spec (``load_text``) is a local ``.txt`` file or folder, a comma-separated list, or one of
the offline demo corpora (Jane Austen, the Jargon File) or online ``datasets`` corpora that
:mod:`fasp_ext.corpora` provides; windows follow the GPTQ / SparseGPT / Wanda conventions.
"""

from __future__ import annotations

import math
import os
import random
import re
from pathlib import Path
from typing import Optional

import torch

from .corpora import (AUSTEN_BOOKS, DATASET_SPECS, JARGON_BODY_MARKER, _DATASET_ALIASES,  # noqa: F401
                      _load_hf_dataset, austen_text, austen_texts, data_dir, fetch_package, jargon_text)

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
    "calibration_char_budget",
    "eval_char_budget",
    "eval_windows",
    "perplexity",
]


#: characters read for each token a run needs: English BPE averages about 4.5 characters a token,
#: so reading 8 a token leaves room for denser text
CHARS_PER_TOKEN = 8
#: calibration reads this many times the text its windows take, so that the random window
#: positions spread over a stretch of text 4x longer than what they cover
CALIB_MARGIN = 4
#: evaluation without a window limit reads at most this many characters of a text (64 Mi)
EVAL_MAX_CHARS = 64 << 20
#: a file must look like text in its first this many bytes: no NUL byte, at most half undecodable
SNIFF_BYTES = 1 << 20
#: undecodable share (of the first SNIFF_BYTES) above which a file is refused as not text
MAX_UNDECODABLE = 0.5


def calibration_char_budget(nsamples: int, seqlen: int) -> int:
    """Characters calibration reads at most from a text file: ``CALIB_MARGIN`` times the tokens its
    windows take, at ``CHARS_PER_TOKEN`` characters a token, and at least 1 Mi characters
    (128 x 2048 tokens: 8 Mi characters)."""
    return max(1 << 20, CALIB_MARGIN * CHARS_PER_TOKEN * int(nsamples) * int(seqlen))


def eval_char_budget(seqlen: int, max_windows: Optional[int]) -> int:
    """Characters evaluation reads at most from a text file: twice ``CHARS_PER_TOKEN`` a token for
    ``max_windows`` windows (at least 1 Mi), or ``EVAL_MAX_CHARS`` when every window is wanted."""
    if max_windows is None:
        return EVAL_MAX_CHARS
    return max(1 << 20, 2 * CHARS_PER_TOKEN * int(max_windows) * int(seqlen))


def _check_text_file(p: Path) -> None:
    """Refuse, without reading past its first megabyte, a path that is not a regular file (a
    character device such as /dev/zero, a FIFO, a socket) or a file that is not text."""
    import codecs
    import stat

    mode = os.stat(p).st_mode  # stat does not open: a FIFO cannot block here
    if not stat.S_ISREG(mode):
        kind = ("a character device" if stat.S_ISCHR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a block device" if stat.S_ISBLK(mode)
                else "not a regular file")
        raise ValueError(f"{p} is {kind}, not a text file")
    with open(p, "rb") as f:
        head = f.read(SNIFF_BYTES)
    nul = head.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{p} is not text: it has a NUL byte at offset {nul} (a binary file, or UTF-16: "
                         f"give UTF-8 text)")
    sample = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    bad = undecodable_fraction(sample)
    if bad > MAX_UNDECODABLE:
        raise ValueError(f"{p} is not text: {bad:.0%} of its first {len(head):,} bytes are not UTF-8 or are "
                         f"control characters")


def _read_file(p: Path, max_chars: Optional[int], info: Optional[dict]) -> str:
    """A text file's first ``max_chars`` characters (all of it for None), read as a stream."""
    _check_text_file(p)
    with open(p, "r", encoding="utf-8", errors="replace") as f:
        if max_chars is None:
            return f.read()
        parts, left = [], int(max_chars)
        while left > 0:  # in pieces: read(n) may reserve n characters up front, whatever the file holds
            piece = f.read(min(left, 1 << 20))
            if not piece:
                break
            parts.append(piece)
            left -= len(piece)
        if left <= 0 and f.read(1) and info is not None:
            info["truncated"] = True
        return "".join(parts)


def _read_path(p: Path, max_chars: Optional[int] = None, info: Optional[dict] = None) -> str:
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() == ".txt")
        if not files:
            raise FileNotFoundError(f"text directory {str(p)!r} contains no .txt files")
        return _join_within(files, lambda q, left: _read_file(q, left, info), max_chars, info)
    return _read_file(p, max_chars, info)


def _join_within(items, read, max_chars: Optional[int], info: Optional[dict]) -> str:
    """``read(item, chars_left)`` of each item joined by "\n\n", all of them within ``max_chars``."""
    parts, left = [], max_chars
    for item in items:
        if left is not None and left <= 0:
            if info is not None:
                info["truncated"] = True
            break
        parts.append(read(item, left))
        if left is not None:
            left -= len(parts[-1]) + 2
    return "\n\n".join(parts)


def load_text(spec: str, split: str = "eval", max_chars: Optional[int] = None, info: Optional[dict] = None) -> str:
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

    Files are read as a stream: with ``max_chars`` at most that many characters of them (over all
    the files a spec names; :func:`calibration_char_budget` and :func:`eval_char_budget` give what a
    run needs), and ``info["truncated"]`` is set when something was left unread. A path that is not
    a regular file (``/dev/zero``, a FIFO) or a file that is not text (a NUL byte, or more than half
    undecodable, in its first megabyte) is refused with a ``ValueError`` before anything is read.
    """
    if max_chars is not None and int(max_chars) < 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"text spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    p = Path(spec).expanduser()
    if p.exists():
        return _read_path(p, max_chars, info)
    if "," in spec:
        parts = [s.strip() for s in spec.split(",") if s.strip()]
        if not parts:
            raise ValueError(f"text spec {spec!r} lists nothing")
        return _join_within(parts, lambda part, left: load_text(part, split=split, max_chars=left, info=info),
                            max_chars, info)
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
        if len(text) > TOKENIZE_WHOLE_CHARS:
            return _tokenize_in_pieces(backend, text, add_special_tokens)
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


#: texts up to this many characters are tokenised in one call (every built-in text: all six Austen
#: novels are 4.0 M characters); longer ones in pieces of about TOKENIZE_PIECE_CHARS, because the
#: tokenizer keeps offsets and strings for every token of a call (about 600 bytes a token: 1.2 GB
#: for 8 M characters of English in one call, 0.3 GB in pieces of 1 Mi)
TOKENIZE_WHOLE_CHARS = 4 << 20
TOKENIZE_PIECE_CHARS = 1 << 20


def _piece_ends(text: str, piece: int) -> list[int]:
    """Where to cut ``text`` into pieces of about ``piece`` characters: before a single space between
    two words (the space starts the next piece, as a byte-level BPE pre-tokenizer would split it),
    else at the mark."""
    ends, start = [], 0
    while len(text) - start > piece:
        mark = start + piece
        cut = text.rfind(" ", max(start + 1, mark - (piece >> 4)), mark)
        while cut > start and (text[cut - 1].isspace() or cut + 1 >= len(text) or text[cut + 1].isspace()):
            cut = text.rfind(" ", max(start + 1, mark - (piece >> 4)), cut)
        end = cut if cut > start else mark
        ends.append(end)
        start = end
    ends.append(len(text))
    return ends


def _tokenize_in_pieces(backend, text: str, add_special_tokens: bool) -> torch.Tensor:
    """Token ids of a long text, tokenised piece by piece (bounded memory); the special tokens the
    tokenizer adds (BOS before, EOS after) go around the whole stream once."""
    prefix, suffix = [], []
    if add_special_tokens:
        plain = backend.encode("a", add_special_tokens=False).ids
        full = backend.encode("a", add_special_tokens=True).ids
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                prefix, suffix = full[:i], full[i + len(plain):]
                break
    parts, start = [torch.tensor(prefix, dtype=torch.long)], 0
    for end in _piece_ends(text, TOKENIZE_PIECE_CHARS):
        parts.append(torch.tensor(backend.encode(text[start:end], add_special_tokens=False).ids, dtype=torch.long))
        start = end
    parts.append(torch.tensor(suffix, dtype=torch.long))
    return torch.cat(parts)


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
    return sum(1 for _ in _UNDECODABLE.finditer(text)) / len(text)  # no list of matches held


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
