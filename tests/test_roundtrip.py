"""Round trips: property tests over dtypes, shapes, names and metadata, plus fixed cases."""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_safetensors as ts
from torch_safetensors import _core

from conftest import ALL_DTYPES, DTYPE_NAME, assert_same, random_tensor, tensor_bytes

# any str without lone surrogates (those cannot be UTF-8 encoded)
NAMES = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12).filter(
    lambda s: s != "__metadata__")
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from([dt for dt, _ in ALL_DTYPES]))
    min_dims = 1 if dtype == torch.float4_e2m1fn_x2 else 0  # F4 cannot be 0-dim
    shape = draw(st.lists(st.integers(0, 5), min_size=min_dims, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    return random_tensor(dtype, shape, seed)


STATE = st.dictionaries(NAMES, tensors(), max_size=6)
METADATA = st.none() | st.dictionaries(TEXT, TEXT, max_size=4)


def _check_header(data: bytes, tensors_, metadata):
    n = struct.unpack("<Q", data[:8])[0]
    assert (8 + n) % 8 == 0
    header = json.loads(data[8:8 + n].decode("utf-8"))
    assert header.get("__metadata__") == metadata
    names = [k for k in header if k != "__metadata__"]
    assert sorted(names) == sorted(tensors_)
    for name, t in tensors_.items():
        e = header[name]
        assert e["dtype"] == DTYPE_NAME[t.dtype]
        shape = list(t.shape)
        if t.dtype == torch.float4_e2m1fn_x2:
            shape[-1] *= 2
        assert e["shape"] == shape
        b, end = e["data_offsets"]
        assert data[8 + n + b:8 + n + end] == tensor_bytes(t)
    total = sum(len(tensor_bytes(t)) for t in tensors_.values())
    assert len(data) == 8 + n + total


def _check_loaded(loaded, tensors_):
    assert sorted(loaded) == sorted(tensors_)
    for name, t in tensors_.items():
        assert_same(loaded[name], t)


@settings(max_examples=100, deadline=None)
@given(STATE, METADATA)
def test_roundtrip_bytes(tensors_, metadata):
    data = ts.save(tensors_, metadata=metadata)
    assert isinstance(data, bytes)
    _check_header(data, tensors_, metadata)
    _check_loaded(ts.load(data), tensors_)


@settings(max_examples=50, deadline=None)
@given(STATE, METADATA)
def test_roundtrip_file(tensors_, metadata):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.safetensors")
        ts.save_file(tensors_, path, metadata=metadata)
        with open(path, "rb") as f:
            on_disk = f.read()
        assert on_disk == ts.save(tensors_, metadata=metadata)
        try:
            for zero_copy in (True, False):
                _core.set_zero_copy(zero_copy)
                _check_loaded(ts.load_file(path), tensors_)
                with ts.safe_open(path, framework="pt") as f:
                    assert f.metadata() == metadata
                    assert f.keys() == sorted(tensors_, key=lambda s: s.encode("utf-8"))
                    assert sorted(f.offset_keys()) == sorted(tensors_)
                    _check_loaded({k: f.get_tensor(k) for k in f.keys()}, tensors_)
                    _check_loaded(f.get_tensors(), tensors_)
        finally:
            _core.set_zero_copy(True)


@settings(max_examples=30, deadline=None)
@given(tensors(), st.integers(0, 3))
def test_roundtrip_noncontiguous(t, which):
    # views that are not contiguous are saved as their values
    if t.dim() >= 2 and which == 0:
        v = t.transpose(0, 1)
    elif t.dim() >= 1 and t.shape[0] > 1 and which == 1:
        v = t[::2]
    elif which == 2:
        v = t.unsqueeze(-1).expand(*t.shape, 2)  # stride 0: a view of every dtype
    else:
        v = t
    out = ts.load(ts.save({"v": v}))
    assert_same(out["v"], v.contiguous())


# ---- fixed cases ----


@pytest.mark.parametrize("dtype,name", ALL_DTYPES, ids=[n for _, n in ALL_DTYPES])
def test_each_dtype(dtype, name, tmp_path, mode):
    shape = (3, 4)
    t = random_tensor(dtype, shape, seed=7)
    data = ts.save({"t": t})
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    assert header["t"]["dtype"] == name
    p = tmp_path / "d.safetensors"
    ts.save_file({"t": t}, p)
    for loaded in (ts.load(data)["t"], ts.load_file(p)["t"]):
        assert_same(loaded, t)


def test_special_float_values_keep_their_bits(mode, tmp_path):
    vals = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -3.4e38]
    t = {"f32": torch.tensor(vals, dtype=torch.float32),
         "f64": torch.tensor(vals, dtype=torch.float64),
         "f16": torch.tensor(vals, dtype=torch.float16),
         "bf16": torch.tensor(vals, dtype=torch.bfloat16),
         # a NaN payload that arithmetic would not preserve
         "nan_payload": torch.tensor([0x7FC12345, 0xFFFFFFFF], dtype=torch.int64)
         .to(torch.int32).view(torch.float32)}
    p = tmp_path / "s.safetensors"
    ts.save_file(t, p)
    out = ts.load_file(p)
    for k in t:
        assert_same(out[k], t[k])


def test_integer_extremes(mode, tmp_path):
    t = {
        "u64": torch.tensor([0, 2**64 - 1], dtype=torch.uint64),
        "i64": torch.tensor([-2**63, 2**63 - 1], dtype=torch.int64),
        "u32": torch.tensor([0, 2**32 - 1], dtype=torch.uint32),
        "u16": torch.tensor([0, 2**16 - 1], dtype=torch.uint16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
    }
    p = tmp_path / "i.safetensors"
    ts.save_file(t, p)
    out = ts.load_file(p)
    for k in t:
        assert_same(out[k], t[k])
    assert out["u64"][1].item() in (2**64 - 1, -1)  # torch may show uint64 max as -1
    assert tensor_bytes(out["u64"])[8:] == b"\xff" * 8


def test_metadata_roundtrip(tmp_path):
    meta = {"format": "pt", "quote\"": "back\\slash", "ctl\x01\n": "é名\U0001F600", "": ""}
    p = tmp_path / "m.safetensors"
    ts.save_file({"a": torch.ones(1)}, p, metadata=meta)
    with ts.safe_open(p, framework="pt") as f:
        assert f.metadata() == meta
    ts.save_file({"a": torch.ones(1)}, p, metadata={})
    with ts.safe_open(p, framework="pt") as f:
        assert f.metadata() == {}
    ts.save_file({"a": torch.ones(1)}, p)
    with ts.safe_open(p, framework="pt") as f:
        assert f.metadata() is None


def test_metadata_keys_sorted_in_header():
    data = ts.save({}, metadata={"b": "1", "a": "2", "c": "3"})
    n = struct.unpack("<Q", data[:8])[0]
    assert data[8:8 + n].rstrip(b" ") == b'{"__metadata__":{"a":"2","b":"1","c":"3"}}'


def test_empty_dict_roundtrip(tmp_path):
    data = ts.save({})
    assert data == struct.pack("<Q", 8) + b"{}      "
    assert ts.load(data) == {}
    p = tmp_path / "e.safetensors"
    ts.save_file({}, p)
    assert p.read_bytes() == data
    assert ts.load_file(p) == {}


def test_file_order_is_dtype_then_name():
    t = {"z": torch.zeros(1, dtype=torch.bool), "b": torch.zeros(1, dtype=torch.float32),
         "a": torch.zeros(1, dtype=torch.float32), "m": torch.zeros(1, dtype=torch.int64),
         "é": torch.zeros(1, dtype=torch.uint8), "Z": torch.zeros(1, dtype=torch.uint8)}
    out = ts.load(ts.save(t))
    assert list(out) == ["m", "a", "b", "Z", "é", "z"]


def test_overwrite_existing_file(tmp_path):
    p = tmp_path / "o.safetensors"
    ts.save_file({"a": torch.arange(100)}, p)
    ts.save_file({"b": torch.ones(2)}, p)
    out = ts.load_file(p)
    assert list(out) == ["b"] and out["b"].tolist() == [1.0, 1.0]


def test_overwrite_a_file_that_is_loaded(tmp_path, mode):
    # the loaded tensors keep the old bytes: the new file replaces the name, not the inode
    p = tmp_path / "o.safetensors"
    ts.save_file({"a": torch.arange(4, dtype=torch.int64)}, p)
    old = ts.load_file(p)["a"]
    ts.save_file({"a": torch.full((4,), 9, dtype=torch.int64)}, p)
    assert old.tolist() == [0, 1, 2, 3]
    assert ts.load_file(p)["a"].tolist() == [9, 9, 9, 9]


def test_pathlike_and_str(tmp_path):
    p = tmp_path / "p.safetensors"
    ts.save_file({"a": torch.ones(3)}, p)
    ts.save_file({"a": torch.ones(3)}, str(p))
    assert ts.load_file(str(p))["a"].tolist() == [1, 1, 1]
    with ts.safe_open(p, framework="pt") as f:
        assert f.keys() == ["a"]


def test_save_accepts_mapping_and_requires_grad(tmp_path):
    from collections import OrderedDict
    t = torch.ones(2, requires_grad=True)
    data = ts.save(OrderedDict(w=t))
    out = ts.load(data)["w"]
    assert out.tolist() == [1, 1]
    assert out.requires_grad is False


def test_loaded_tensors_are_writable(mode, tmp_path):
    p = tmp_path / "w.safetensors"
    ts.save_file({"a": torch.zeros(4)}, p)
    t = ts.load_file(p)["a"]
    t += 1
    assert t.tolist() == [1, 1, 1, 1]
    b = ts.load(p.read_bytes())["a"]
    b += 2
    assert b.tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("kind", ["conj", "neg"])
def test_lazy_bit_views_saved_as_values(kind, tmp_path):
    # t.conj() and t._neg_view() share memory with t and carry a flag: their values
    # differ from their raw bytes. "Saved as their values" must hold for them too.
    if kind == "conj":
        raw = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
        v = raw.conj()
    else:
        raw = torch.tensor([1.0, -2.0])
        v = raw._neg_view()
    expected = v.resolve_conj().resolve_neg()
    assert not torch.equal(expected, raw)
    assert_same(ts.load(ts.save({"v": v}))["v"], expected)
    p = tmp_path / "v.safetensors"
    ts.save_file({"v": v}, p)
    assert_same(ts.load_file(p)["v"], expected)


def test_many_tensors_mixed_contiguity(tmp_path):
    # more tensors than one vectored write holds, with copies made at write time between
    # them; compared with the reference writer byte for byte
    ref = pytest.importorskip("safetensors.torch")
    t = {}
    for i in range(3000):
        if i % 7:
            t[f"t{i:05d}"] = torch.full((3,), i, dtype=torch.int16)
        else:
            t[f"t{i:05d}"] = torch.arange(6.0).reshape(2, 3).t() + i
    p = tmp_path / "many.safetensors"
    ts.save_file(t, p)
    data = p.read_bytes()
    assert data == ts.save(t)
    assert data == ref.save({k: v.contiguous() for k, v in t.items()})
    out = ts.load_file(p)
    for k, v in t.items():
        assert_same(out[k], v.contiguous())
