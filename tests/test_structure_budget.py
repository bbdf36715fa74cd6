"""The decoder's budget has no way around it (issue 22, section 3): every copy of stored
data is charged (at most one copy of what the file holds), and a stored tensor's
validation runs once however many nodes refer to it. The figures are in
benchmarks/bench_hostile_structure.py; these tests pin the rules."""
from __future__ import annotations

import json

import pytest
import torch

import torch_safetensors  # noqa: F401 - installs the wrappers
from torch_safetensors import _api, _checkpoint
from torch_safetensors._core import SafetensorError


def craft(path, tensors, root):
    meta = {_checkpoint.STRUCTURE_KEY: json.dumps({"version": 2, "root": root})}
    _api.save_file(tensors, str(path), metadata=meta)
    return str(path)


U8 = torch.arange(8192, dtype=torch.uint8)

COPYING = {
    "bytearray": lambda i: {"ba": {"t": "x", "o": i}},
    "bytes": lambda i: {"b": {"t": "x", "o": i}},
    "numpy byte-swapped": lambda i: {"nd": [">u2", {"t": "y", "o": i}]},
    "quantized": lambda i: {"tk": "quant", "dtype": "quint8", "scheme": "per_tensor_affine",
                            "int": {"t": "x", "o": i}, "scale": 0.5, "zero_point": 0},
    "nested": lambda i: {"tk": "nested", "layout": "strided", "parts": [{"t": "x", "o": i}]},
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", sorted(COPYING))
def test_each_copy_of_stored_data_is_charged(tmp_path, kind):
    tensors = {"x": U8, "y": torch.zeros(4096, dtype=torch.uint16)}
    one = craft(tmp_path / "one.safetensors", tensors, {"l": [COPYING[kind](0)]})
    assert len(torch.load(one)) == 1
    # distinct objects over one stored tensor: each would be a full copy
    many = craft(tmp_path / "many.safetensors", tensors, {"l": [COPYING[kind](i) for i in range(40)]})
    with pytest.raises(SafetensorError, match="copy .* bytes of tensor data") as info:
        torch.load(many)
    assert info.value.code == "budget"


def test_the_same_object_referred_to_again_is_one_object(tmp_path):
    p = craft(tmp_path / "a.safetensors", {"x": U8},
              {"l": [{"b": {"t": "x"}}] + [{"b": {"t": "x", "same": 1}} for _ in range(1000)]})
    out = torch.load(p)
    assert len(out) == 1001 and all(b is out[0] for b in out) and out[0] == bytes(U8.tolist())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sparse_invariants_are_checked_once_per_stored_tensor(tmp_path, monkeypatch):
    nnz = 64
    tensors = {"i": torch.arange(nnz).reshape(1, nnz), "v": torch.ones(nnz)}
    nodes = [{"tk": "sparse_coo", "size": [nnz + k], "coalesced": True,
              "indices": {"t": "i", "o": k}, "values": {"t": "v", "o": k}} for k in range(50)]
    p = craft(tmp_path / "a.safetensors", tensors, {"l": nodes})
    calls = []
    real = torch.sparse_coo_tensor

    def counting(*a, **k):
        calls.append(k.get("check_invariants"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "sparse_coo_tensor", counting)
    out = torch.load(p)
    assert [t.shape[0] for t in out] == [nnz + k for k in range(50)]
    assert calls.count(True) == 1 and len(calls) == 50
    # a later node whose size is too small for the indices is still refused
    nodes.append({"tk": "sparse_coo", "size": [nnz - 1], "coalesced": True,
                  "indices": {"t": "i", "o": 99}, "values": {"t": "v", "o": 99}})
    p = craft(tmp_path / "b.safetensors", tensors, {"l": nodes})
    with pytest.raises(SafetensorError, match="out of range"):
        torch.load(p)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compressed_sparse_checked_once_and_bounds_kept(tmp_path):
    csr = torch.eye(8).to_sparse_csr()
    tensors = {"c": csr.crow_indices(), "p": csr.col_indices(), "v": csr.values()}

    def node(cols, k):
        return {"tk": "sparse_compressed", "layout": "sparse_csr", "size": [8, cols],
                "compressed": {"t": "c", "o": k}, "plain": {"t": "p", "o": k}, "values": {"t": "v", "o": k}}

    p = craft(tmp_path / "a.safetensors", tensors, {"l": [node(8 + k, k) for k in range(20)]})
    out = torch.load(p)
    assert torch.equal(out[0].to_dense(), torch.eye(8)) and out[19].shape == (8, 27)
    p = craft(tmp_path / "b.safetensors", tensors, {"l": [node(8, 0), node(7, 1)]})
    with pytest.raises(SafetensorError, match="out of range"):
        torch.load(p)


def test_copies_are_charged_before_they_are_made(tmp_path, monkeypatch):
    """The charge refuses before the allocation: no byte of an over-budget copy is made."""
    made = []
    real = _checkpoint.ctypes.string_at
    monkeypatch.setattr(_checkpoint.ctypes, "string_at", lambda *a: made.append(a) or real(*a))
    tensors = {"x": U8}
    doc = {"version": 2, "root": {"l": [{"ba": {"t": "x", "o": i}} for i in range(3)]}}
    builder = _checkpoint._Builder(tensors, version=2, trusted=False, budget=1 << 30, spent=0,
                                   data_budget=U8.numel())
    with pytest.raises(SafetensorError, match="copy"):
        builder.build(doc["root"], 0)
    assert len(made) == 1
