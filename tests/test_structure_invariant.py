"""One invariant over the whole type table (issue 22, section 1).

For values drawn from every row of the README's "What a checkpoint can hold" table, alone,
nested, tied (one tensor object in several places) and inside containers (and as dict keys
where allowed):

- torch.save then torch.load gives an exact copy: types, bits, ties and key order;
- ``verify`` and ``verify --data`` (checksums recorded) say OK, with no allowlist;
- loading from a BytesIO and from a pipe gives the same as loading from the path;
- async_save writes the same bytes as torch.save;
- the safetensors package reads every tensor, with the bytes ours reads.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import io
import math
import os
import pathlib
import struct
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_safetensors
from torch_safetensors import _C, _cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@dataclasses.dataclass
class Point:
    x: int
    y: float


class Scaled(torch.Tensor):
    """The smallest traceable subclass (the "tsub" row): int8 codes times a per-row scale,
    the outer dtype and a block tuple in the flatten context."""

    @staticmethod
    def __new__(cls, codes, scale, block=(1,), dtype=torch.float32):
        r = torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype, device=codes.device)
        r.codes, r.scale, r.block, r.out_dtype = codes, scale, tuple(block), dtype
        return r

    def __tensor_flatten__(self):
        return ["codes", "scale"], {"block": self.block, "dtype": self.out_dtype}

    @classmethod
    def __tensor_unflatten__(cls, inner, ctx, outer_size, outer_stride):
        return cls(inner["codes"], inner["scale"], ctx["block"], ctx["dtype"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default, torch.ops.aten.clone.default):
            s = args[0]
            return cls(func(s.codes), func(s.scale), s.block, s.out_dtype)
        raise NotImplementedError(f"Scaled: {func}")

    def __repr__(self):  # hypothesis prints examples; torch's repr would need more operations
        return f"Scaled({self.codes!r}, {self.scale!r}, {self.block}, {self.out_dtype})"


def scaled(rows: int, cols: int, seed: int, dtype: torch.dtype = torch.float32) -> Scaled:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, generator=g)
    return Scaled(codes, torch.rand(rows, 1, generator=g) + 0.5, (1, cols), dtype)


ALLOWED = [Point, datetime.date, Scaled]  # what the loading process allows


# ---- strategies over the type table ----

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
           torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128, torch.uint16, torch.uint32,
           torch.float8_e4m3fn]
_FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([-0.0, math.nan, math.inf])
_KEYS = st.text(alphabet="abcxyz_0", min_size=1, max_size=4)


@st.composite
def dense(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    raw = torch.randint(0, 256, (max(1, math.prod(shape)) * torch.empty((), dtype=dtype).element_size(),),
                        dtype=torch.uint8, generator=gen)
    t = raw.view(dtype)[: math.prod(shape)].reshape(shape).clone()
    how = draw(st.sampled_from(["plain", "param", "grad", "conj", "transposed"]))
    if how in ("param", "grad") and (t.is_floating_point() or t.is_complex()) and dtype is not torch.float8_e4m3fn:
        t = torch.nn.Parameter(t) if how == "param" else t.requires_grad_(True)
    elif how == "conj" and t.is_complex():
        t = t.conj()
    elif how == "transposed" and t.dim() == 2:
        t = t.t()
    return t


@st.composite
def tensor_kind(draw):
    kind = draw(st.sampled_from(["coo", "csr", "bsr", "quant", "quant_channel", "nested", "jagged", "meta", "tsub"]))
    n = draw(st.integers(1, 4))
    if kind == "tsub":
        return scaled(n, draw(st.integers(0, 3)), draw(st.integers(0, 99)),
                      draw(st.sampled_from([torch.float32, torch.bfloat16])))
    base = torch.arange(float(n * n)).reshape(n, n) * (torch.rand(n, n) > 0.5)
    if kind == "coo":
        return base.to_sparse() if draw(st.booleans()) else torch.sparse_coo_tensor(
            [[0, 0], [1, 1]], [1.0, 2.0], (2, 2))  # uncoalesced
    if kind == "csr":
        return base.to_sparse_csr()
    if kind == "bsr":
        return torch.arange(16.0).reshape(4, 4).to_sparse_bsr((2, 2))
    if kind == "quant":
        return torch.quantize_per_tensor(base, draw(st.sampled_from([0.1, 0.5])), draw(st.integers(0, 5)),
                                         draw(st.sampled_from([torch.qint8, torch.quint8, torch.qint32])))
    if kind == "quant_channel":
        return torch.quantize_per_channel(base, torch.rand(n, dtype=torch.double) + 0.1,
                                          torch.randint(0, 5, (n,)), draw(st.integers(0, 1)), torch.quint8)
    if kind == "nested":
        return torch.nested.nested_tensor([torch.ones(draw(st.integers(0, 3))), torch.arange(2.0)])
    if kind == "jagged":
        return torch.nested.nested_tensor([torch.ones(2, 3), torch.arange(3.0 * n).reshape(n, 3)], layout=torch.jagged)
    return torch.empty(n, 2, device="meta", dtype=draw(st.sampled_from([torch.float32, torch.int64])))


_NP_DTYPES = ["<f4", ">f8", "<i2", ">i4", "|u1", "|b1", "<c8", ">c16", "<u8", "<f2"]


@st.composite
def numpy_value(draw):
    dt = np.dtype(draw(st.sampled_from(_NP_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    raw = np.frombuffer(np.random.default_rng(draw(st.integers(0, 99))).bytes(int(np.prod(shape)) * dt.itemsize),
                        dtype=np.uint8)
    arr = raw.view(dt.newbyteorder("=") if dt.kind == "b" else dt).reshape(shape)
    if dt.kind == "b":
        arr = (raw % 2).astype(bool).reshape(shape)
    kind = draw(st.sampled_from(["array", "scalar", "dtype"]))
    if kind == "array":
        return arr.copy()
    if kind == "dtype":
        return dt
    return np.dtype(dt.newbyteorder("=")).type(0) if arr.size == 0 else arr.reshape(-1)[:1].astype(
        dt.newbyteorder("="))[0]


_HASHABLE = st.recursive(
    st.none() | st.booleans() | st.integers() | _KEYS | st.binary(max_size=4) | st.sampled_from([torch.float16, 1.5]),
    lambda inner: st.tuples(inner, inner) | st.frozensets(st.integers(0, 9), max_size=3), max_leaves=4)

_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), _FLOATS, st.text(max_size=8),
    st.binary(max_size=8), st.binary(min_size=4096, max_size=4200), st.binary(max_size=6).map(bytearray),
    st.binary(min_size=4096, max_size=4100).map(bytearray),
    st.complex_numbers(allow_nan=False), st.builds(range, st.integers(-5, 5), st.integers(-5, 5), st.sampled_from([1, 2, -1])),
    st.builds(slice, st.integers(0, 3), st.none() | st.integers(0, 3), st.none() | st.just(2)),
    st.sampled_from([torch.float32, torch.bfloat16, torch.device("cpu"), torch.device("meta"), torch.Size([2, 3]),
                     torch.strided, torch.sparse_coo, torch.channels_last, pathlib.PurePosixPath("a/b"),
                     pathlib.PureWindowsPath("c:/x"), datetime.date(2024, 5, 1), Point(1, 2.5), Point]),
    numpy_value(),
)


@st.composite
def checkpoint(draw):
    """A tree over the type table whose tensors come from a small pool: ties."""
    pool = draw(st.lists(dense() | tensor_kind(), min_size=1, max_size=4))
    leaf = _LEAF | st.sampled_from(pool)

    def containers(inner):
        return st.one_of(
            st.dictionaries(_KEYS, inner, max_size=3),
            st.dictionaries(_KEYS, inner, max_size=3).map(collections.OrderedDict),
            st.dictionaries(_HASHABLE, inner, max_size=3),
            st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
            st.sets(st.integers(0, 9) | _KEYS, max_size=3), st.frozensets(st.integers(0, 9), max_size=3),
            st.dictionaries(_KEYS, inner, max_size=3).map(lambda d: argparse.Namespace(**d)),
            st.dictionaries(_KEYS, st.integers(0, 5), max_size=3).map(collections.Counter),
            st.dictionaries(_KEYS, inner, max_size=3).map(lambda d: collections.defaultdict(list, d)),
        )

    tree = draw(st.recursive(leaf, containers, max_leaves=8))
    return {"root": tree, "also": draw(st.lists(st.sampled_from(pool), max_size=3)),
            "leaves": draw(st.lists(_LEAF, min_size=1, max_size=4)),
            "numpy": draw(st.lists(numpy_value(), max_size=2)),
            "keys": draw(st.dictionaries(_HASHABLE, leaf, max_size=2)), "n": 1}


# ---- exact equality: types, bits, ties, key order ----


def _bits(t):
    t = t.detach().resolve_conj().resolve_neg()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _same_tensor(a, b):
    assert type(a) is type(b) and a.dtype == b.dtype and a.layout == b.layout and a.is_nested == b.is_nested
    assert a.requires_grad == b.requires_grad and a.device == b.device
    if not a.is_nested:
        # a contiguous tensor keeps its strides, but for dimensions of size 1, which
        # index nothing (torch calls [2, 1] with strides (1, 2) contiguous; it loads as (1, 1))
        assert a.shape == b.shape and (a.layout != torch.strided or not a.is_contiguous() or all(
            s == t for n, s, t in zip(a.shape, a.stride(), b.stride()) if n > 1))
    if a.device.type == "meta":
        return
    if a.is_nested:
        assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a.unbind(), b.unbind()))
    elif a.is_quantized:
        assert a.qscheme() == b.qscheme() and torch.equal(a.int_repr(), b.int_repr())
        if a.qscheme() == torch.per_tensor_affine:
            assert (a.q_scale(), a.q_zero_point()) == (b.q_scale(), b.q_zero_point())
        else:
            assert torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
            assert a.q_per_channel_axis() == b.q_per_channel_axis()
    elif a.layout == torch.sparse_coo:
        assert a.is_coalesced() == b.is_coalesced()
        assert torch.equal(a._indices(), b._indices()) and torch.equal(_bits(a._values()), _bits(b._values()))
    elif a.layout != torch.strided:
        assert torch.equal(a.to_dense(), b.to_dense())
    else:
        assert torch.equal(_bits(a), _bits(b))


def _same_traceable(a, b, ties):
    """A traceable subclass: same type, outer size and dtype, context and inner tensors."""
    assert type(a) is type(b)
    with torch._C.DisableTorchFunctionSubclass():
        assert a.shape == b.shape and a.dtype == b.dtype and a.requires_grad == b.requires_grad
    names_a, ctx_a = a.__tensor_flatten__()
    names_b, ctx_b = b.__tensor_flatten__()
    assert list(names_a) == list(names_b)
    same(ctx_a, ctx_b, ties)
    for name in names_a:
        same(getattr(a, name), getattr(b, name), ties)


def same(a, b, ties):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        if id(a) in ties and a.device.type != "meta":
            assert ties[id(a)] is b, "a tie was lost"
        ties[id(a)] = b
        if hasattr(type(a), "__tensor_flatten__") and not a.is_nested:
            _same_traceable(a, b, ties)
        else:
            _same_tensor(a, b)
        return
    assert type(a) is type(b), (type(a), type(b))
    if type(a) is float:
        assert struct.pack("<d", a) == struct.pack("<d", b), (a, b)  # a NaN's sign and payload too
    elif type(a) is complex:
        same(a.real, b.real, ties), same(a.imag, b.imag, ties)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert len(a) == len(b)
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            same(ka, kb, ties)
            same(va, vb, ties)
        if isinstance(a, collections.defaultdict):
            assert a.default_factory is b.default_factory
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y, ties)
    elif isinstance(a, argparse.Namespace):
        same(vars(a), vars(b), ties)
    elif type(a) is slice:  # its parts may be any values, nan among them
        same((a.start, a.stop, a.step), (b.start, b.stop, b.step), ties)
    elif isinstance(a, (set, frozenset)):
        assert len(a) == len(b)
        rest = list(b)
        for x in a:  # nan is not equal to itself: match each item by same()
            for i, y in enumerate(rest):
                try:
                    same(x, y, dict(ties))
                except AssertionError:
                    continue
                del rest[i]
                break
            else:
                raise AssertionError(f"{x!r} has no counterpart in the loaded set")
    else:
        try:
            equal = bool(a == b)
        except Exception:  # noqa: BLE001 - an object whose __eq__ needs state it was not given
            equal = False
        if not equal and hasattr(a, "__dict__"):
            same(vars(a), vars(b), ties)  # e.g. an allowed class rebuilt with partial state
            return
        assert equal, (a, b)


# ---- the invariant ----


def _pipe(data):
    r, w = os.pipe()

    def feed():
        with os.fdopen(w, "wb") as g:
            g.write(data)

    threading.Thread(target=feed, daemon=True).start()
    return os.fdopen(r, "rb")


@settings(max_examples=int(os.environ.get("TS_INVARIANT_EXAMPLES", "60")), deadline=None, suppress_health_check=list(HealthCheck))
@given(checkpoint())
def test_every_value_of_the_type_table_round_trips_exactly(tmp_path_factory, obj):
    d = tmp_path_factory.mktemp("inv")
    p = d / "ck.safetensors"
    with torch.serialization.safe_globals(ALLOWED):
        torch.save(obj, p, format="safetensors", checksums=True)
        data = p.read_bytes()
        back = torch.load(p)
        same(obj, back, {})
        same(obj, torch.load(io.BytesIO(data)), {})
        f = _pipe(data)
        try:
            same(obj, torch.load(f), {})
        finally:
            f.close()
    # verify without any allowlist; --data with the checksums recorded
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert _cli.main(["verify", str(p)]) == 0, out.getvalue()
        assert _cli.main(["verify", "--data", str(p)]) == 0, out.getvalue()
    # async_save writes what torch.save writes
    torch.save(obj, d / "sync.safetensors", format="safetensors")
    torch_safetensors.async_save(obj, d / "async.safetensors").result()
    assert (d / "async.safetensors").read_bytes() == (d / "sync.safetensors").read_bytes()
    # the safetensors package reads every tensor, with the bytes ours reads
    from safetensors import safe_open

    reader = _C.Reader(path=str(p))
    try:
        with safe_open(str(p), framework="pt") as theirs:
            assert sorted(theirs.keys()) == sorted(reader.keys())
            for name in theirs.keys():
                assert torch.equal(_bits(theirs.get_tensor(name)), _bits(reader.tensor(name)))
    finally:
        reader.close()


# ---- every float's bits, NaN payloads included ----

_WIDTHS = {2: (np.uint16, np.float16), 4: (np.uint32, np.float32), 8: (np.uint64, np.float64)}


@st.composite
def float_bits(draw, size):
    """A bit pattern of a float of size bytes, half the time a NaN (any sign, any payload)."""
    bits = 8 * size
    mant = {2: 10, 4: 23, 8: 52}[size]
    if draw(st.booleans()):
        return draw(st.integers(0, (1 << bits) - 1))
    sign = draw(st.integers(0, 1)) << (bits - 1)
    return sign | (((1 << (bits - 1 - mant)) - 1) << mant) | draw(st.integers(1, (1 << mant) - 1))


def _scalar(bits, size):
    u, f = _WIDTHS[size]
    return np.array([bits], dtype=u).view(f)[0]


@st.composite
def float_values(draw):
    size = draw(st.sampled_from([2, 4, 8]))
    kind = draw(st.sampled_from(["python", "numpy", "complex"] if size == 8 else ["numpy", "complex"]))
    if kind == "python":
        return struct.unpack("<d", struct.pack("<Q", draw(float_bits(8))))[0]
    if kind == "numpy":
        return _scalar(draw(float_bits(size)), size)
    if size == 2:  # numpy has no complex32
        size = 4
    u, _ = _WIDTHS[size]
    parts = np.array([draw(float_bits(size)), draw(float_bits(size))], dtype=u)
    return parts.view(np.complex64 if size == 4 else np.complex128)[0]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(float_values(), min_size=1, max_size=6))
def test_every_float_bit_pattern_round_trips(tmp_path_factory, values):
    p = tmp_path_factory.mktemp("nan") / "f.safetensors"
    torch.save({"values": values}, p, format="safetensors")
    back = torch.load(p)["values"]
    same(values, back, {})
    for a, b in zip(values, back):  # same() compares numpy values by bytes, Python ones by bits
        assert type(a) is type(b)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert _cli.main(["verify", str(p)]) == 0, out.getvalue()
