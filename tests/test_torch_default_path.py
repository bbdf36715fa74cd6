"""Nothing else changes (issue 3, point 6).

With the wrappers installed, torch's default path is compared against torch's original
functions (``_torch._orig_save`` / ``_torch._orig_load``): the default ``torch.save``
writes the very same bytes, and ``torch.load`` on torch's own files gives the same
result (or the same error) for every combination of mmap, map_location, weights_only,
pickle_module and pickle_load_args, for zip and pre-1.6 (legacy) checkpoints, through a
path and through a file object.

The one deliberate difference: when the caller does not pass ``weights_only``, the
wrapper loads with ``weights_only=True`` whatever torch's default would be (torch 2.13's
own default is already True, but the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment
variable or a custom ``pickle_module`` turn it off). A custom ``pickle_module`` without
``weights_only=False`` is therefore refused by the wrapper (RuntimeError), where torch
would unpickle unsafely. Tests for this difference are at the end of the file.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import warnings
import zipfile
from collections import OrderedDict

import pytest
import torch
import torch.serialization

import torch_safetensors as ts
from torch_safetensors import _legacy, _torch

ORIG_SAVE = _torch._orig_save
ORIG_LOAD = _torch._orig_load


class Custom:
    """A class torch's weights_only unpickler does not allow by default."""

    def __init__(self, value=3):
        self.value = value

    def __eq__(self, other):
        return type(other) is Custom and other.value == self.value


def _checkpoint():
    base = torch.arange(10, dtype=torch.float32)
    return {
        "model": OrderedDict(
            [
                ("w", torch.randn(3, 4, generator=torch.Generator().manual_seed(1))),
                ("b", torch.tensor([1, 2, 3], dtype=torch.int64)),
                ("h", torch.linspace(0, 1, 6).to(torch.float16)),
                ("flag", torch.tensor([True, False])),
            ]
        ),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "frozen": torch.nn.Parameter(torch.zeros(3), requires_grad=False),
        "base": base,
        "view": base[2:7],  # torch keeps the sharing
        "transposed": torch.arange(6.0).reshape(2, 3).t(),
        "nested": {"list": [1, 2.5, "s", None, True], "tuple": (torch.zeros(1), 7), 3: "int key"},
        "epoch": 4,
        "inf": float("inf"),
    }


# ---- comparing results ----


def _assert_same(a, b, path="root"):
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, path
        assert a.shape == b.shape, path
        assert a.stride() == b.stride(), path
        assert a.storage_offset() == b.storage_offset(), path
        assert a.device == b.device, path
        assert a.requires_grad == b.requires_grad, path
        if a.device.type != "meta":
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def _tensors(obj, path="root", out=None):
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{path}.{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{path}[{i}]", out)
    return out


def _sharing(obj):
    """Which tensors share a storage, as a set of frozensets of paths."""
    groups = {}
    for path, t in _tensors(obj):
        if t.device.type == "meta":
            continue
        groups.setdefault(t.untyped_storage().data_ptr(), set()).add(path)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def _outcome(fn):
    """("ok", value) or ("error", type, message), with warnings recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - compared below
            result = ("error", type(e), str(e))
    return result, sorted({str(w.message) for w in caught})


def _assert_same_outcome(ours, theirs):
    (r1, w1), (r2, w2) = ours, theirs
    assert r1[0] == r2[0], (r1, r2)
    if r1[0] == "ok":
        _assert_same(r1[1], r2[1])
        assert _sharing(r1[1]) == _sharing(r2[1])
    else:
        assert r1[1] is r2[1], (r1, r2)
        # the wrapper may add a how-to-move-on hint after torch's own message
        assert r1[2].startswith(r2[2]), (r1[2], r2[2])
    assert w1 == w2


# ---- the files ----


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("default_path")
    obj = _checkpoint()
    zip_path = d / "ckpt.pt"
    legacy_path = d / "ckpt_legacy.pt"
    ORIG_SAVE(obj, zip_path)
    ORIG_SAVE(obj, legacy_path, _use_new_zipfile_serialization=False)
    assert zipfile.is_zipfile(zip_path)
    assert not zipfile.is_zipfile(legacy_path)
    return {"zip": zip_path, "legacy": legacy_path}


def _identity(storage, location):
    return storage


MAP_LOCATIONS = {
    "none": None,
    "str": "cpu",
    "dict": {"cpu": "cpu", "cuda:0": "cpu"},
    "callable": _identity,
    "device": torch.device("cpu"),
}
MMAPS = {"none": None, "true": True, "false": False}
WEIGHTS_ONLY = {"unset": ..., "true": True, "false": False}


def _kwargs(mmap, map_location, weights_only):
    kw = {"mmap": MMAPS[mmap], "map_location": MAP_LOCATIONS[map_location]}
    if WEIGHTS_ONLY[weights_only] is not ...:
        kw["weights_only"] = WEIGHTS_ONLY[weights_only]
    return kw


def _load_both(path, via, **kw):
    """The wrapper's outcome and torch's original outcome, from equal inputs."""

    def run(fn):
        if via == "path":
            return _outcome(lambda: fn(path, **kw))
        if via == "str":
            return _outcome(lambda: fn(str(path), **kw))
        if via == "file":
            def from_file():
                with open(path, "rb") as f:
                    return fn(f, **kw)
            return _outcome(from_file)
        return _outcome(lambda: fn(io.BytesIO(path.read_bytes()), **kw))

    return run(torch.load), run(ORIG_LOAD)


@pytest.mark.parametrize("weights_only", sorted(WEIGHTS_ONLY))
@pytest.mark.parametrize("map_location", sorted(MAP_LOCATIONS))
@pytest.mark.parametrize("mmap", sorted(MMAPS))
@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_load_matrix_path(checkpoint_files, kind, mmap, map_location, weights_only):
    ours, theirs = _load_both(checkpoint_files[kind], "path", **_kwargs(mmap, map_location, weights_only))
    if kind == "legacy" and MMAPS[mmap] is True and ours[0][0] == "ok":
        # torch refuses to map a pre-1.6 file; our C reader maps it (issue 15)
        assert theirs[0][0] == "error" and theirs[0][1] is RuntimeError
        _assert_same(ours[0][1], _checkpoint())
        return
    _assert_same_outcome(ours, theirs)
    # the checkpoint really loads (mmap=True on a legacy file is torch's own error)
    if kind == "zip" or MMAPS[mmap] is not True:
        assert ours[0][0] == "ok", ours
        _assert_same(ours[0][1], _checkpoint())
    else:
        assert ours[0][0] == "error" and ours[0][1] is RuntimeError


@pytest.mark.parametrize("via", ["str", "file", "bytesio"])
@pytest.mark.parametrize("weights_only", sorted(WEIGHTS_ONLY))
@pytest.mark.parametrize("mmap", sorted(MMAPS))
@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_load_matrix_other_f(checkpoint_files, kind, mmap, weights_only, via):
    for map_location in ("none", "callable"):
        ours, theirs = _load_both(checkpoint_files[kind], via, **_kwargs(mmap, map_location, weights_only))
        if kind == "legacy" and MMAPS[mmap] is True and ours[0][0] == "ok":
            # torch refuses to map a pre-1.6 file; our C reader maps it (issue 15)
            assert theirs[0][0] == "error" and theirs[0][1] is RuntimeError
            _assert_same(ours[0][1], _checkpoint())
            continue
        _assert_same_outcome(ours, theirs)


@pytest.mark.parametrize("map_location", sorted(MAP_LOCATIONS))
@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_pickle_module_with_weights_only_false(checkpoint_files, kind, map_location):
    kw = {"pickle_module": pickle, "weights_only": False, "map_location": MAP_LOCATIONS[map_location]}
    ours, theirs = _load_both(checkpoint_files[kind], "path", **kw)
    _assert_same_outcome(ours, theirs)
    assert ours[0][0] == "ok"
    # positional map_location and pickle_module, as old code passes them
    ours = _outcome(lambda: torch.load(checkpoint_files[kind], MAP_LOCATIONS[map_location], pickle, weights_only=False))
    theirs = _outcome(lambda: ORIG_LOAD(checkpoint_files[kind], MAP_LOCATIONS[map_location], pickle, weights_only=False))
    _assert_same_outcome(ours, theirs)


@pytest.mark.parametrize("mmap", sorted(MMAPS))
@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_pickle_load_args(checkpoint_files, kind, mmap):
    kw = {"weights_only": False, "encoding": "latin1", "mmap": MMAPS[mmap]}
    ours, theirs = _load_both(checkpoint_files[kind], "path", **kw)
    _assert_same_outcome(ours, theirs)
    # with weights_only=True torch warns that pickle_load_args are ignored: the same warning
    ours, theirs = _load_both(checkpoint_files[kind], "path", weights_only=True, encoding="latin1")
    _assert_same_outcome(ours, theirs)


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_map_location_meta_and_torch_serialization_load(checkpoint_files, kind):
    ours, theirs = _load_both(checkpoint_files[kind], "path", map_location="meta")
    _assert_same_outcome(ours, theirs)
    # torch's internal callers use torch.serialization.load: the same wrapper
    assert torch.serialization.load is torch.load
    _assert_same(torch.serialization.load(checkpoint_files[kind]), ORIG_LOAD(checkpoint_files[kind]))


def test_errors_are_torchs(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    truncated = tmp_path / "truncated.pt"
    buf = io.BytesIO()
    ORIG_SAVE(_checkpoint(), buf)
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    # (a directory is not compared: loading a directory of shards is a feature of its own)
    for path in (tmp_path / "missing.pt", truncated):
        for kw in ({}, {"weights_only": False}, {"mmap": True}):
            ours, theirs = _load_both(path, "path", **kw)
            assert ours[0][0] == "error", (path, kw)
            _assert_same_outcome(ours, theirs)
    # bytes that are neither safetensors nor a torch format: torch's own exception and
    # message (code and torch's own tests catch them by class and text)
    for path in (empty, garbage):
        for via in ("path", "file", "bytesio"):
            for kw in ({}, {"weights_only": False}):
                ours, theirs = _load_both(path, via, **kw)
                assert ours[0][0] == "error", (path, via, kw)
                _assert_same_outcome(ours, theirs)


# ---- saving ----


def _save_bytes(fn, obj, **kw):
    buf = io.BytesIO()
    fn(obj, buf, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"_use_new_zipfile_serialization": False},
        {"pickle_protocol": 4},
        {"pickle_module": pickle},
        {"_disable_byteorder_record": True},
    ],
    ids=["default", "legacy", "protocol4", "pickle_module", "no_byteorder"],
)
def test_default_save_is_byte_identical(tmp_path, kw):
    obj = _checkpoint()
    # torch's zip is deterministic: the original writes the same bytes twice
    assert _save_bytes(ORIG_SAVE, obj, **kw) == _save_bytes(ORIG_SAVE, obj, **kw)
    ours = _save_bytes(torch.save, obj, **kw)
    assert ours == _save_bytes(ORIG_SAVE, obj, **kw)
    assert zipfile.is_zipfile(io.BytesIO(ours)) is (kw.get("_use_new_zipfile_serialization", True))
    # through a path: same name in two directories (the archive name comes from it)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save(obj, tmp_path / "a" / "ckpt.pt", **kw)
    ORIG_SAVE(obj, tmp_path / "b" / "ckpt.pt", **kw)
    assert (tmp_path / "a" / "ckpt.pt").read_bytes() == (tmp_path / "b" / "ckpt.pt").read_bytes()
    torch.serialization.save(obj, str(tmp_path / "a" / "ckpt.pt"), **kw)
    assert (tmp_path / "a" / "ckpt.pt").read_bytes() == (tmp_path / "b" / "ckpt.pt").read_bytes()
    _assert_same(torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False), obj)


def test_default_save_positional_arguments(tmp_path):
    obj = _checkpoint()
    ours = io.BytesIO()
    theirs = io.BytesIO()
    torch.save(obj, ours, pickle, 2, True)
    ORIG_SAVE(obj, theirs, pickle, 2, True)
    assert ours.getvalue() == theirs.getvalue()


def test_default_save_of_any_object_still_works(tmp_path):
    # format=None is torch's own format: what safetensors would refuse is fine here
    obj = {"custom": Custom(5), "set": {1, 2}, "bytes": b"raw", "fn": len}
    p = tmp_path / "any.pt"
    torch.save(obj, p)
    assert zipfile.is_zipfile(p)
    loaded = torch.load(p, weights_only=False)
    assert loaded == obj


def test_default_save_errors_are_torchs(tmp_path):
    for target in (tmp_path / "missing" / "x.pt", str(tmp_path / "missing" / "y.pt")):
        ours = _outcome(lambda: torch.save(_checkpoint(), target))
        theirs = _outcome(lambda: ORIG_SAVE(_checkpoint(), target))
        assert ours[0][0] == "error"
        _assert_same_outcome(ours, theirs)
    ours = _outcome(lambda: torch.save({"fn": lambda x: x}, io.BytesIO()))
    theirs = _outcome(lambda: ORIG_SAVE({"fn": lambda x: x}, io.BytesIO()))
    assert ours[0][0] == "error"
    _assert_same_outcome(ours, theirs)
    assert os.listdir(tmp_path) == []


# ---- the one deliberate difference: weights_only defaults to True ----


@pytest.fixture
def custom_file(tmp_path):
    p = tmp_path / "custom.pt"
    ORIG_SAVE({"w": torch.ones(2), "obj": Custom(9)}, p)
    return p


def test_unallowed_global_refused_without_weights_only(custom_file):
    with pytest.raises(pickle.UnpicklingError) as info:
        torch.load(custom_file)
    msg = str(info.value)
    assert "Custom" in msg
    assert "add_safe_globals" in msg
    with pytest.raises(pickle.UnpicklingError):
        torch.load(custom_file, weights_only=True)
    with open(custom_file, "rb") as f:
        with pytest.raises(pickle.UnpicklingError):
            torch.load(f)


def test_unallowed_global_loads_with_weights_only_false(custom_file):
    loaded = torch.load(custom_file, weights_only=False)
    assert loaded["obj"] == Custom(9)
    assert torch.equal(loaded["w"], torch.ones(2))
    _assert_same(loaded, ORIG_LOAD(custom_file, weights_only=False))


def test_allowlisted_global_loads_by_default(custom_file):
    with torch.serialization.safe_globals([Custom]):
        loaded = torch.load(custom_file)
    assert loaded["obj"] == Custom(9)


def test_env_force_no_weights_only_is_not_honoured(custom_file, monkeypatch):
    # torch turns weights_only off when this variable is set and the caller passed nothing
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ORIG_LOAD(custom_file)["obj"] == Custom(9)
    # the wrapper passes weights_only=True explicitly, so it stays safe
    with pytest.raises(pickle.UnpicklingError):
        torch.load(custom_file)
    assert torch.load(custom_file, weights_only=False)["obj"] == Custom(9)


def test_custom_pickle_module_needs_explicit_weights_only_false(custom_file, checkpoint_files):
    # torch alone would silently unpickle with pickle_module and no weights_only
    assert ORIG_LOAD(custom_file, pickle_module=pickle)["obj"] == Custom(9)
    for path in (custom_file, checkpoint_files["zip"], checkpoint_files["legacy"]):
        with pytest.raises(RuntimeError) as info:
            torch.load(path, pickle_module=pickle)
        assert "torch_safetensors" in str(info.value)
        assert "weights_only=False" in str(info.value)
        with pytest.raises(RuntimeError):
            torch.load(path, pickle_module=pickle, weights_only=True)
        with pytest.raises(RuntimeError):
            torch.load(path, None, pickle)  # positional pickle_module
    assert torch.load(custom_file, pickle_module=pickle, weights_only=False)["obj"] == Custom(9)


def test_failed_safe_load_is_not_retried(custom_file, monkeypatch):
    calls = []
    real = _torch._orig_load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(_legacy, "torch_load_fn", spy)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(custom_file)
    assert calls == [True]


def test_wrapper_is_installed_for_these_tests():
    assert ts.installed()
    assert torch.load is not ORIG_LOAD and torch.save is not ORIG_SAVE
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") in (None, "0", "")
