"""A small, dependency-free reader of R's serialization format and lazy-load databases.

Enough of R's ``serialize()`` format (XDR binary, ``"X\\n"``, versions 2 and 3) is
implemented to read ``.rds`` files, the ``.rdx`` index of a lazy-load database and the
records of its ``.rdb`` file -- in particular the character vectors and data frames
shipped by data packages such as ``janeaustenr``.

R objects are mapped to Python as follows:

=====================  ==========================================================
R type                 Python value
=====================  ==========================================================
NULL                   ``None``
character (STRSXP)     :class:`RVector` (a ``list``) of ``str`` / ``None`` for NA
integer / logical      :class:`RVector` of ``int`` / ``bool`` / ``None`` for NA
double / complex       :class:`RVector` of ``float`` / ``complex`` (NA is a NaN)
raw                    :class:`RVector` of ``int`` (bytes)
list (VECSXP/EXPR)     :class:`RVector` of converted items
pairlist / call        :class:`RPairList` (``list`` of values with ``.tags``)
symbol                 :class:`RSymbol` (a ``str`` subclass)
environment            :class:`REnvironment` (contents kept, enclosure dropped)
=====================  ==========================================================

Attributes (``names``, ``class``, ``row.names``...) are kept in ``.attributes``
(a ``dict``); :func:`as_python` turns named vectors/lists into ``dict`` and data
frames into ``dict`` of columns.  Unsupported types (byte code, external pointers...)
raise :class:`RDataError` naming the type.

The lazy-load DB layout follows R's ``makeLazyLoadDB``/``lazyLoadDBfetch``: the
``.rdx`` file is a (gzip) compressed serialised list with components ``variables``
(name -> integer ``c(offset, length)`` into the ``.rdb``), ``references`` and
``compressed`` (``TRUE``/1 = zlib, 2 = bzip2, 3 = xz).  Each ``.rdb`` record is a
4-byte big-endian uncompressed length followed by the compressed serialisation; for
types 2 and 3 a one-byte tag (``'0'`` none, ``'1'`` zlib, ``'2'`` bzip2, ``'Z'`` xz)
follows the length.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import os
import struct
import zlib
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = [
    "RDataError",
    "RVector",
    "RPairList",
    "RSymbol",
    "REnvironment",
    "unserialize",
    "read_rds",
    "LazyLoadDB",
    "as_python",
]


class RDataError(ValueError):
    """Malformed or unsupported R serialized data."""


# SEXP types (Rinternals.h) and special serialization codes (serialize.c)
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP = 7, 8, 9, 10
INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 13, 14, 15, 16, 17
VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = 19, 20, 21, 22, 23, 24, 25
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP = 251, 250, 249, 248
PERSISTSXP, CLASSREFSXP, GENERICREFSXP, BCREPDEF = 247, 246, 245, 244
EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 242, 241, 240, 239, 238

_TYPE_NAMES = {
    0: "NILSXP", 1: "SYMSXP", 2: "LISTSXP", 3: "CLOSXP", 4: "ENVSXP", 5: "PROMSXP",
    6: "LANGSXP", 7: "SPECIALSXP", 8: "BUILTINSXP", 9: "CHARSXP", 10: "LGLSXP",
    13: "INTSXP", 14: "REALSXP", 15: "CPLXSXP", 16: "STRSXP", 17: "DOTSXP", 18: "ANYSXP",
    19: "VECSXP", 20: "EXPRSXP", 21: "BCODESXP", 22: "EXTPTRSXP", 23: "WEAKREFSXP",
    24: "RAWSXP", 25: "S4SXP", 255: "REFSXP", 254: "NILVALUE_SXP", 253: "GLOBALENV_SXP",
    252: "UNBOUNDVALUE_SXP", 251: "MISSINGARG_SXP", 250: "BASENAMESPACE_SXP",
    249: "NAMESPACESXP", 248: "PACKAGESXP", 247: "PERSISTSXP", 246: "CLASSREFSXP",
    245: "GENERICREFSXP", 244: "BCREPDEF", 243: "BCREPREF", 242: "EMPTYENV_SXP",
    241: "BASEENV_SXP", 240: "ATTRLANGSXP", 239: "ATTRLISTSXP", 238: "ALTREP_SXP",
}

# CHARSXP encoding bits in the "levels" field
_UTF8_MASK = 1 << 3
_LATIN1_MASK = 1 << 2
_BYTES_MASK = 1 << 1
_ASCII_MASK = 1 << 6

NA_INTEGER = -(2 ** 31)


def _type_name(t: int) -> str:
    return _TYPE_NAMES.get(t, f"unknown type {t}")


class RSymbol(str):
    """An R symbol (``as.name``)."""

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"RSymbol({str.__repr__(self)})"


class _Special:
    """Singleton markers (global env, missing arg, ...)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"<R {self.name}>"


GLOBALENV = _Special("R_GlobalEnv")
EMPTYENV = _Special("R_EmptyEnv")
BASEENV = _Special("R_BaseEnv")
BASENAMESPACE = _Special("R_BaseNamespace")
UNBOUNDVALUE = _Special("R_UnboundValue")
MISSINGARG = _Special("R_MissingArg")
#: the pseudo-SEXP types that stand for one of R's singletons
_SPECIALS = {EMPTYENV_SXP: EMPTYENV, BASEENV_SXP: BASEENV, GLOBALENV_SXP: GLOBALENV,
             UNBOUNDVALUE_SXP: UNBOUNDVALUE, MISSINGARG_SXP: MISSINGARG, BASENAMESPACE_SXP: BASENAMESPACE}


class RVector(list):
    """An atomic vector or generic list; ``rtype`` is the SEXP type name."""

    def __init__(self, items=(), rtype: str = "VECSXP", attributes: Optional[dict] = None):
        super().__init__(items)
        self.rtype = rtype
        self.attributes: Dict[str, Any] = attributes if attributes is not None else {}

    @property
    def names(self) -> Optional[List[Optional[str]]]:
        n = self.attributes.get("names")
        return list(n) if n is not None else None

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        head = list.__repr__(self[:5]) if len(self) > 5 else list.__repr__(self)
        return f"RVector<{self.rtype}, len={len(self)}>({head}, attrs={list(self.attributes)})"


class RPairList(list):
    """A pairlist (LISTSXP) or call (LANGSXP): values with optional tags."""

    def __init__(self, items=(), tags=(), rtype: str = "LISTSXP", attributes: Optional[dict] = None):
        super().__init__(items)
        self.tags: List[Optional[str]] = list(tags)
        self.rtype = rtype
        self.attributes: Dict[str, Any] = attributes if attributes is not None else {}

    def as_dict(self) -> Dict[Optional[str], Any]:
        return dict(zip(self.tags, self))


class REnvironment(dict):
    """An R environment's frame (the enclosure is recorded in ``.enclos``)."""

    def __init__(self) -> None:
        super().__init__()
        self.enclos: Any = None
        self.locked = False
        self.attributes: Dict[str, Any] = {}


class RObject:
    """Generic holder for rarely needed types (closures, promises, S4...)."""

    def __init__(self, rtype: str, **fields: Any) -> None:
        self.rtype = rtype
        self.fields = fields
        self.attributes: Dict[str, Any] = {}

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"RObject<{self.rtype}>"


def _attrs_to_dict(attr: Any) -> Dict[str, Any]:
    if attr is None:
        return {}
    if not isinstance(attr, RPairList):
        raise RDataError(f"attributes must be a pairlist, got {type(attr).__name__}")
    return {str(t): v for t, v in zip(attr.tags, attr)}


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.buf = memoryview(data)
        self.pos = 0
        self.refs: List[Any] = []
        self.native_encoding = "UTF-8"
        self.version = 0

    # -- primitives ---------------------------------------------------------
    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise RDataError(
                f"truncated R serialization: need {n} bytes at offset {self.pos}, have {len(self.buf) - self.pos}"
            )
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints (upper, lower)
            hi = struct.unpack(">I", self._take(4))[0]
            lo = struct.unpack(">I", self._take(4))[0]
            n = (hi << 32) + lo
        elif n < -1:
            raise RDataError(f"negative vector length {n} at offset {self.pos - 4}")
        return n

    # -- header -------------------------------------------------------------
    def header(self) -> None:
        fmt = bytes(self._take(2))
        if fmt == b"A\n":
            raise RDataError("ASCII R serialization ('A\\n') is not supported; only XDR binary ('X\\n')")
        if fmt == b"B\n":
            raise RDataError("native binary R serialization ('B\\n') is not supported; only XDR binary ('X\\n')")
        if fmt != b"X\n":
            raise RDataError(f"not an R XDR serialization (format bytes {fmt!r}, expected b'X\\n')")
        self.version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader R version
        if self.version == 3:
            nelen = self.int()
            self.native_encoding = bytes(self._take(nelen)).decode("ascii", "replace")
        elif self.version != 2:
            raise RDataError(f"unsupported R serialization version {self.version} (supported: 2, 3)")

    # -- items --------------------------------------------------------------
    def string_vec(self) -> RVector:
        # InStringVec: used by PERSISTSXP / NAMESPACESXP / PACKAGESXP
        if self.int() != 0:
            raise RDataError("names in persistent strings are not supported")
        n = self.length()
        return RVector([self.item() for _ in range(n)], "STRSXP")

    def charsxp(self, levels: int) -> Optional[str]:
        n = self.int()
        if n == -1:
            return None  # NA_STRING
        raw = bytes(self._take(n))
        if levels & _BYTES_MASK:
            return raw.decode("latin-1")  # arbitrary bytes: keep 1:1 mapping
        if levels & _LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & (_UTF8_MASK | _ASCII_MASK):
            return raw.decode("utf-8", "replace")
        enc = self.native_encoding.lower().replace("-", "")
        if enc in ("latin1", "iso88591"):
            return raw.decode("latin-1")
        return raw.decode("utf-8", "replace")

    def item(self) -> Any:
        flags = self.int()
        t = flags & 0xFF
        levels = flags >> 12
        is_obj = bool(flags & (1 << 8))
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if t == NILVALUE_SXP:
            return None
        if t == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            if not 1 <= idx <= len(self.refs):
                raise RDataError(f"bad reference index {idx} (table has {len(self.refs)})")
            return self.refs[idx - 1]
        if t in _SPECIALS:
            return _SPECIALS[t]
        if t == PERSISTSXP:
            v = RObject("PERSISTSXP", names=self.string_vec())
            self.refs.append(v)
            return v
        if t in (NAMESPACESXP, PACKAGESXP):
            v = RObject(_type_name(t), info=self.string_vec())
            self.refs.append(v)
            return v
        if t == SYMSXP:
            name = self.item()  # a CHARSXP
            sym = RSymbol(name if name is not None else "NA")
            self.refs.append(sym)
            return sym
        if t == ENVSXP:
            env = REnvironment()
            env.locked = bool(self.int())
            self.refs.append(env)
            env.enclos = self.item()
            frame = self.item()
            hashtab = self.item()
            attr = self.item()
            if isinstance(frame, RPairList):
                env.update(frame.as_dict())
            if isinstance(hashtab, RVector):
                for bucket in hashtab:
                    if isinstance(bucket, RPairList):
                        env.update(bucket.as_dict())
            env.attributes = _attrs_to_dict(attr)
            return env
        if t in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP):
            return self.pairlist(t, flags)
        if t == ALTREP_SXP:
            return self.altrep()
        if t in (BCODESXP, BCREPDEF, CLASSREFSXP, GENERICREFSXP):
            raise RDataError(f"unsupported R object type {_type_name(t)} in serialization")

        # vector-like and other non-pairlist types
        if t == EXTPTRSXP:
            v = RObject("EXTPTRSXP")
            self.refs.append(v)
            v.fields["prot"] = self.item()
            v.fields["tag"] = self.item()
        elif t == WEAKREFSXP:
            v = RObject("WEAKREFSXP")
            self.refs.append(v)
        elif t in (SPECIALSXP, BUILTINSXP):
            n = self.int()
            v = RObject(_type_name(t), name=bytes(self._take(n)).decode("ascii", "replace"))
        elif t == CHARSXP:
            return self.charsxp(levels)  # CHARSXPs carry no attributes in practice
        elif t in (LGLSXP, INTSXP):
            n = self.length()
            vals = struct.unpack(f">{n}i", self._take(4 * n))
            if t == LGLSXP:
                v = RVector([None if x == NA_INTEGER else bool(x) for x in vals], "LGLSXP")
            else:
                v = RVector([None if x == NA_INTEGER else x for x in vals], "INTSXP")
        elif t == REALSXP:
            n = self.length()
            v = RVector(struct.unpack(f">{n}d", self._take(8 * n)), "REALSXP")
        elif t == CPLXSXP:
            n = self.length()
            vals = struct.unpack(f">{2 * n}d", self._take(16 * n))
            v = RVector([complex(vals[2 * i], vals[2 * i + 1]) for i in range(n)], "CPLXSXP")
        elif t == STRSXP:
            n = self.length()
            out = []
            for _ in range(n):
                f2 = self.int()
                if f2 & 0xFF != CHARSXP:
                    raise RDataError(f"STRSXP element is {_type_name(f2 & 0xFF)}, expected CHARSXP")
                out.append(self.charsxp(f2 >> 12))
            v = RVector(out, "STRSXP")
        elif t in (VECSXP, EXPRSXP):
            n = self.length()
            v = RVector([self.item() for _ in range(n)], _type_name(t))
        elif t == RAWSXP:
            n = self.length()
            v = RVector(bytes(self._take(n)), "RAWSXP")
        elif t == S4SXP:
            v = RObject("S4SXP")
        else:
            raise RDataError(f"unsupported R object type {_type_name(t)} (code {t}) at offset {self.pos - 4}")
        if has_attr:
            v.attributes = _attrs_to_dict(self.item())
        return v

    def pairlist(self, t: int, flags: int) -> Any:
        # Iterative over the CDR chain so long pairlists do not hit recursion limits.
        rtype = _type_name(t)
        if t == ATTRLANGSXP:
            rtype = "LANGSXP"
        elif t == ATTRLISTSXP:
            rtype = "LISTSXP"
        result = RPairList(rtype=rtype)
        if t == CLOSXP or t == PROMSXP:
            attr = self.item() if flags & (1 << 9) else None
            env = self.item() if flags & (1 << 10) else None
            car = self.item()
            cdr = self.item()
            obj = RObject(rtype, env=env, car=car, cdr=cdr)
            obj.attributes = _attrs_to_dict(attr)
            return obj
        first = True
        while True:
            has_attr = bool(flags & (1 << 9)) or t in (ATTRLANGSXP, ATTRLISTSXP)
            has_tag = bool(flags & (1 << 10))
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            if first:
                result.attributes = _attrs_to_dict(attr)
                first = False
            result.append(self.item())
            result.tags.append(str(tag) if tag is not None else None)
            # peek at the CDR
            save = self.pos
            nflags = self.int()
            nt = nflags & 0xFF
            if nt == NILVALUE_SXP:
                return result
            if nt in (LISTSXP, LANGSXP, DOTSXP) and not (nflags & (1 << 9)):
                flags, t = nflags, nt
                continue
            # unusual CDR (attributes on an inner cell, dotted pair...): read it generically
            self.pos = save
            rest = self.item()
            if isinstance(rest, RPairList):
                result.extend(rest)
                result.tags.extend(rest.tags)
            else:
                result.append(rest)
                result.tags.append(None)
            return result

    def altrep(self) -> Any:
        info = self.item()
        state = self.item()
        attr = self.item()
        cls = str(info[0]) if isinstance(info, RPairList) and len(info) else "?"
        if cls == "compact_intseq":
            n, start, incr = (int(x) for x in state[:3])
            v = RVector([start + i * incr for i in range(n)], "INTSXP")
        elif cls == "compact_realseq":
            n, start, incr = int(state[0]), float(state[1]), float(state[2])
            v = RVector([start + i * incr for i in range(n)], "REALSXP")
        elif cls.startswith("wrap_"):
            inner = state[0]
            v = RVector(list(inner), getattr(inner, "rtype", "VECSXP"), dict(getattr(inner, "attributes", {})))
        elif cls == "deferred_string":
            arg = state[0] if isinstance(state, RPairList) else state
            vals = ["NA" if x is None else _format_number(x) for x in arg]
            v = RVector(vals, "STRSXP")
        else:
            raise RDataError(f"unsupported ALTREP class {cls!r} in serialization")
        if attr is not None:
            v.attributes.update(_attrs_to_dict(attr))
        return v


def _format_number(x: Any) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if x.is_integer() and abs(x) < 1e15:
            return str(int(x))
        return repr(x)
    return str(x)


def unserialize(data: bytes) -> Any:
    """Decode one uncompressed R XDR serialization (``serialize(x, NULL)`` bytes)."""
    r = _Reader(bytes(data))
    r.header()
    return r.item()


def _decompress_stream(data: bytes) -> bytes:
    """Decompress a whole ``.rds``-style file by sniffing its magic bytes."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def read_rds(path: Union[str, os.PathLike]) -> Any:
    """Read an ``.rds`` file (gzip/bzip2/xz/uncompressed XDR serialization)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return unserialize(_decompress_stream(data))
    except RDataError as e:
        raise RDataError(f"{path}: {e}") from e


def _decompress_record(rec: bytes, compressed: int) -> bytes:
    """Decompress one lazy-load DB record as R's ``lazyLoadDBfetch`` does."""
    if len(rec) < 4:
        raise RDataError("lazy-load record shorter than its 4-byte length header")
    outlen = struct.unpack(">I", rec[:4])[0]
    if compressed in (2, 3):
        kind = rec[4:5]
        body = rec[5:]
        if kind == b"0":
            out = body
        elif kind == b"1":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"Z":
            out = lzma.decompress(body, format=lzma.FORMAT_XZ) if body[:6] == b"\xfd7zXZ\x00" else \
                lzma.decompress(body, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
        else:
            raise RDataError(f"unknown lazy-load record compression tag {kind!r}")
    elif compressed:
        out = zlib.decompress(rec[4:])
    else:
        out = rec
        return out
    if len(out) != outlen:
        raise RDataError(f"lazy-load record decompressed to {len(out)} bytes, header says {outlen}")
    return out


class LazyLoadDB:
    """An R lazy-load database: ``<base>.rdx`` index + ``<base>.rdb`` records.

    >>> db = LazyLoadDB(".../janeaustenr/data/Rdata")   # doctest: +SKIP
    >>> db.names()                                      # doctest: +SKIP
    >>> db["emma"]                                      # doctest: +SKIP
    """

    def __init__(self, base: Union[str, os.PathLike]) -> None:
        base = os.fspath(base)
        for ext in (".rdx", ".rdb"):
            if base.endswith(ext):
                base = base[: -len(ext)]
        self.base = base
        self.rdx_path = base + ".rdx"
        self.rdb_path = base + ".rdb"
        for p in (self.rdx_path, self.rdb_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"lazy-load database file not found: {p}")
        index = read_rds(self.rdx_path)
        if not isinstance(index, RVector) or index.names is None:
            raise RDataError(f"{self.rdx_path}: index is not a named list")
        idx = dict(zip(index.names, index))
        if "variables" not in idx:
            raise RDataError(f"{self.rdx_path}: index has no 'variables' component")
        self.variables: Dict[str, Tuple[int, int]] = self._positions(idx["variables"])
        self.references: Dict[str, Tuple[int, int]] = self._positions(idx.get("references"))
        comp = idx.get("compressed")
        c = comp[0] if comp is not None and len(comp) else True
        self.compressed = int(c) if c is not None else 1

    @staticmethod
    def _positions(lst: Any) -> Dict[str, Tuple[int, int]]:
        if lst is None:
            return {}
        names = lst.names or []
        return {str(n): (int(v[0]), int(v[1])) for n, v in zip(names, lst)}

    def names(self) -> List[str]:
        return list(self.variables)

    def raw(self, name: str) -> bytes:
        """Uncompressed serialization bytes of variable ``name``."""
        if name not in self.variables:
            raise KeyError(f"{name!r} not in lazy-load DB {self.base} (has: {', '.join(self.variables)})")
        off, n = self.variables[name]
        with open(self.rdb_path, "rb") as f:
            f.seek(off)
            rec = f.read(n)
        if len(rec) != n:
            raise RDataError(f"{self.rdb_path}: record {name!r} truncated ({len(rec)} of {n} bytes)")
        return _decompress_record(rec, self.compressed)

    def __getitem__(self, name: str) -> Any:
        try:
            return unserialize(self.raw(name))
        except RDataError as e:
            raise RDataError(f"{self.rdb_path}[{name!r}]: {e}") from e

    def __contains__(self, name: object) -> bool:
        return name in self.variables

    def __iter__(self):
        return iter(self.variables)

    def __len__(self) -> int:
        return len(self.variables)


def as_python(x: Any) -> Any:
    """Convert reader output to plain Python: data frames -> dict of columns,
    named vectors/lists -> dict, length-1 unnamed atomic vectors stay lists."""
    if isinstance(x, RVector):
        cls = x.attributes.get("class")
        items = [as_python(v) for v in x] if x.rtype in ("VECSXP", "EXPRSXP") else list(x)
        if x.rtype == "INTSXP" and cls is not None and "factor" in cls:
            levels = list(x.attributes.get("levels") or [])
            items = [None if v is None else levels[v - 1] for v in items]
        names = x.names
        if names is not None and len(names) == len(items):
            return dict(zip(names, items))
        return items
    if isinstance(x, RPairList):
        if any(t is not None for t in x.tags):
            return {t: as_python(v) for t, v in zip(x.tags, x)}
        return [as_python(v) for v in x]
    return x
