"""Grammar-based differential fuzzing of the legacy reader against plain torch.

    python fuzz/gen_pickle.py SECONDS [SEED] [--save-all DIR]

Generates torch checkpoints from the opcode and global subset that torch's weights_only
unpickler accepts (zip and pre-1.6): random nesting, memo puts and gets, shared and viewed
storages, keys referenced with several storage types (the first reference decides),
every dtype, Parameters, OrderedDict ``_metadata``, storage keys and archive names with
odd bytes (NUL, non-ASCII, very long), and zip layout variations (archive folder,
alignment, record order, extra and compressed records, zip64 end records). Each file is
loaded by plain torch (``torch_safetensors._torch._orig_load``) and through the wrapper in
every mmap and map_location mode, and the results are compared: types, key order,
``_metadata``, dtypes, shapes, strides, storage offsets, bytes, requires_grad, which
tensors share storage, which objects are the same object, and the exception class.

The one accepted difference: with mmap=True the wrapper refuses a file whose records it
cannot prove hold what the pickle claims, where plain torch would map other bytes. Such a
refusal counts as justified only when plain torch without mmap refuses the file too or
gives other values. Prints counts; exits 1 on the first disagreement and saves the file
under fuzz/build/gen-artifacts/ (copy it to fuzz/regressions/gen/ and it becomes a test).

The builders (:class:`Pickle`, :func:`zip_bytes`, :func:`pre16_bytes`) are also used by
tests/test_legacy_parity.py to write its files from raw bytes.
"""
from __future__ import annotations

import io
import os
import random
import struct
import sys
import tempfile
import time
import warnings
import zlib
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

# ---- the pickle assembler ----


class Pickle:
    """Protocol-2 pickle bytes, opcode by opcode (only those torch's weights_only reads)."""

    def __init__(self) -> None:
        self.b = bytearray(b"\x80\x02")
        self.memo = 0

    def op(self, raw: bytes) -> "Pickle":
        self.b += raw
        return self

    def none(self) -> "Pickle":
        return self.op(b"N")

    def bool(self, v: bool) -> "Pickle":
        return self.op(b"\x88" if v else b"\x89")

    def int(self, v: int, how: Optional[str] = None) -> "Pickle":
        if how is None:
            how = "K" if 0 <= v < 256 else "M" if 0 <= v < 65536 else "J" if -2**31 <= v < 2**31 else "L"
        if how == "K":
            return self.op(b"K" + bytes([v]))
        if how == "M":
            return self.op(b"M" + struct.pack("<H", v))
        if how == "J":
            return self.op(b"J" + struct.pack("<i", v))
        n = (v.bit_length() + 8) // 8 if v else 0
        return self.op(b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True))

    def float(self, v: float) -> "Pickle":
        return self.op(b"G" + struct.pack(">d", v))

    def str(self, s: Any) -> "Pickle":
        raw = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
        return self.op(b"X" + struct.pack("<I", len(raw)) + raw)

    def short_binstring(self, raw: bytes) -> "Pickle":
        return self.op(b"U" + bytes([len(raw)]) + raw)

    def glob(self, mod: str, name: str) -> "Pickle":
        return self.op(b"c" + mod.encode() + b"\n" + name.encode() + b"\n")

    def mark(self) -> "Pickle":
        return self.op(b"(")

    def tuple(self, n: Optional[int] = None) -> "Pickle":
        """TUPLE from a MARK (n None), or EMPTY_TUPLE/TUPLE1-3 over the top n items."""
        return self.op(b"t" if n is None else [b")", b"\x85", b"\x86", b"\x87"][n])

    def put(self) -> int:
        i = self.memo
        self.memo += 1
        self.op(b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i))
        return i

    def get(self, i: int) -> "Pickle":
        return self.op(b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i))

    def stop(self) -> bytes:
        self.b += b"."
        return bytes(self.b)


# ---- containers: torch's zip and the pre-1.6 stream ----


def zip_bytes(records: List[Tuple[bytes, bytes]], *, align: int = 64, deflate: Tuple[bytes, ...] = (),
              zip64: bool = False, cd_size_delta: int = 0, local_names: Optional[Dict[bytes, bytes]] = None) -> bytes:
    """A zip of records (name, data) in this order, as torch's writer lays it out: stored,
    each record's data aligned to `align` through the local header's extra field.
    deflate: names to compress; zip64: zip64 end records; cd_size_delta: added to the
    central directory size in the end record; local_names: other names for local headers."""
    out = bytearray()
    central = bytearray()
    for name, data in records:
        method = 8 if name in deflate else 0
        body = data
        if method:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            body = c.compress(data) + c.flush()
        lname = (local_names or {}).get(name, name)
        off = len(out)
        base = off + 30 + len(lname)
        pad = 0
        if align > 1 and method == 0:
            pad = (-(base + 4)) % align + 4  # an extra field of at least its 4-byte header
        extra = b"FB" + struct.pack("<H", pad - 4) + b"Z" * (pad - 4) if pad else b""
        crc = zlib.crc32(data)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(body), len(data),
                           len(lname), len(extra)) + lname + extra + body
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(body),
                               len(data), len(name), 0, 0, 0, 0, 0, off) + name
    cd_off = len(out)
    out += central
    n = len(records)
    if zip64:
        rec_off = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(central) + cd_size_delta, cd_off)
        out += struct.pack("<IIQI", 0x07064B50, 0, rec_off, 1)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central) + cd_size_delta, cd_off, 0)
    return bytes(out)


def torch_records(prefix: bytes, pkl: bytes, storages: List[Tuple[bytes, bytes]], *,
                  extra: List[Tuple[bytes, bytes]] = (), byteorder: bool = True) -> List[Tuple[bytes, bytes]]:
    """The records torch.save writes, in its order: data.pkl, byteorder, data/<key>...,
    version, .data/serialization_id (plus extra records at the end)."""
    recs = [(prefix + b"data.pkl", pkl)]
    if byteorder:
        recs.append((prefix + b"byteorder", b"little"))
    recs += [(prefix + b"data/" + k, d) for k, d in storages]
    recs += [(prefix + b".data/version", b"3\n"), (prefix + b"version", b"3\n"),
             (prefix + b".data/serialization_id", b"1234567890")]
    return recs + list(extra)


PRE16_MAGIC = 0x1950A86A20F9469CFC6C


def pre16_bytes(obj_pkl: bytes, keys: List[bytes], storages: Dict[bytes, bytes], counts: Dict[bytes, int]) -> bytes:
    """A pre-1.6 file: magic, protocol, sys_info, the object, the key list, and per key
    its 8-byte element count and bytes."""
    out = bytearray(Pickle().int(PRE16_MAGIC).stop())
    out += Pickle().int(1001).stop()
    p = Pickle().op(b"}").mark()
    p.str("protocol_version").int(1001).str("little_endian").bool(True).str("type_sizes").op(b"}").mark()
    for k, v in (("short", 2), ("int", 4), ("long", 4)):
        p.str(k).int(v)
    p.op(b"u").op(b"u")
    out += p.stop()
    out += obj_pkl
    kp = Pickle().op(b"]").mark()
    for k in keys:
        kp.str(k)
    out += kp.op(b"e").stop()
    for k in keys:
        out += struct.pack("<q", counts[k]) + storages[k]
    return bytes(out)


# ---- the generator ----

# (storage type global, dtype name, element size); None: torch.storage.UntypedStorage
STYPES = [("DoubleStorage", "float64", 8), ("FloatStorage", "float32", 4), ("HalfStorage", "float16", 2),
          ("BFloat16Storage", "bfloat16", 2), ("LongStorage", "int64", 8), ("IntStorage", "int32", 4),
          ("ShortStorage", "int16", 2), ("CharStorage", "int8", 1), ("ByteStorage", "uint8", 1),
          ("BoolStorage", "bool", 1), ("ComplexDoubleStorage", "complex128", 16),
          ("ComplexFloatStorage", "complex64", 8), (None, "uint8", 1)]
DTYPES = [("float64", 8), ("float32", 4), ("float16", 2), ("bfloat16", 2), ("int64", 8), ("int32", 4),
          ("int16", 2), ("int8", 1), ("uint8", 1), ("bool", 1), ("complex128", 16), ("complex64", 8),
          ("complex32", 4), ("uint16", 2), ("uint32", 4), ("uint64", 8), ("float8_e4m3fn", 1),
          ("float8_e5m2", 1), ("float8_e4m3fnuz", 1), ("float8_e5m2fnuz", 1), ("float8_e8m0fnu", 1),
          ("float4_e2m1fn_x2", 1)]
GRAD_OK = {"float64", "float32", "float16", "bfloat16", "complex128", "complex64"}


def odd_name(rnd: random.Random) -> bytes:
    return rnd.choice([b"0", b"1", b"12", b"k", b"0\x00x", b"1\x00", b"\xc3\xa9", b"a b", b"x" * rnd.choice([300, 5000]),
                       b"0/1", b"\x00", b"K", b"\xe2\x82\xac\x00\x01", b"-1", b"\x7f"])


class Gen:
    """One random checkpoint: a pickle over a pool of storage keys."""

    def __init__(self, rnd: random.Random, pre16: bool) -> None:
        self.r = rnd
        self.pre16 = pre16
        self.p = Pickle()
        self.done: List[int] = []       # memo indices of finished values
        self.keys: List[bytes] = []
        self.data: Dict[bytes, bytes] = {}
        self.first: Dict[bytes, Tuple[str, int]] = {}  # key -> (dtype, nbytes) of the first reference
        self.depth = 0
        for i in range(rnd.randint(1, 5)):
            k = odd_name(rnd) if rnd.random() < 0.3 else str(i).encode()
            if k not in self.data:
                self.keys.append(k)
                self.data[k] = bytes(rnd.getrandbits(8) for _ in range(rnd.choice([0, 8, 16, 32, 48, 64, 96])))

    # -- leaves --

    def maybe_put(self) -> None:
        if self.r.random() < 0.8:
            self.done.append(self.p.put())

    def leaf(self) -> None:
        r, p = self.r, self.p
        c = r.randrange(12)
        if c == 0:
            p.none()
        elif c == 1:
            p.bool(r.random() < 0.5)
        elif c == 2:
            p.int(r.choice([0, 1, 255, 256, 65535, 65536, -1, 2**31 - 1, -2**31, 2**40, -2**63, 2**64, 2**100]))
        elif c == 3:
            p.float(r.choice([0.0, -0.0, 1.5, float("inf"), float("nan"), 1e-300]))
        elif c == 4:
            p.str(r.choice(["a", "", "weight", "é", "\x00", "a\nb", "\ud800", "x" * 300]))
        elif c == 5:
            p.short_binstring(r.choice([b"abc", b"", b"\xc3\xa9"]))
        elif c == 6:
            p.glob("torch", r.choice(DTYPES)[0])
        elif c == 7:
            p.glob("torch", "device").str(r.choice(["cpu", "meta"]))
            if r.random() < 0.5:
                p.int(0).tuple(2)
            else:
                p.tuple(1)
            p.op(b"R")
        elif c == 8:
            p.glob("torch", "Size").mark()
            for _ in range(r.randint(0, 3)):
                p.int(r.randint(0, 9))
            p.tuple().tuple(1).op(b"R")
        elif c == 9:
            p.glob("_codecs", "encode").str(r.choice(["abc", "é", ""])).str("latin1").tuple(2).op(b"R")
        elif c == 10 and self.done:
            p.get(r.choice(self.done))
            return
        else:
            p.op(b")")
        self.maybe_put()

    # -- storages and tensors --

    def persid(self, untyped: bool = False) -> Tuple[bytes, str, int]:
        """A persistent id; returns (key, dtype, nbytes) of the storage torch will use."""
        r, p = self.r, self.p
        key = r.choice(self.keys)
        st = (None, "uint8", 1) if untyped else r.choice(STYPES[:-1] if self.pre16 else STYPES)
        nbytes = len(self.data[key])
        numel = nbytes // st[2]
        if r.random() < 0.05:
            numel += r.choice([-1, 1])
        numel = max(numel, 0)
        p.mark().str("storage")
        if st[0] is None:
            p.glob("torch.storage", "UntypedStorage")
        else:
            p.glob("torch", st[0])
        p.str(key).str(r.choice(["cpu"] * 20 + ["cuda:0", "meta"])).int(numel)
        if self.pre16:
            if r.random() < 0.1:
                p.mark().str(key + b"v").int(r.randint(0, 2)).int(r.randint(0, 2)).tuple()
            else:
                p.none()
        p.tuple().op(b"Q")
        if key not in self.first or self.first[key][1] == 0:
            self.first[key] = (st[1], numel * st[2])
        return key, self.first[key][0], self.first[key][1]

    def shape(self, numel: int) -> Tuple[List[int], List[int], int]:
        r = self.r
        if numel == 0 or r.random() < 0.1:
            return ([0], [1], 0) if r.random() < 0.5 or numel == 0 else ([], [], 0)
        off = r.randint(0, numel - 1) if r.random() < 0.3 else 0
        n = numel - off
        if r.random() < 0.5:
            return [n], [1], off
        if r.random() < 0.5 and n >= 2:
            a = r.choice([d for d in range(1, n + 1) if n % d == 0])
            return [a, n // a], [n // a, 1], off
        # transposed / strided / overlapping views
        a = max(1, n // 2)
        return [2, a // 2 or 1], [1, 2], off if n >= 2 else 0

    def tensor(self) -> None:
        r, p = self.r, self.p
        v3 = not self.pre16 and r.random() < 0.25
        p.glob("torch._utils", "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2").mark()
        key, dtype, nbytes = self.persid(untyped=v3)
        esz = 1
        if v3:
            dtype, esz = r.choice(DTYPES)
        else:
            esz = dict(DTYPES)[dtype]
        sizes, strides, off = self.shape(nbytes // esz)
        if r.random() < 0.05:
            off += 1
        p.int(off)
        for dims in (sizes, strides):
            p.mark()
            for d in dims:
                p.int(d)
            p.tuple()
        p.bool(r.random() < (0.2 if dtype in GRAD_OK and not v3 else 0.02))
        p.glob("collections", "OrderedDict").tuple(0).op(b"R")
        if v3:
            p.glob("torch", dtype)
        p.tuple().op(b"R")

    def param4(self) -> None:
        r, p = self.r, self.p
        p.glob("torch._utils", "_rebuild_parameter_with_state").mark()
        self.tensor()
        p.bool(r.random() < 0.5).glob("collections", "OrderedDict").tuple(0).op(b"R")
        if r.random() < 0.5:
            p.none()
        else:
            p.op(b"}")
        p.tuple().op(b"R")

    # -- containers --

    def value(self) -> None:
        r = self.r
        self.depth += 1
        c = r.random()
        if self.depth > 6 or c < 0.3:
            self.leaf()
        elif c < 0.5:
            self.tensor()
            self.maybe_put()
        elif c < 0.56:
            if r.random() < 0.5:
                p = self.p
                p.glob("torch._utils", "_rebuild_parameter").mark()
                self.tensor()
                p.bool(r.random() < 0.5).glob("collections", "OrderedDict").tuple(0).op(b"R").tuple().op(b"R")
            else:
                self.param4()
            self.maybe_put()
        elif c < 0.7:
            self.dict(odict=False)
        elif c < 0.8:
            self.dict(odict=True)
        elif c < 0.9:
            self.list()
        else:
            self.tuple()
        self.depth -= 1

    def dict(self, odict: bool) -> None:
        r, p = self.r, self.p
        if odict:
            p.glob("collections", "OrderedDict").tuple(0).op(b"R")
        else:
            p.op(b"}")
        self.maybe_put()
        n = r.randint(0, 4)
        one_by_one = r.random() < 0.3
        if not one_by_one and n:
            p.mark()
        for i in range(n):
            if r.random() < 0.8:
                p.str(r.choice(["w", "b", "layer.0.weight", "é", "", str(i)]) + str(i))
            else:
                p.int(i)
            self.value()
            if one_by_one:
                p.op(b"s")
        if not one_by_one and n:
            p.op(b"u")
        if odict and r.random() < 0.6:
            # BUILD: {'_metadata': OrderedDict of {prefix: {'version': n}}}
            p.op(b"}").str("_metadata").glob("collections", "OrderedDict").tuple(0).op(b"R")
            p.mark()
            for k in ["", "layer"][: r.randint(0, 2)]:
                p.str(k).op(b"}").str("version").int(r.randint(1, 3)).op(b"s")
            p.op(b"u").op(b"s").op(b"b")

    def list(self) -> None:
        r, p = self.r, self.p
        p.op(b"]")
        self.maybe_put()
        n = r.randint(0, 4)
        if r.random() < 0.5:
            for _ in range(n):
                self.value()
                p.op(b"a")
        elif n:
            p.mark()
            for _ in range(n):
                self.value()
            p.op(b"e")

    def tuple(self) -> None:
        r, p = self.r, self.p
        n = r.randint(0, 5)
        if n <= 3 and r.random() < 0.5:
            for _ in range(n):
                self.value()
            p.tuple(n)
        else:
            p.mark()
            for _ in range(n):
                self.value()
            p.tuple()
        self.maybe_put()

    def pickle(self) -> bytes:
        if self.r.random() < 0.1:
            self.persid()  # an unused reference left on the stack: it still decides the dtype
        if self.r.random() < 0.7:
            self.dict(odict=self.r.random() < 0.4)
        else:
            self.value()
        return self.p.stop()

    # -- the file --

    def file(self) -> bytes:
        r = self.r
        pkl = self.pickle()
        if self.pre16:
            keys = [k for k in self.keys if k in self.first]
            r.shuffle(keys)
            counts = {}
            data = {}
            for k in keys:
                dtype, nbytes = self.first[k]
                esz = dict(DTYPES)[dtype]
                data[k] = self.data[k][: nbytes] if nbytes <= len(self.data[k]) else self.data[k] + b"\0" * (nbytes - len(self.data[k]))
                counts[k] = len(data[k]) // esz + (1 if r.random() < 0.03 else 0)
            return pre16_bytes(pkl, keys, data, counts)
        prefix = r.choice([b"archive/", b"archive/", b"model/", b"a b/", b"\xc3\xa9/", b"x" * 200 + b"/", b"Archive/"])
        stor = [(k, self.data[k]) for k in self.keys]
        if r.random() < 0.05 and stor:
            k, d = stor[0]
            stor[0] = (k, d[: len(d) // 2])  # a short record
        extra = []
        if r.random() < 0.2:
            extra.append((prefix + r.choice([b".format_version", b".storage_alignment", b"extra/x", b"constants.pkl\x00",
                                             b"Constants.pkl", b"data/zz"]), r.choice([b"1", b"64", b"junk"])))
        recs = torch_records(prefix, pkl, stor, extra=extra, byteorder=r.random() < 0.9)
        for _ in range(2 if r.random() < 0.15 else 0):
            # names equal but for case (or equal): torch's zip library picks one of them
            name, data = r.choice(recs)
            head, tail = name[: len(prefix)], name[len(prefix):]
            twin = head + (tail.upper() if r.random() < 0.7 else tail)
            recs.insert(r.randrange(1, len(recs) + 1), (twin, r.choice([data[: len(data) // 2], data + data, b"\x80\x02}."])))
        if r.random() < 0.3:
            first = recs[0]
            rest = recs[1:]
            r.shuffle(rest)
            recs = [first] + rest if r.random() < 0.7 else rest + [first]
        deflate = tuple(n for n, _ in recs if r.random() < 0.05)
        return zip_bytes(recs, align=r.choice([64, 64, 1, 8, 4096]), deflate=deflate, zip64=r.random() < 0.15,
                         cd_size_delta=4 if r.random() < 0.03 else 0)


# ---- comparison with plain torch ----


def _raw(s: Any) -> bytes:
    """A CPU storage's bytes (bytes(storage) goes element by element: slow)."""
    import torch

    t = torch.empty(0, dtype=torch.uint8).set_(s, 0, (s.nbytes(),), (1,))
    return t.numpy().tobytes()


def same(a: Any, b: Any, path: str = "obj", ids: Optional[dict] = None, ptrs: Optional[dict] = None) -> None:
    """a (plain torch) and b (the wrapper) are equal in every respect, including which
    values are one object and which tensors share memory. Raises AssertionError."""
    import torch

    ids = {} if ids is None else ids
    ptrs = {} if ptrs is None else ptrs
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, (list, dict, tuple, torch.Tensor)) and not (isinstance(a, tuple) and not a):
        seen = ("a", id(a)) in ids
        assert ids.setdefault(("a", id(a)), id(b)) == id(b), (path, "identity")
        assert ids.setdefault(("b", id(b)), id(a)) == id(a), (path, "identity")
        if seen:
            return  # compared where it was first met (and cycles end here)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.device == b.device, (path, a.dtype, b.dtype, a.device, b.device)
        assert a.shape == b.shape and a.stride() == b.stride(), (path, a.shape, b.shape, a.stride(), b.stride())
        assert a.storage_offset() == b.storage_offset(), path
        assert a.requires_grad == b.requires_grad, path
        assert type(a._backward_hooks) is type(b._backward_hooks), path
        sa, sb = a.untyped_storage(), b.untyped_storage()
        assert sa.nbytes() == sb.nbytes(), (path, sa.nbytes(), sb.nbytes())
        if a.device.type != "meta":
            assert _raw(sa) == _raw(sb), (path, "bytes")
            # a storage whose mapped bytes are misaligned for its dtype is copied (DESIGN.md:
            # some kernels crash on such pointers): it shares nothing, by design
            if sa.nbytes() and sa.data_ptr() % a.element_size() == 0:
                assert ptrs.setdefault(("a", sa.data_ptr()), sb.data_ptr()) == sb.data_ptr(), (path, "sharing")
                assert ptrs.setdefault(("b", sb.data_ptr()), sa.data_ptr()) == sa.data_ptr(), (path, "sharing")
        return
    if isinstance(a, dict):
        assert list(a) == list(b), (path, "keys")
        if isinstance(a, OrderedDict):
            assert list(vars(a)) == list(vars(b)), path
            for k in vars(a):
                same(vars(a)[k], vars(b)[k], f"{path}.{k}", ids, ptrs)
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]", ids, ptrs)
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]", ids, ptrs)
        return
    if isinstance(a, float):
        assert (a != a and b != b) or (a == b and str(a) == str(b)), (path, a, b)
        return
    assert a == b, (path, a, b)


def modes() -> List[Dict[str, Any]]:
    import torch

    out = []
    for mmap in (False, True):
        for ml in (None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, {"cuda:0": "cpu"}, "meta",
                   lambda s, loc: s):
            out.append({"mmap": mmap, "map_location": ml})
    return out


def _load(fn: Any, path: str, kw: Dict[str, Any]) -> Tuple[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok", fn(path, weights_only=True, **kw)
    except Exception as e:  # noqa: BLE001 - compared by class
        return "error", e


def compare_file(path: str, kws: Optional[List[Dict[str, Any]]] = None) -> Dict[str, int]:
    """Loads path with plain torch and the wrapper in each mode; raises AssertionError
    on a disagreement. Returns counts (agree, justified mmap refusals)."""
    import torch

    from torch_safetensors import _legacy, _torch

    counts = {"agree": 0, "refused_mmap": 0, "both_error": 0, "torch_nondeterministic": 0}
    with open(path, "rb") as f:
        pre16 = f.read(4) != b"PK\x03\x04"
    for kw in kws or modes():
        want = _load(_torch._orig_load, path, kw)
        got = _load(torch.load, path, kw)
        # the wrapper handed the file to torch's own loader: what came back is torch's
        by_torch = _legacy.last_fallback is not None and not _legacy.last_fallback.startswith("refused")
        where = f"mmap={kw['mmap']} map_location={kw['map_location']!r}"
        if kw["mmap"] and want[0] == "error" and got[0] == "ok" and pre16:
            # the wrapper maps pre-1.6 files, which plain torch refuses to: its in-memory load
            want = _load(_torch._orig_load, path, dict(kw, mmap=False))
        if want[0] == "ok" and got[0] == "ok":
            try:
                same(want[1], got[1])
            except AssertionError as e:
                # torch builds some tensors over uninitialized memory (a tensor over an
                # empty, resizable storage): such a file differs from itself
                again = _load(_torch._orig_load, path, kw)
                try:
                    same(want[1], again[1])
                except AssertionError:
                    counts["torch_nondeterministic"] += 1
                    continue
                if by_torch and "bytes" in e.args[0]:
                    counts["torch_nondeterministic"] += 1
                    continue
                raise AssertionError((where, *e.args)) from None
            counts["agree"] += 1
        elif want[0] == "error" and got[0] == "error":
            assert type(want[1]) is type(got[1]), (where, repr(want[1]), repr(got[1]))
            counts["both_error"] += 1
        elif want[0] == "ok" and kw["mmap"] and isinstance(got[1], RuntimeError) and "refusing to map" in str(got[1]):
            plain = _load(_torch._orig_load, path, dict(kw, mmap=False))
            if plain[0] == "ok":
                try:
                    same(want[1], plain[1])
                except AssertionError:
                    plain = ("differs", None)
            assert plain[0] != "ok", (where, "refused a file torch maps correctly", repr(got[1]))
            counts["refused_mmap"] += 1
        else:
            raise AssertionError((where, want[0], repr(want[1])[:300], got[0], repr(got[1])[:300]))
    return counts


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    secs = float(args[0])
    seed = int(args[1]) if len(args) > 1 else int(time.time())
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(here))
    import torch_safetensors  # noqa: F401 - installs the wrappers
    from torch_safetensors import _legacy

    rnd = random.Random(seed)
    totals = {"files": 0, "zip": 0, "pre16": 0, "reader": 0, "agree": 0, "refused_mmap": 0, "both_error": 0,
              "torch_nondeterministic": 0}
    deadline = time.monotonic() + secs
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.pt")
        while time.monotonic() < deadline:
            pre16 = rnd.random() < 0.3
            try:
                blob = Gen(rnd, pre16).file()
            except AssertionError:
                continue
            with open(path, "wb") as f:
                f.write(blob)
            totals["files"] += 1
            totals["pre16" if pre16 else "zip"] += 1
            try:
                c = compare_file(path)
            except AssertionError as e:
                art = os.path.join(here, "build", "gen-artifacts")
                os.makedirs(art, exist_ok=True)
                out = os.path.join(art, f"gen-{seed}-{totals['files']}.pt")
                with open(out, "wb") as f:
                    f.write(blob)
                print(f"DISAGREEMENT {e}; file saved to {out}", flush=True)
                print(totals, flush=True)
                sys.exit(1)
            for k, v in c.items():
                totals[k] += v
            # did the C reader itself read it (default mode)?
            import torch

            _load(torch.load, path, {})
            totals["reader"] += _legacy.last_fallback is None
    print(f"seed {seed}: {totals}", flush=True)


if __name__ == "__main__":
    main()
