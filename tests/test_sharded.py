"""Hugging Face sharded checkpoints: save_sharded's layout and atomicity, and torch.load
on an index or a directory (lazy, map_location, ties, missing and corrupt shards)."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _save, _sharded

from conftest import mapped_paths

INDEX = "model.safetensors.index.json"


def _files(d):
    return sorted(os.listdir(d))


def _state(n=6, numel=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"layer.{i}.weight": torch.randn(numel, generator=g) for i in range(n)}


def _equal(a, b):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _index(d, name=INDEX):
    with open(os.path.join(d, name)) as f:
        return json.load(f)


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


# ---- sizes ----


@pytest.mark.parametrize("text,expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("10KB", 10_000), ("2GiB", 2 * 2**30),
    ("1.5kb", 1500), ("3 MiB", 3 * 2**20), ("1000", 1000), (4096, 4096), ("7B", 7),
])
def test_parse_size(text, expected):
    assert _sharded.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "5XB", "GB", "-5GB", "0", 0, -1, "5 G B"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="max_shard_size"):
        _sharded.parse_size(bad)


@pytest.mark.parametrize("bad", [None, 5.0, True, [1]])
def test_parse_size_type(bad):
    with pytest.raises(TypeError, match="max_shard_size"):
        _sharded.parse_size(bad)


# ---- layout ----


def test_layout_matches_hugging_face(tmp_path):
    sd = _state(6, 1000)  # 4000 bytes each
    ts.save_sharded(sd, tmp_path, max_shard_size=10_000, metadata={"step": "7"})
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert _files(tmp_path) == names + [INDEX]
    index = _index(tmp_path)
    assert index == {
        "metadata": {"total_size": 24_000},
        "weight_map": {f"layer.{i}.weight": names[i // 2] for i in range(6)},
    }
    # transformers' formatting: sorted keys, two-space indent, a final newline
    text = (tmp_path / INDEX).read_text()
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    # each shard is a plain safetensors file, as the safetensors package writes it
    from safetensors.torch import load_file, save as st_save

    for i, name in enumerate(names):
        part = {k: sd[k] for k in (f"layer.{2 * i}.weight", f"layer.{2 * i + 1}.weight")}
        _equal(load_file(tmp_path / name), part)
        assert _header(tmp_path / name)["__metadata__"] == {"format": "pt", "step": "7"}
    # without extra metadata (the package orders 2+ keys randomly), byte for byte equal
    ts.save_sharded(sd, tmp_path / "plain", max_shard_size=10_000)
    for i, name in enumerate(names):
        part = {k: sd[k] for k in (f"layer.{2 * i}.weight", f"layer.{2 * i + 1}.weight")}
        assert (tmp_path / "plain" / name).read_bytes() == st_save(part, metadata={"format": "pt"})


def test_greedy_in_key_order_and_oversized_tensor_alone(tmp_path):
    sd = {
        "a": torch.zeros(100),   # 400 B
        "b": torch.zeros(100),   # 400 B: a + b = 800 <= 1000
        "big": torch.zeros(500),  # 2000 B: alone
        "c": torch.zeros(50),    # 200 B
        "d": torch.zeros(200),   # 800 B: c + d = 1000 <= 1000
        "e": torch.zeros(1),
    }
    ts.save_sharded(sd, tmp_path, max_shard_size="1KB")
    wm = _index(tmp_path)["weight_map"]
    shard = {k: int(v.split("-")[1]) for k, v in wm.items()}
    assert shard == {"a": 1, "b": 1, "big": 2, "c": 3, "d": 3, "e": 4}
    assert _index(tmp_path)["metadata"]["total_size"] == 3804


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    sd = _state(3, 10)
    ts.save_sharded(sd, tmp_path)  # 5GB default
    assert _files(tmp_path) == ["model.safetensors"]
    _equal(ts.load_file(tmp_path / "model.safetensors"), sd)
    _equal(torch.load(tmp_path), sd)


def test_prefix_and_created_directory(tmp_path):
    d = tmp_path / "new" / "dir"
    ts.save_sharded(_state(4, 100), d, max_shard_size=800, prefix="weights")
    assert _files(d) == [
        "weights-00001-of-00002.safetensors", "weights-00002-of-00002.safetensors",
        "weights.safetensors.index.json",
    ]
    _equal(torch.load(d), _state(4, 100))


def test_empty_state_dict(tmp_path):
    ts.save_sharded({}, tmp_path)
    assert _files(tmp_path) == ["model.safetensors"]
    assert torch.load(tmp_path) == {}


# ---- loading ----


def test_torch_load_index_and_directory_lazily(tmp_path):
    sd = _state(6, 1000)
    ts.save_sharded(sd, tmp_path, max_shard_size=10_000)
    for target in (tmp_path, tmp_path / INDEX, str(tmp_path / INDEX)):
        out = torch.load(target)
        _equal(out, sd)
    # every shard is mapped (zero-copy), not read into memory
    maps = mapped_paths()
    for name in _files(tmp_path)[:-1]:
        assert str(tmp_path / name) in maps
    del out


def test_index_recognised_by_content_not_name(tmp_path):
    sd = _state(4, 500)
    ts.save_sharded(sd, tmp_path, max_shard_size=4000)
    os.rename(tmp_path / INDEX, tmp_path / "weights.idx")
    _equal(torch.load(tmp_path / "weights.idx"), sd)


@pytest.mark.parametrize("map_location", [
    "meta", torch.device("meta"), {"cpu": "meta"}, "cpu", None,
    lambda storage, loc: storage,
])
def test_map_location(tmp_path, map_location):
    sd = _state(4, 500)
    ts.save_sharded(sd, tmp_path, max_shard_size=4000)
    out = torch.load(tmp_path, map_location=map_location)
    meta = map_location in ("meta", {"cpu": "meta"}) or map_location == torch.device("meta")
    for k, t in sd.items():
        assert out[k].shape == t.shape and out[k].dtype == t.dtype
        assert out[k].device.type == ("meta" if meta else "cpu")
        if not meta:
            assert torch.equal(out[k], t)


def test_mmap_false_reads_into_memory(tmp_path):
    sd = _state(4, 500)
    ts.save_sharded(sd, tmp_path, max_shard_size=4000)
    out = torch.load(tmp_path, mmap=False)
    _equal(out, sd)
    out["layer.0.weight"].add_(1)  # ordinary memory: writable, files untouched
    _equal(torch.load(tmp_path), sd)


def test_load_sharded_function(tmp_path):
    sd = _state(4, 500)
    ts.save_sharded(sd, tmp_path, max_shard_size=4000)
    _equal(ts.load_sharded(tmp_path / INDEX), sd)
    assert all(t.is_meta for t in ts.load_sharded(tmp_path, map_location="meta").values())


def test_bfloat16_and_mixed_dtypes(tmp_path):
    sd = {"a": torch.randn(64, 64).bfloat16(), "b": torch.arange(1000), "c": torch.ones(3, dtype=torch.bool)}
    ts.save_sharded(sd, tmp_path, max_shard_size=5000)
    assert len(_files(tmp_path)) == 4
    _equal(torch.load(tmp_path), sd)


# ---- ties ----


def _tied_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 50, bias=False))
    m[2].weight = m[0].weight
    return m


def test_tied_weights_stored_once_and_restored(tmp_path):
    m = _tied_model()
    sd = m.state_dict()
    ts.save_sharded(sd, tmp_path, max_shard_size=2000)
    wm = _index(tmp_path)["weight_map"]
    assert "2.weight" not in wm and "0.weight" in wm  # stored once, as transformers writes
    assert _index(tmp_path)["metadata"]["total_size"] == (50 * 16 + 16 * 16 + 16) * 4
    from safetensors.torch import load_file

    stored = load_file(tmp_path / wm["0.weight"])
    assert "2.weight" not in stored
    out = torch.load(tmp_path)
    assert sorted(out) == sorted(sd)
    assert out["0.weight"].untyped_storage().data_ptr() == out["2.weight"].untyped_storage().data_ptr()
    m2 = _tied_model()
    with torch.no_grad():
        for p in m2.parameters():
            p.zero_()
    m2.load_state_dict(out)
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(m2(x), m(x))


# ---- atomicity and stale files ----


def test_stale_shards_of_another_count_are_removed(tmp_path):
    ts.save_sharded(_state(6, 1000), tmp_path, max_shard_size=10_000)  # 3 shards
    sd = _state(6, 1000, seed=1)
    ts.save_sharded(sd, tmp_path, max_shard_size=20_000)  # 2 shards
    assert _files(tmp_path) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX,
    ]
    _equal(torch.load(tmp_path), sd)
    ts.save_sharded(sd, tmp_path)  # 1 file: shards and index go
    assert _files(tmp_path) == ["model.safetensors"]
    other = tmp_path / "other-00001-of-00002.safetensors"
    other.write_bytes(b"unrelated")  # another prefix is left alone
    ts.save_sharded(sd, tmp_path, max_shard_size=20_000)
    assert "model.safetensors" not in _files(tmp_path)  # it would shadow the index
    assert other.read_bytes() == b"unrelated"


def test_interrupted_save_never_looks_complete(tmp_path, monkeypatch):
    old = _state(6, 1000)
    ts.save_sharded(old, tmp_path, max_shard_size=10_000)
    real = _save.save_safetensors
    calls = []

    def failing(obj, f, metadata=None, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(obj, f, metadata, **kwargs)

    monkeypatch.setattr(_save, "save_safetensors", failing)
    before = {f: (tmp_path / f).read_bytes() for f in _files(tmp_path)}
    with pytest.raises(OSError, match="No space"):
        ts.save_sharded(_state(6, 1000, seed=1), tmp_path, max_shard_size=10_000)
    # same shard count: the new shards took other names, and the old index and shards
    # are untouched; the failed save's own shard is gone
    assert {f: (tmp_path / f).read_bytes() for f in _files(tmp_path)} == before
    _equal(torch.load(tmp_path), old)


def test_interrupted_index_write_leaves_no_index(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(5, "Input/output error")

    # the index goes through the C atomic writer; its own cleanup of a failed temporary
    # file is tested with a full disk in test_crash_safety.py
    monkeypatch.setattr(ts._C, "write_atomic", boom)
    with pytest.raises(OSError):
        ts.save_sharded(_state(6, 1000), tmp_path, max_shard_size=10_000)
    monkeypatch.undo()
    assert _files(tmp_path) == []  # no index, no shard nothing names, no temporary file


def test_refusals_touch_nothing(tmp_path):
    sd = _state(4, 100)
    ts.save_sharded(sd, tmp_path, max_shard_size=800)
    before = {f: (tmp_path / f).read_bytes() for f in _files(tmp_path)}
    with pytest.raises(TypeError, match="layer.9: str"):
        ts.save_sharded({**sd, "layer.9": "x"}, tmp_path)
    with pytest.raises(TypeError, match="names must be str"):
        ts.save_sharded({1: torch.zeros(1)}, tmp_path)
    with pytest.raises(TypeError, match="meta device"):
        ts.save_sharded({"m": torch.zeros(2, device="meta")}, tmp_path)
    with pytest.raises(TypeError, match="metadata"):
        ts.save_sharded(sd, tmp_path, metadata={"a": 1})
    with pytest.raises(ValueError, match="prefix"):
        ts.save_sharded(sd, tmp_path, prefix="../evil")
    with pytest.raises(ValueError, match="max_shard_size"):
        ts.save_sharded(sd, tmp_path, max_shard_size="lots")
    with pytest.raises(TypeError, match="state_dict must be"):
        ts.save_sharded([torch.zeros(1)], tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in _files(tmp_path)} == before
    f = tmp_path / "a_file"
    f.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        ts.save_sharded(sd, f)


# ---- broken checkpoints ----


@pytest.fixture
def sharded(tmp_path):
    ts.save_sharded(_state(6, 1000), tmp_path, max_shard_size=10_000)
    return tmp_path


def test_missing_shard_is_named(sharded):
    os.unlink(sharded / "model-00002-of-00003.safetensors")
    with pytest.raises(FileNotFoundError) as info:
        torch.load(sharded)
    msg = str(info.value)
    assert "model-00002-of-00003.safetensors" in msg and INDEX in msg


def test_corrupt_shard_is_named(sharded):
    p = sharded / "model-00003-of-00003.safetensors"
    p.write_bytes(p.read_bytes()[:-5])  # truncated
    with pytest.raises(ts.SafetensorError) as info:
        torch.load(sharded / INDEX)
    assert str(p) in str(info.value)
    assert info.value.code is not None


def test_garbage_shard_is_named(sharded):
    p = sharded / "model-00001-of-00003.safetensors"
    p.write_bytes(b"\x80\x02not safetensors at all")
    with pytest.raises(ts.SafetensorError, match="model-00001-of-00003"):
        torch.load(sharded)


def test_index_naming_a_tensor_the_shard_lacks(sharded):
    index = _index(sharded)
    index["weight_map"]["ghost"] = "model-00002-of-00003.safetensors"
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(ts.SafetensorError) as info:
        torch.load(sharded)
    msg = str(info.value)
    assert "'ghost'" in msg and "model-00002-of-00003.safetensors" in msg
    assert info.value.code == "index_mismatch" and info.value.tensor == "ghost"


def test_shard_holding_an_unlisted_tensor(sharded):
    index = _index(sharded)
    del index["weight_map"]["layer.5.weight"]
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(ts.SafetensorError, match="'layer.5.weight'.*does not list"):
        torch.load(sharded)


def test_tensor_moved_to_the_wrong_shard(sharded):
    index = _index(sharded)
    index["weight_map"]["layer.0.weight"] = "model-00003-of-00003.safetensors"
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(ts.SafetensorError, match="'layer.0.weight'"):
        torch.load(sharded)


@pytest.mark.parametrize("text,fragment", [
    ("{", "not JSON"),
    ("[]", "expected a JSON object"),
    ('{"metadata": {}}', "no 'weight_map'"),
    ('{"weight_map": {"a": 3}}', "is not a file name"),
    ('{"weight_map": {"a": "../model-00001-of-00003.safetensors"}}', "not a plain file name"),
    ('{"weight_map": {"a": "/etc/passwd"}}', "not a plain file name"),
    ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "duplicate key 'a'"),
    ('{"metadata": 5, "weight_map": {}}', "'metadata' is not an object"),
])
def test_invalid_index(sharded, text, fragment):
    (sharded / INDEX).write_text(text)
    with pytest.raises(ts.SafetensorError, match="not a valid sharded checkpoint index") as info:
        torch.load(sharded / INDEX)
    assert fragment in str(info.value) and INDEX in str(info.value)


def test_directory_without_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no safetensors checkpoint"):
        torch.load(tmp_path)
    (tmp_path / "a.safetensors.index.json").write_text("{}")
    (tmp_path / "b.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="several checkpoints"):
        torch.load(tmp_path)


def test_directory_with_one_other_file(tmp_path):
    sd = _state(2, 10)
    torch.save(sd, tmp_path / "weights.safetensors")
    _equal(torch.load(tmp_path), sd)


def test_format_pickle_skips_the_hook(sharded):
    with pytest.raises(Exception) as info:
        torch.load(sharded / INDEX, format="pickle")
    assert not isinstance(info.value, ts.SafetensorError)
