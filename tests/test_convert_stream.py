"""convert without reading the source into memory: pre-1.6 checkpoints through the C
legacy reader's unaligned mode (_legacy.load_for_convert: storages as views of one
private mapping), checked against torch.load on the same files; refusals and damaged
files go to torch's weights_only loader."""
import os
import pickle

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _cli, _legacy


def _mapped(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        got = _legacy.load_for_convert(fd)
    finally:
        os.close(fd)
    assert got is not None, _legacy.last_fallback
    return got[0]


def _not_read(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return _legacy.load_for_convert(fd) is None
    finally:
        os.close(fd)


def _save_old(obj, path):
    torch.save(obj, path, format="pickle", _use_new_zipfile_serialization=False)


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point and a.element_size() == 1 else a,
                           b.view(torch.uint8) if b.dtype.is_floating_point and b.element_size() == 1 else b)
        assert a.requires_grad == b.requires_grad
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64]


def test_mapped_load_equals_torch_load(tmp_path):
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    obj = {
        "w": base,
        "row": base[2],          # a view of the same storage
        "t": base.t(),           # another view, strided
        "p": torch.nn.Parameter(torch.ones(3)),
        "dtypes": [torch.arange(7).to(d) for d in DTYPES],
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "nested": {"step": 3, "name": "x", "t": (torch.ones(2), None)},
    }
    p = tmp_path / "old.pt"
    _save_old(obj, p)
    got = _mapped(str(p))
    _assert_same(got, torch.load(p, weights_only=True))
    # views stay views of one storage, as torch.load gives them
    assert got["row"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()
    assert got["t"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()


def test_storages_are_views_of_one_mapping(tmp_path):
    p = tmp_path / "old.pt"
    _save_old({f"t{i}": torch.full((1000,), float(i)) for i in range(4)}, p)
    got = _mapped(str(p))
    ptrs = sorted(t.untyped_storage().data_ptr() for t in got.values())
    size = os.path.getsize(p)
    assert ptrs[-1] - ptrs[0] < size  # all inside one mapping of the file
    assert all(torch.equal(got[f"t{i}"], torch.full((1000,), float(i))) for i in range(4))


def test_refused_like_torch(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "RAN"),))

    p = tmp_path / "evil.pt"
    _save_old({"w": torch.ones(1), "x": Payload()}, p)
    assert _not_read(str(p))  # outside the reader's subset: torch's weights_only loader
    with pytest.raises(pickle.UnpicklingError, match="system"):
        torch.load(p, weights_only=True)
    assert _cli.main(["convert", str(p), str(tmp_path / "evil.safetensors")]) == _cli.EXIT_REFUSED
    assert not (tmp_path / "RAN").exists()


def test_damaged_files_are_not_mappable(tmp_path):
    p = tmp_path / "old.pt"
    _save_old({"w": torch.arange(100.0)}, p)
    data = p.read_bytes()
    (tmp_path / "short.pt").write_bytes(data[:-40])
    assert _not_read(str(tmp_path / "short.pt"))
    (tmp_path / "zip.pt").write_bytes(b"PK\x03\x04" + data[4:])
    assert _not_read(str(tmp_path / "zip.pt"))


def test_convert_pre_1_6_through_the_mapping(tmp_path, capsys, monkeypatch):
    calls = []
    real = _legacy.load_for_convert
    monkeypatch.setattr(_legacy, "load_for_convert", lambda fd: calls.append(fd) or real(fd))
    sd = {"a": torch.randn(33, 7), "b": torch.arange(5, dtype=torch.int16)}
    _save_old(sd, tmp_path / "old.pt")
    assert _cli.main([ "convert", str(tmp_path / "old.pt"), str(tmp_path / "new.safetensors")]) == 0
    assert len(calls) == 1 and _legacy.last_fallback is None
    back = ts.load_file(tmp_path / "new.safetensors")
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # the same bytes as converting the zip form of the same state dict
    torch.save(sd, tmp_path / "new.pt", format="pickle")
    assert _cli.main(["convert", str(tmp_path / "new.pt"), str(tmp_path / "zip.safetensors")]) == 0
    assert (tmp_path / "zip.safetensors").read_bytes() == (tmp_path / "new.safetensors").read_bytes()


def test_convert_truncated_pre_1_6_falls_back_to_torch(tmp_path, capsys):
    _save_old({"w": torch.arange(100.0)}, tmp_path / "old.pt")
    data = (tmp_path / "old.pt").read_bytes()
    (tmp_path / "short.pt").write_bytes(data[:-40])
    status = _cli.main(["convert", str(tmp_path / "short.pt"), str(tmp_path / "s.safetensors")])
    assert status == 1
    assert not (tmp_path / "s.safetensors").exists()


def test_convert_misaligned_storages_are_not_copied(tmp_path):
    # pre-1.6 storages follow an 8-byte count after pickles of any length: convert maps them
    # as they lie, where torch.load(mmap=True) copies a misaligned one (kernels need alignment)
    p = tmp_path / "old.pt"
    _save_old({"key_of_odd_length": torch.arange(5, dtype=torch.float64)}, p)
    got = _mapped(str(p))["key_of_odd_length"]
    assert torch.equal(got, torch.arange(5, dtype=torch.float64))


def test_convert_two_views_of_one_view_key_as_torch(tmp_path):
    # issue 19, 1.5: torch caches a pre-1.6 view by its key: the second reference gets the
    # first view, whatever offset it names; convert writes what torch.load gives
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fuzz"))
    from gen_pickle import Pickle, pre16_bytes

    p = Pickle().op(b"}")
    for name, off in (("a", 0), ("b", 2)):
        p.str(name).glob("torch._utils", "_rebuild_tensor_v2").mark()
        p.mark().str("storage").glob("torch", "FloatStorage").str("0").str("cpu").int(4)
        p.mark().str("view").int(off).int(2).tuple().tuple().op(b"Q")
        p.int(0).int(2).tuple(1).int(1).tuple(1).bool(False).glob("collections", "OrderedDict").tuple(0)
        p.op(b"R").tuple().op(b"R").op(b"s")
    src = tmp_path / "views.pt"
    src.write_bytes(pre16_bytes(p.stop(), [b"0"], {b"0": torch.arange(4.0).numpy().tobytes()}, {b"0": 4}))
    want = torch.load(src, weights_only=True)
    assert want["b"].tolist() == [0.0, 1.0]  # the cached first view
    assert _cli.main(["convert", str(src), str(tmp_path / "v.safetensors")]) == 0
    back = torch.load(tmp_path / "v.safetensors")  # ties rebuilt from the structure
    assert back["a"].tolist() == want["a"].tolist() and back["b"].tolist() == want["b"].tolist()
