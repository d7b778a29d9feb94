"""Tests of fasp_ext.rdata (R serialization reader) and fasp_ext.data (texts, windows, perplexity).

The real-corpus tests need the Debian packages r-cran-janeaustenr and jargon-text (fetched with
`apt-get download` on first use, or by scripts/fetch_texts.sh).  They are skipped when the
packages cannot be obtained, unless FASP_EXT_REQUIRE_DATA=1 (CI), where they must pass.
"""

import bz2
import gzip
import lzma
import math
import os
import random
import struct
import sys
import types
import zlib

import pytest
import torch
import torch.nn.functional as F

from fasp_ext import data as D
from fasp_ext import corpora as C
from fasp_ext.corpora import rdata as R

REQUIRE_DATA = os.environ.get("FASP_EXT_REQUIRE_DATA", "") == "1"


# ---------------------------------------------------------------------------------------------
# Hand-built R XDR serializations
# ---------------------------------------------------------------------------------------------

def i32(x):
    return struct.pack(">i", x)


def header(version=3):
    out = b"X\n" + i32(version) + i32(0x040201) + i32(0x030500)
    if version == 3:
        out += i32(5) + b"UTF-8"
    return out


def flags(t, levels=0, obj=False, attr=False, tag=False):
    return i32(t | (levels << 12) | (int(obj) << 8) | (int(attr) << 9) | (int(tag) << 10))


UTF8, LATIN1, ASCII = 1 << 3, 1 << 2, 1 << 6
NIL = i32(254)


def charsxp(s, enc=UTF8):
    if s is None:
        return flags(9) + i32(-1)
    b = s.encode("latin-1" if enc == LATIN1 else "utf-8")
    return flags(9, levels=enc) + i32(len(b)) + b


def strsxp(items, attr=b""):
    body = i32(len(items)) + b"".join(charsxp(s, e) for s, e in items)
    return flags(16, attr=bool(attr)) + body + attr


def intsxp(vals, attr=b""):
    return flags(13, attr=bool(attr)) + i32(len(vals)) + b"".join(i32(v) for v in vals) + attr


def realsxp(vals):
    return flags(14) + i32(len(vals)) + b"".join(struct.pack(">d", v) for v in vals)


def lglsxp(vals):
    return flags(10) + i32(len(vals)) + b"".join(i32(v) for v in vals)


def symsxp(name):
    return flags(1) + charsxp(name, ASCII)


def ref(idx):  # packed reference index
    return i32(255 | (idx << 8))


def pairlist(cells):
    """cells: list of (tag_bytes, value_bytes); terminated by NILVALUE."""
    out = b""
    for tag, val in cells:
        out += flags(2, tag=True) + tag + val
    return out + NIL


def vecsxp(items, attr=b""):
    return flags(19, attr=bool(attr)) + i32(len(items)) + b"".join(items) + attr


def test_strsxp_encodings_and_na_v2_and_v3():
    items = [("plain", ASCII), ("caf\u00e9", UTF8), ("na\u00efve", LATIN1), (None, UTF8), ("", UTF8)]
    for version in (2, 3):
        v = R.unserialize(header(version) + strsxp(items))
        assert isinstance(v, R.RVector) and v.rtype == "STRSXP"
        assert list(v) == ["plain", "caf\u00e9", "na\u00efve", None, ""]


def test_atomic_vectors_and_nil():
    assert R.unserialize(header() + NIL) is None
    v = R.unserialize(header() + intsxp([1, -2, -(2 ** 31), 7]))
    assert v.rtype == "INTSXP" and list(v) == [1, -2, None, 7]
    v = R.unserialize(header() + lglsxp([1, 0, -(2 ** 31)]))
    assert list(v) == [True, False, None]
    v = R.unserialize(header() + realsxp([1.5, -0.25, float("inf")]))
    assert list(v) == [1.5, -0.25, float("inf")]


def test_named_list_with_symbol_references():
    # list(a = 1:2, b = "x") with names attribute; then a data.frame built with REFSXP reuse.
    names_attr = pairlist([(symsxp("names"), strsxp([("a", ASCII), ("b", ASCII)]))])
    v = R.unserialize(header() + vecsxp([intsxp([1, 2]), strsxp([("x", UTF8)])], attr=names_attr))
    assert v.names == ["a", "b"]
    assert R.as_python(v) == {"a": [1, 2], "b": ["x"]}

    # data.frame(x = 1:3, y = c("p", "q", NA)): attributes names, class, row.names = c(NA, -3L).
    # The columns are read before the list's own attributes, so the symbol 'names' first appears
    # in the first column's attributes (reference table entry 1); the data frame's attribute
    # list then refers to it with a packed REFSXP.
    inner_attr = pairlist([(symsxp("names"), strsxp([("lvl", ASCII)]))])
    attrs = pairlist([
        (ref(1), strsxp([("x", ASCII), ("y", ASCII)])),
        (symsxp("class"), strsxp([("data.frame", ASCII)])),
        (symsxp("row.names"), intsxp([-(2 ** 31), -3])),
    ])
    df = vecsxp([intsxp([1, 2, 3], attr=inner_attr),
                 strsxp([("p", UTF8), ("q", UTF8), (None, UTF8)])], attr=attrs)
    out = R.unserialize(header(2) + df)
    assert out.attributes["class"] == ["data.frame"]
    assert list(out.attributes["row.names"]) == [None, -3]
    assert out[0].attributes == {"names": ["lvl"]}
    assert R.as_python(out) == {"x": [1, 2, 3], "y": ["p", "q", None]}


def test_pairlist_tags_and_long_pairlist():
    n = 3000  # iterative reading: no recursion limit problems
    cells = [(symsxp(f"k{i}"), intsxp([i])) for i in range(n)]
    v = R.unserialize(header() + pairlist(cells))
    assert isinstance(v, R.RPairList) and len(v) == n
    assert v.tags[:2] == ["k0", "k1"] and list(v[-1]) == [n - 1]


def test_compact_intseq_altrep():
    info = flags(2) + symsxp("compact_intseq") + flags(2) + symsxp("base") + flags(2) + intsxp([13]) + NIL
    state = realsxp([4.0, 10.0, 1.0])
    v = R.unserialize(header() + i32(238) + info + state + NIL)
    assert list(v) == [10, 11, 12, 13]


def test_errors_are_clear():
    with pytest.raises(R.RDataError, match="BCODESXP"):
        R.unserialize(header() + flags(21) + b"\0" * 8)
    with pytest.raises(R.RDataError, match="not an R XDR"):
        R.unserialize(b"PK\x03\x04" + b"\0" * 20)
    with pytest.raises(R.RDataError, match="ASCII"):
        R.unserialize(b"A\n1\n")
    with pytest.raises(R.RDataError, match="version"):
        R.unserialize(b"X\n" + i32(4) + i32(0) + i32(0))
    with pytest.raises(R.RDataError, match="truncated"):
        R.unserialize(header() + flags(16) + i32(3) + charsxp("a"))
    with pytest.raises(R.RDataError, match="unsupported R object type"):
        R.unserialize(header() + i32(60))


def _write_lazyload_db(base, objects, compressed):
    """objects: name -> serialized bytes.  compressed: 1 (zlib) or 3 (tagged records)."""
    rdb = b""
    positions = {}
    for k, (name, ser) in enumerate(objects.items()):
        if compressed == 1:
            rec = struct.pack(">I", len(ser)) + zlib.compress(ser)
        else:
            tag, comp = [(b"Z", lzma.compress), (b"2", bz2.compress), (b"1", zlib.compress),
                         (b"0", lambda b: b)][k % 4]
            rec = struct.pack(">I", len(ser)) + tag + comp(ser)
        positions[name] = (len(rdb), len(rec))
        rdb += rec
    names_attr = lambda names: pairlist([(symsxp("names"), strsxp([(n, ASCII) for n in names]))])  # noqa: E731
    variables = vecsxp([intsxp(list(p)) for p in positions.values()], attr=names_attr(list(positions)))
    index = vecsxp([variables, vecsxp([]), intsxp([compressed]) if compressed != 1 else lglsxp([1])],
                   attr=names_attr(["variables", "references", "compressed"]))
    with open(base + ".rdb", "wb") as f:
        f.write(rdb)
    with open(base + ".rdx", "wb") as f:
        f.write(gzip.compress(header() + index))


@pytest.mark.parametrize("compressed", [1, 3])
def test_lazyload_db_roundtrip(tmp_path, compressed):
    objs = {
        "book": header() + strsxp([("Line one", UTF8), ("", UTF8), ("Line three", UTF8)]),
        "nums": header(2) + intsxp([5, 6]),
        "more": header() + strsxp([("x", UTF8)]),
        "last": header() + realsxp([2.5]),
    }
    base = str(tmp_path / "Rdata")
    _write_lazyload_db(base, objs, compressed)
    db = R.LazyLoadDB(base + ".rdx")
    assert db.names() == list(objs) and "book" in db and len(db) == 4
    assert list(db["book"]) == ["Line one", "", "Line three"]
    assert list(db["nums"]) == [5, 6] and list(db["more"]) == ["x"] and list(db["last"]) == [2.5]
    with pytest.raises(KeyError, match="nope"):
        db["nope"]
    with pytest.raises(FileNotFoundError):
        R.LazyLoadDB(str(tmp_path / "missing"))


def test_read_rds_compressions(tmp_path):
    ser = header() + strsxp([("a", ASCII), ("b", ASCII)])
    for name, comp in [("g", gzip.compress), ("b", bz2.compress), ("x", lzma.compress), ("u", lambda b: b)]:
        p = tmp_path / f"{name}.rds"
        p.write_bytes(comp(ser))
        assert list(R.read_rds(p)) == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# Real corpora (Debian packages)
# ---------------------------------------------------------------------------------------------

def _or_skip(fn):
    try:
        return fn()
    except RuntimeError as e:
        if REQUIRE_DATA:
            raise
        pytest.skip(f"Debian text package unavailable (apt-get/dpkg-deb failed): {e}")


def test_real_austen_package():
    texts = _or_skip(D.austen_texts)
    assert set(texts) == set(D.AUSTEN_BOOKS)
    pp = D.austen_text("prideprejudice")
    assert pp.startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged, that a single man in possession" in pp
    assert pp.count("\n") == 13030 - 1  # the R vector has 13030 lines
    assert D.austen_text("Pride and Prejudice") == pp
    assert D.load_text("austen:prideprejudice") == pp
    assert texts["emma"].startswith("EMMA") and "Emma Woodhouse, handsome, clever, and rich" in texts["emma"]
    for name, t in texts.items():
        assert len(t) > 300_000, name
    with pytest.raises(ValueError, match="unknown Austen book"):
        D.austen_text("ulysses")
    everything = D.load_text("austen")
    assert everything.startswith("SENSE AND SENSIBILITY") and len(everything) > sum(map(len, texts.values()))


def test_real_jargon_file():
    body = _or_skip(D.jargon_text)
    full = D.jargon_text(body_only=False)
    assert full.lstrip().startswith("The Jargon File")
    assert body.startswith(D.JARGON_BODY_MARKER)
    assert full.split("\n").index(D.JARGON_BODY_MARKER) == 6804  # line 6805, 1-based
    assert full.endswith(body)
    assert ":hacker: n." in body and len(body) > 1_000_000
    assert D.load_text("jargon") == body


# ---------------------------------------------------------------------------------------------
# load_text
# ---------------------------------------------------------------------------------------------

def test_load_text_paths(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not text")
    assert D.load_text(str(tmp_path / "a.txt")) == "first"
    assert D.load_text(str(tmp_path)) == "first\n\nsecond"
    both = f"{tmp_path / 'b.txt'},{tmp_path / 'a.txt'}"
    assert D.load_text(both) == "second\n\nfirst"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt"):
        D.load_text(str(empty))


def test_load_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        D.load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="unknown text spec 'nonsense'"):
        D.load_text("nonsense")
    with pytest.raises(ValueError):
        D.load_text("")


def test_hf_datasets_fail_fast_offline(monkeypatch):
    """With `datasets` missing: clear ImportError; with it present but offline: fast ConnectionError."""
    # 1) not installed
    import importlib.util as iu

    real_find_spec = iu.find_spec
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr(iu, "find_spec",
                        lambda name, *a, **k: None if name == "datasets" else real_find_spec(name, *a, **k))
    with pytest.raises(ImportError, match="`datasets` package"):
        D.load_text("wikitext2")
    monkeypatch.undo()

    # 2) installed (a fake module) but the hub is unreachable: the loader is never allowed to hang
    calls = []

    def load_dataset(*a, **k):
        calls.append((a, k, os.environ.get("HF_DATASETS_OFFLINE")))
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    fake.config = types.SimpleNamespace(HF_DATASETS_OFFLINE=False, HF_HUB_OFFLINE=False)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(C, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConnectionError, match="local .txt"):
        D.load_text("wikitext2")
    assert calls and calls[0][2] == "1" and fake.config.HF_DATASETS_OFFLINE is True
    assert calls[0][0] == ("wikitext", "wikitext-2-raw-v1") and calls[0][1] == {"split": "test"}
    with pytest.raises(ConnectionError):
        D.load_text("ptb", split="calib")
    assert calls[-1][0] == ("ptb_text_only", "penn_treebank") and calls[-1][1] == {"split": "train"}

    # 3) online (fake) dataset: GPTQ conventions for joining
    fake.load_dataset = lambda *a, **k: {"text": ["a", "b", "c"]}
    monkeypatch.setattr(C, "_hub_reachable", lambda *a, **k: True)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert D.load_text("wikitext2") == "a\n\nb\n\nc"
    assert D.load_text("wikitext2:train") == "a b c"


def test_hub_probe_is_bounded(monkeypatch):
    """A connection (or DNS lookup) that never answers: the probe gives up and says unreachable.
    Without the bound the call would block until the watchdog fails the test."""
    import signal
    import threading

    release = threading.Event()

    def hang(*a, **k):
        release.wait()
        raise OSError("released")

    monkeypatch.setattr(C.socket, "create_connection", hang)

    def ring(signum, frame):
        raise AssertionError("the hub probe blocked")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(30)
    try:
        assert C._hub_reachable("huggingface.co", 443, timeout=0.2) is False
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        release.set()


# ---------------------------------------------------------------------------------------------
# Windows with a tiny local tokenizer
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(1000)}
    vocab["[UNK]"] = 1000
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    tok.model_max_length = 16  # far shorter than the texts: must not matter
    return tok


def _text(n):
    return " ".join(f"t{i}" for i in range(n))


def test_tokenize_text_long(tiny_tokenizer):
    ids = D.tokenize_text(tiny_tokenizer, _text(1000))
    assert ids.dtype == torch.long and ids.tolist() == list(range(1000))


def test_calibration_windows(tiny_tokenizer):
    w = D.calibration_windows(tiny_tokenizer, _text(100), nsamples=6, seqlen=10, seed=3)
    assert w.shape == (6, 10) and w.dtype == torch.long
    rng = random.Random(3)
    starts = [rng.randint(0, 100 - 10 - 1) for _ in range(6)]
    assert w[:, 0].tolist() == starts
    assert torch.equal(w, w[:, :1] + torch.arange(10))  # consecutive tokens
    assert torch.equal(w, D.calibration_windows(tiny_tokenizer, _text(100), 6, 10, seed=3))
    assert not torch.equal(w, D.calibration_windows(tiny_tokenizer, _text(100), 6, 10, seed=4))
    # exactly seqlen+1 tokens: the only start is 0
    w = D.calibration_windows(tiny_tokenizer, _text(11), nsamples=2, seqlen=10, seed=0)
    assert w.tolist() == [list(range(10))] * 2


def test_calibration_windows_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        D.calibration_windows(tiny_tokenizer, "  \n", 2, 4, 0)
    with pytest.raises(ValueError, match="seqlen\\+1"):
        D.calibration_windows(tiny_tokenizer, _text(10), 2, 10, 0)
    with pytest.raises(ValueError, match="nsamples"):
        D.calibration_windows(tiny_tokenizer, _text(100), 0, 10, 0)


def test_eval_windows(tiny_tokenizer):
    w = D.eval_windows(tiny_tokenizer, _text(100), 10)
    assert w.shape == (10, 10) and w.flatten().tolist() == list(range(100))
    w = D.eval_windows(tiny_tokenizer, _text(100), 7)
    assert w.shape == (14, 7) and w.flatten().tolist() == list(range(98))
    w = D.eval_windows(tiny_tokenizer, _text(100), 7, max_windows=3)
    assert w.shape == (3, 7) and w[2].tolist() == list(range(14, 21))
    with pytest.raises(ValueError, match="fewer than one window"):
        D.eval_windows(tiny_tokenizer, _text(5), 7)
    with pytest.raises(ValueError, match="empty"):
        D.eval_windows(tiny_tokenizer, "", 7)


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------

def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_perplexity_matches_hand_computation():
    model = _tiny_llama()
    model.train()  # perplexity must switch to eval and restore
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 97, (5, 12), generator=g)
    model.eval()
    with torch.no_grad():
        logits = model(windows).logits
    per_window = [F.cross_entropy(logits[i, :-1], windows[i, 1:]).item() for i in range(5)]
    expected = math.exp(sum(per_window) / 5)
    model.train()
    for bs in (1, 2, 8):
        got = D.perplexity(model, windows, batch_size=bs, progress=(bs == 2))
        assert got == pytest.approx(expected, rel=1e-5)
    assert model.training
    assert 1 < expected < 97 * 3  # a random tiny model is close to uniform over 97 tokens


def test_perplexity_errors():
    model = _tiny_llama()
    with pytest.raises(ValueError):
        D.perplexity(model, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError):
        D.perplexity(model, torch.zeros((0, 8), dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Obtaining Debian packages (no network: a hand-made .deb already in the cache dir)
# ---------------------------------------------------------------------------------------------

def _make_deb(path, files):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, content in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", gzip.compress(b"")),
               ("data.tar.gz", buf.getvalue())]
    out = b"!<arch>\n"
    for name, payload in members:
        hdr = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(payload):<10}`\n".encode()
        assert len(hdr) == 60
        out += hdr + payload + (b"\n" if len(payload) % 2 else b"")
    path.write_bytes(out)


@pytest.mark.parametrize("use_dpkg", [True, False])
def test_fetch_package_from_cached_deb(tmp_path, monkeypatch, use_dpkg):
    import shutil as sh
    import subprocess

    if use_dpkg and sh.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    monkeypatch.setenv("FASP_EXT_DATA_DIR", str(tmp_path))
    _make_deb(tmp_path / "fakepkg_1.0_all.deb", {"usr/share/fake/hello.txt": b"hello deb\n"})
    if not use_dpkg:  # pure-Python ar + tar fallback
        real_run = subprocess.run

        def run(cmd, *a, **k):
            if cmd[0] in ("dpkg-deb", "apt-get"):
                raise FileNotFoundError(cmd[0])
            return real_run(cmd, *a, **k)

        monkeypatch.setattr(C.subprocess, "run", run)
    root = D.fetch_package("fakepkg", "usr/share/fake/hello.txt")
    assert root == tmp_path / "fakepkg"
    assert (root / "usr/share/fake/hello.txt").read_text() == "hello deb\n"
    assert D.fetch_package("fakepkg", "usr/share/fake/hello.txt") == root  # cached
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []


def test_fetch_package_failure_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FASP_EXT_DATA_DIR", str(tmp_path))

    def run(cmd, *a, **k):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(C.subprocess, "run", run)
    with pytest.raises(RuntimeError, match="apt-get download nosuchpkg"):
        D.fetch_package("nosuchpkg", "usr/share/x")


def test_load_text_comma_list_of_mixed_specs(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "austen_text", lambda name: f"<austen {name}>")
    monkeypatch.setattr(D, "jargon_text", lambda body_only=True: "<jargon>")
    (tmp_path / "a.txt").write_text("local")
    got = D.load_text(f"austen:emma, jargon,{tmp_path / 'a.txt'}")
    assert got == "<austen emma>\n\n<jargon>\n\nlocal"


def _byte_bpe_tokenizer(bos_eos: bool):
    """A small byte-level BPE (the GPT-2 / LLaMA-3 / SmolLM2 kind), trained here, optionally adding BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog,\n\n said the  other one " * 20]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
    if bos_eos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("bos_eos", [False, True])
def test_long_texts_are_tokenised_in_pieces_to_the_same_ids(monkeypatch, bos_eos):
    """Past TOKENIZE_WHOLE_CHARS a text is tokenised in pieces cut before a space between words
    (the tokenizer's per-token records of one 8 M-character call took 1.2 GB): the same ids as one
    call, special tokens once around the whole stream."""
    tok = _byte_bpe_tokenizer(bos_eos)
    g = torch.Generator().manual_seed(0)
    words = ["the", "quick", "brown", "fox,", "jumps\n\n", "over", " lazy", "dog.", "said", "other"]
    text = " ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist())
    whole = tok.backend_tokenizer.encode(text, add_special_tokens=True).ids
    monkeypatch.setattr(D, "TOKENIZE_WHOLE_CHARS", 1000)
    monkeypatch.setattr(D, "TOKENIZE_PIECE_CHARS", 700)
    ends = D._piece_ends(text, 700)
    assert len(ends) > 10 and ends[-1] == len(text)
    assert all(text[e] == " " and not text[e - 1].isspace() and not text[e + 1].isspace() for e in ends[:-1])
    got = D.tokenize_text(tok, text)
    assert got.tolist() == whole
    assert (got[0] == 0 and got[-1] == 1 and int((got == 0).sum()) == 1) if bos_eos else 0 not in got.tolist()
