"""torch.save / torch.load speak safetensors (issue 3, points 1-5 and 7).

The wrappers, every kind of f, every map_location form, mmap, content sniffing in both
directions, the format and metadata options, refusal before anything is written, and
the README's demo command.
"""
from __future__ import annotations

import gc
import inspect
import io
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import pytest
import safetensors
import safetensors.torch
import torch
import torch.serialization

import torch_safetensors as ts
from torch_safetensors import _torch

from conftest import mapped_paths

SafetensorError = ts.SafetensorError


def _state():
    return {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.tensor([1, -2, 3], dtype=torch.int64),
        "h": torch.linspace(-1, 1, 5).to(torch.bfloat16),
    }


def _assert_state_equal(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        assert type(got[k]) is torch.Tensor, (k, type(got[k]))
        assert got[k].dtype == v.dtype, k
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def _is_mapped(path) -> bool:
    real = os.path.realpath(os.fspath(path))
    return real in mapped_paths()


def _is_safetensors_bytes(data: bytes) -> bool:
    n = int.from_bytes(data[:8], "little")
    return 8 + n <= len(data) and data[8:9] == b"{"


@pytest.fixture
def restore_install():
    """Whatever a test does to install(), the next test sees the wrappers as before."""
    was = ts.installed()
    yield
    if was:
        ts.install()
    else:
        ts.uninstall()
    assert ts.installed() is was


@pytest.fixture
def st_file(tmp_path):
    """A safetensors file written by torch.save, with the state it holds."""
    sd = _state()
    p = tmp_path / "model.pt"
    torch.save(sd, p, format="safetensors")
    return p, sd


# ---- the wrappers (point 1) ----


def test_installed_on_import():
    assert ts.installed()
    assert torch.save is torch.serialization.save
    assert torch.load is torch.serialization.load
    assert torch.save is not _torch._orig_save
    assert torch.load is not _torch._orig_load
    # the kept originals are torch's own functions, not another wrapper
    assert _torch._orig_save.__module__ == "torch.serialization"
    assert _torch._orig_load.__module__ == "torch.serialization"
    assert not hasattr(_torch._orig_save, _torch._MARK)
    assert not hasattr(_torch._orig_load, _torch._MARK)


def test_signatures_keep_torch_parameters_and_add_keyword_only_options():
    for wrapper, orig, extra in (
        (torch.save, _torch._orig_save, ["format", "metadata"]),
        (torch.load, _torch._orig_load, ["format"]),
    ):
        sig = inspect.signature(wrapper)
        osig = inspect.signature(orig)
        params = sig.parameters
        for name, p in osig.parameters.items():
            assert name in params, name
            assert params[name].kind == p.kind, name
            assert params[name].default is p.default or params[name].default == p.default, name
        # torch's own parameters keep their order; anything added is keyword-only
        assert [n for n in params if n in osig.parameters] == list(osig.parameters)
        for name, p in params.items():
            if name not in osig.parameters:
                assert p.kind is inspect.Parameter.KEYWORD_ONLY, name
        for name in extra:
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
            assert params[name].default is None, name
    assert torch.save.__name__ == "save" and torch.load.__name__ == "load"


def test_format_is_keyword_only_in_practice(tmp_path):
    # a third positional argument of torch.save is pickle_module, never format
    with pytest.raises(Exception):
        torch.save(_state(), tmp_path / "x.pt", "safetensors")
    assert not (tmp_path / "x.pt").exists() or zipfile.is_zipfile(tmp_path / "x.pt")


def test_docstrings_keep_torchs_text():
    assert _torch._orig_save.__doc__ and _torch._orig_load.__doc__
    assert torch.save.__doc__.startswith(_torch._orig_save.__doc__)
    assert torch.load.__doc__.startswith(_torch._orig_load.__doc__)
    assert "format" in torch.save.__doc__[len(_torch._orig_save.__doc__):]
    assert "metadata" in torch.save.__doc__[len(_torch._orig_save.__doc__):]
    assert "format" in torch.load.__doc__[len(_torch._orig_load.__doc__):]


def test_install_twice_is_harmless(restore_install, st_file):
    save_w, load_w = torch.save, torch.load
    ts.install()
    ts.install()
    assert torch.save is save_w and torch.load is load_w
    assert torch.serialization.save is save_w and torch.serialization.load is load_w
    # not wrapped twice: the wrapper still points straight at torch's original
    assert getattr(torch.save, _torch._MARK) is _torch._orig_save
    assert getattr(torch.load, _torch._MARK) is _torch._orig_load
    p, sd = st_file
    _assert_state_equal(torch.load(p), sd)


def test_uninstall_restores_originals_and_install_wraps_again(restore_install, tmp_path, st_file):
    save_w, load_w = torch.save, torch.load
    orig_save = getattr(save_w, _torch._MARK)
    orig_load = getattr(load_w, _torch._MARK)
    ts.uninstall()
    assert not ts.installed()
    assert torch.save is orig_save and torch.serialization.save is orig_save
    assert torch.load is orig_load and torch.serialization.load is orig_load
    # really torch's: no format option, and a safetensors file named .pt is not understood
    with pytest.raises(TypeError):
        torch.save(_state(), tmp_path / "y.pt", format="safetensors")
    p, _ = st_file
    with pytest.raises(Exception):
        torch.load(p)
    ts.uninstall()  # twice is harmless too
    assert torch.load is orig_load
    ts.install()
    assert ts.installed()
    assert torch.save is save_w and torch.load is load_w
    assert torch.serialization.save is save_w and torch.serialization.load is load_w
    _assert_state_equal(torch.load(p), st_file[1])


# ---- every kind of f (points 2 and 3) ----


@pytest.mark.parametrize("kind", ["str", "pathlib"])
def test_roundtrip_path(tmp_path, kind):
    sd = _state()
    p = tmp_path / "m.bin"
    f = str(p) if kind == "str" else pathlib.Path(p)
    torch.save(sd, f, format="safetensors")
    assert _is_safetensors_bytes(p.read_bytes())
    _assert_state_equal(torch.load(f), sd)


def test_roundtrip_open_file_objects(tmp_path):
    sd = _state()
    p = tmp_path / "m.pt"
    with open(p, "wb") as f:
        torch.save(sd, f, format="safetensors")
    with open(p, "rb") as f:
        loaded = torch.load(f)
        # a real file at position 0 is mapped, not read
        assert _is_mapped(p)
        assert f.tell() == p.stat().st_size
    _assert_state_equal(loaded, sd)
    assert safetensors.torch.load_file(str(p)).keys() == sd.keys()


def test_roundtrip_bytesio():
    sd = _state()
    buf = io.BytesIO()
    torch.save(sd, buf, format="safetensors")
    data = buf.getvalue()
    assert _is_safetensors_bytes(data)
    buf.seek(0)
    loaded = torch.load(buf)
    _assert_state_equal(loaded, sd)
    assert buf.tell() == len(data)
    # the loaded tensors own their memory: changing the buffer does not reach them
    buf.seek(0)
    buf.write(b"\0" * len(data))
    _assert_state_equal(loaded, sd)
    # and the same bytes load through the safetensors package
    _assert_state_equal(safetensors.torch.load(data), sd)


def test_roundtrip_file_object_after_leading_bytes(tmp_path):
    sd = _state()
    lead = b"LEADING-BYTES-"
    p = tmp_path / "lead.bin"
    with open(p, "wb") as f:
        f.write(lead)
        torch.save(sd, f, format="safetensors")
    with open(p, "rb") as f:
        assert f.read(len(lead)) == lead
        loaded = torch.load(f)  # from the current position
        assert f.tell() == p.stat().st_size
    _assert_state_equal(loaded, sd)
    buf = io.BytesIO(p.read_bytes())
    buf.seek(len(lead))
    _assert_state_equal(torch.load(buf), sd)
    assert buf.tell() == len(buf.getvalue())


def test_file_object_with_a_torch_zip_after_leading_bytes(tmp_path):
    sd = _state()
    buf = io.BytesIO()
    buf.write(b"JUNK")
    torch.save(sd, buf, format="pickle")
    buf.seek(4)
    _assert_state_equal(torch.load(buf), sd)


# ---- map_location (point 3) ----


def _identity(storage, location):
    return storage


def _none(storage, location):
    return None


def _clone(storage, location):
    return storage.clone()


MAP_LOCATIONS = {
    "None": None,
    "str": "cpu",
    "device": torch.device("cpu"),
    "bytes": b"cpu",
    "dict_cuda_to_cpu": {"cuda:0": "cpu"},
    "dict_cpu_to_cpu": {"cpu": "cpu"},
    "callable_identity": _identity,
    "callable_none": _none,
    "callable_clone": _clone,
}


@pytest.mark.parametrize("name", sorted(MAP_LOCATIONS))
@pytest.mark.parametrize("via", ["path", "bytesio"])
def test_map_location_forms(st_file, name, via):
    p, sd = st_file
    ml = MAP_LOCATIONS[name]
    if via == "path":
        loaded = torch.load(p, map_location=ml)
    else:
        loaded = torch.load(io.BytesIO(p.read_bytes()), map_location=ml)
    _assert_state_equal(loaded, sd)
    for t in loaded.values():
        assert t.device.type == "cpu"
    if name == "bytes":
        return  # torch 2.13's own loader fails on bytes map_location for its files
    # torch's own loader gives the same for its own file with the same map_location
    buf = io.BytesIO()
    torch.save(sd, buf, format="pickle")
    buf.seek(0)
    _assert_state_equal(_torch._orig_load(buf, map_location=ml, weights_only=True), sd)


def test_map_location_callable_is_called_like_torch(st_file):
    p, sd = st_file
    calls = []

    def record(storage, location):
        calls.append((type(storage), location))
        return storage

    torch.load(p, map_location=record)
    ours = sorted(calls, key=repr)
    calls.clear()
    buf = io.BytesIO()
    torch.save(sd, buf, format="pickle")
    buf.seek(0)
    _torch._orig_load(buf, map_location=record, weights_only=True)
    assert ours == sorted(calls, key=repr)
    assert ours and all(loc == "cpu" for _, loc in ours)


def test_map_location_callable_clone_does_not_keep_the_mapping(st_file):
    p, sd = st_file
    gc.collect()
    assert not _is_mapped(p)
    loaded = torch.load(p, map_location=_clone)
    gc.collect()
    _assert_state_equal(loaded, sd)
    # every tensor lives in its clone: the file's mapping was released
    assert not _is_mapped(p)
    # and the cloned tensors are independent of each other and writable
    loaded["w"].add_(1)
    assert torch.equal(loaded["w"], sd["w"] + 1)


@pytest.mark.parametrize("ml", ["meta", torch.device("meta"), {"cpu": "meta"}])
def test_map_location_meta(st_file, ml):
    p, sd = st_file
    loaded = torch.load(p, map_location=ml)
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert loaded[k].device.type == "meta"
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape


def test_map_location_bad_type(st_file):
    p, _ = st_file
    with pytest.raises(TypeError, match="map_location"):
        torch.load(p, map_location=3.5)


# ---- mmap and weights_only (point 3) ----


@pytest.mark.parametrize("mmap", [None, True, False])
def test_mmap_modes(st_file, mmap):
    p, sd = st_file
    gc.collect()
    assert not _is_mapped(p)
    loaded = torch.load(p, mmap=mmap)
    _assert_state_equal(loaded, sd)
    if mmap is False:
        assert not _is_mapped(p)
    else:
        assert _is_mapped(p)  # zero-copy: the tensors live in the file's mapping
    del loaded
    gc.collect()
    assert not _is_mapped(p)


def test_mmap_false_survives_file_change(st_file):
    p, sd = st_file
    loaded = torch.load(p, mmap=False)
    data = bytearray(p.read_bytes())
    # overwrite the data region in place (same inode): memory copies must not change
    n = int.from_bytes(data[:8], "little")
    for i in range(8 + n, len(data)):
        data[i] = 0xFF
    with open(p, "r+b") as f:
        f.write(bytes(data))
    _assert_state_equal(loaded, sd)


@pytest.mark.parametrize("weights_only", [True, False, None])
def test_weights_only_accepted(st_file, weights_only):
    p, sd = st_file
    _assert_state_equal(torch.load(p, weights_only=weights_only), sd)
    _assert_state_equal(torch.load(io.BytesIO(p.read_bytes()), weights_only=weights_only), sd)


# ---- content, not the name (point 3) ----


@pytest.mark.parametrize("name", ["model.pt", "model.bin", "model", "model.pth.tar", "model.ckpt"])
def test_safetensors_under_any_name(tmp_path, name):
    sd = _state()
    p = tmp_path / name
    torch.save(sd, p, format="safetensors")
    assert _is_safetensors_bytes(p.read_bytes())
    assert not zipfile.is_zipfile(p)
    loaded = torch.load(p)
    assert _is_mapped(p)
    _assert_state_equal(loaded, sd)


@pytest.fixture
def no_safetensors_package_reader(monkeypatch):
    """Fails the test if anything reads through the safetensors package."""

    def refuse(*args, **kwargs):
        raise AssertionError("the safetensors package's reader was used")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    monkeypatch.setattr(safetensors.torch, "safe_open", refuse, raising=False)
    monkeypatch.setattr(safetensors, "safe_open", refuse)


@pytest.mark.parametrize("mmap", [None, True, False])
@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_named_safetensors_loads_through_torch(tmp_path, no_safetensors_package_reader, mmap, legacy):
    sd = _state()
    p = tmp_path / "trap.safetensors"
    torch.save(sd, p, format="pickle", _use_new_zipfile_serialization=not legacy)
    assert zipfile.is_zipfile(p) is not legacy
    # (a pre-1.6 file with mmap=True: torch refuses it; our C reader maps it, issue 15)
    _assert_state_equal(torch.load(p, mmap=mmap), sd)
    _assert_state_equal(torch.load(str(p), mmap=mmap, map_location={"cpu": "cpu"}), sd)
    if legacy and mmap:
        # a callable map_location goes to torch's loader, which refuses to map pre-1.6 files
        with pytest.raises(RuntimeError, match="mmap"):
            torch.load(p, mmap=mmap, map_location=_identity)
    else:
        _assert_state_equal(torch.load(p, mmap=mmap, map_location=_identity), sd)
    with open(p, "rb") as f:
        _assert_state_equal(torch.load(f), sd)


def test_safetensors_named_safetensors_uses_our_reader(tmp_path, no_safetensors_package_reader):
    sd = _state()
    p = tmp_path / "m.safetensors"
    torch.save(sd, p)  # the suffix alone selects safetensors
    assert _is_safetensors_bytes(p.read_bytes())
    # dict and callable map_location work (torch's own suffix branch would refuse them)
    _assert_state_equal(torch.load(p, map_location={"cuda:0": "cpu"}), sd)
    _assert_state_equal(torch.load(p, map_location=_identity), sd)


# ---- format and metadata on save (point 2) ----


def test_format_none_keeps_torch_zip(tmp_path):
    sd = _state()
    p = tmp_path / "m.pt"
    torch.save(sd, p)
    assert zipfile.is_zipfile(p)
    buf = io.BytesIO()
    torch.save(sd, buf)
    assert zipfile.is_zipfile(buf)
    _assert_state_equal(torch.load(p), sd)


@pytest.mark.parametrize("name", ["m.safetensors", "m.SafeTensors"])
def test_format_none_safetensors_suffix_writes_safetensors(tmp_path, name):
    sd = _state()
    p = tmp_path / name
    torch.save(sd, p)
    assert _is_safetensors_bytes(p.read_bytes())
    _assert_state_equal(safetensors.torch.load_file(str(p)), sd)
    torch.save(sd, pathlib.Path(p))
    assert _is_safetensors_bytes(p.read_bytes())


def test_format_pickle_forces_torch_zip_even_for_safetensors_suffix(tmp_path):
    sd = _state()
    p = tmp_path / "m.safetensors"
    torch.save(sd, p, format="pickle")
    assert zipfile.is_zipfile(p)


def test_format_bogus_raises_value_error_listing_choices(tmp_path):
    p = tmp_path / "m.pt"
    with pytest.raises(ValueError) as info:
        torch.save(_state(), p, format="bogus")
    msg = str(info.value)
    assert "bogus" in msg and "safetensors" in msg and "pickle" in msg
    assert not p.exists()
    torch.save(_state(), p, format="safetensors")
    with pytest.raises(ValueError) as info:
        torch.load(p, format="bogus")
    assert "safetensors" in str(info.value) and "pickle" in str(info.value)


def test_metadata_in_header_with_format_pt(tmp_path):
    p = tmp_path / "m.safetensors"
    torch.save(_state(), p, format="safetensors", metadata={"step": "10", "note": "héllo"})
    with safetensors.safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "step": "10", "note": "héllo"}
    with ts.safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "step": "10", "note": "héllo"}
    buf = io.BytesIO()
    torch.save(_state(), buf, format="safetensors", metadata={"a": "b"})
    data = buf.getvalue()
    n = int.from_bytes(data[:8], "little")
    import json

    assert json.loads(data[8 : 8 + n])["__metadata__"] == {"format": "pt", "a": "b"}


def test_metadata_refused_outside_safetensors(tmp_path):
    p = tmp_path / "m.pt"
    with pytest.raises(ValueError, match="metadata"):
        torch.save(_state(), p, metadata={"a": "b"})
    assert not p.exists()


def test_metadata_must_be_str_to_str(tmp_path):
    p = tmp_path / "m.pt"
    with pytest.raises(TypeError):
        torch.save(_state(), p, format="safetensors", metadata={"step": 10})
    assert not p.exists()
    assert os.listdir(tmp_path) == []


def test_transformers_format_key(tmp_path):
    p = tmp_path / "model.safetensors"
    torch.save(_state(), p, format="safetensors")
    with safetensors.safe_open(str(p), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
        assert sorted(f.keys()) == sorted(_state())


# ---- format on load (point 3) ----


def test_load_format_safetensors_with_pickle_file(tmp_path):
    p = tmp_path / "m.pt"
    torch.save(_state(), p, format="pickle")
    with pytest.raises(SafetensorError):
        torch.load(p, format="safetensors")
    buf = io.BytesIO(p.read_bytes())
    with pytest.raises(SafetensorError):
        torch.load(buf, format="safetensors")
    assert issubclass(SafetensorError, ValueError)


def test_load_format_safetensors_with_safetensors_file(st_file):
    p, sd = st_file
    _assert_state_equal(torch.load(p, format="safetensors"), sd)


def test_load_format_pickle_with_safetensors_file_goes_to_torch(st_file):
    p, _ = st_file
    with pytest.raises(pickle.UnpicklingError):
        torch.load(p, format="pickle")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(p.read_bytes()), format="pickle")


def test_load_format_pickle_with_pickle_file(tmp_path):
    sd = _state()
    p = tmp_path / "m.pt"
    torch.save(sd, p)
    _assert_state_equal(torch.load(p, format="pickle"), sd)


# ---- refusal (point 5) ----


REFUSED = [
    ({"a": lambda: 0}, "a"),
    ({"a": {(lambda: 0)}}, "a[0]"),  # one element: a set's order follows hashes
    ({"ok": torch.ones(2), "a": __import__("threading").Lock()}, "a"),
    ({"opt": {"groups": [{"foo": {3: os}}]}}, "opt.groups[0].foo[3]"),
]


@pytest.mark.parametrize("obj,where", REFUSED, ids=[w for _, w in REFUSED])
def test_refusal_names_key_and_creates_nothing(tmp_path, obj, where):
    p = tmp_path / "new.safetensors"
    with pytest.raises(TypeError) as info:
        torch.save(obj, p, format="safetensors")
    msg = str(info.value)
    assert msg.startswith(f"{where}:"), msg
    assert not p.exists()
    assert os.listdir(tmp_path) == []
    # format=None with the suffix refuses the same way
    with pytest.raises(TypeError):
        torch.save(obj, p)
    assert os.listdir(tmp_path) == []


def test_refusal_leaves_existing_file_byte_identical(tmp_path):
    p = tmp_path / "model.safetensors"
    torch.save(_state(), p, format="safetensors")
    before = p.read_bytes()
    st_before = p.stat()
    with pytest.raises(TypeError, match="^a:"):
        torch.save({"a": lambda: 0}, p, format="safetensors")
    assert p.read_bytes() == before
    assert p.stat().st_ino == st_before.st_ino
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_refusal_writes_nothing_to_file_objects(tmp_path):
    buf = io.BytesIO()
    with pytest.raises(TypeError, match="^a:"):
        torch.save({"a": lambda: 0}, buf, format="safetensors")
    assert buf.getvalue() == b"" and buf.tell() == 0
    buf = io.BytesIO(b"keep")
    buf.seek(4)
    with pytest.raises(TypeError):
        torch.save({"a": lambda: 0}, buf, format="safetensors")
    assert buf.getvalue() == b"keep"
    p = tmp_path / "f.bin"
    with open(p, "wb") as f:
        with pytest.raises(TypeError):
            torch.save({"x": torch.ones(1), "a": lambda: 0}, f, format="safetensors")
    assert p.read_bytes() == b""


def test_save_to_unwritable_target(tmp_path):
    with pytest.raises(TypeError):
        torch.save(_state(), 42, format="safetensors")
    with pytest.raises(OSError):
        torch.save(_state(), tmp_path / "missing-dir" / "m.pt", format="safetensors")
    assert os.listdir(tmp_path) == []


def test_atomic_overwrite_leaves_no_temporary(tmp_path):
    p = tmp_path / "m.pt"
    torch.save({"a": torch.zeros(4)}, p, format="safetensors")
    torch.save(_state(), p, format="safetensors")
    assert os.listdir(tmp_path) == ["m.pt"]
    _assert_state_equal(torch.load(p), _state())


# ---- the demo (point 7) ----


def test_demo_command(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "torch_safetensors", "demo", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo passed" in proc.stdout
    assert "payload ran: False" in proc.stdout
    assert not (out / "PWNED").exists()
    assert (out / "model.pt").exists()
    assert _is_safetensors_bytes((out / "model.pt").read_bytes())
