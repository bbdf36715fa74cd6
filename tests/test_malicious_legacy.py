"""Malicious legacy checkpoints are refused and their payload never runs (issue 3, point 4).

Every fixture is built here, in tmp_path: a payload whose ``__reduce__`` calls os.system,
eval, exec or subprocess.call to create a marker file, packaged as a torch zip
checkpoint, a pre-1.6 legacy checkpoint and a raw pickle. Loading any of them through
the wrapped torch.load must raise and leave no marker; with ``weights_only=False``
passed explicitly torch's own behaviour is unchanged, so the payload runs (which proves
the fixture is real).
"""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import warnings

import pytest
import torch

from torch_safetensors import _legacy, _torch

KINDS = ["os_system", "eval", "exec", "subprocess"]
CONTAINERS = ["zip", "legacy", "raw_pickle", "raw_pickle_p2"]


class Payload:
    """Pickles as a call that creates ``marker`` (harmless, but real code execution)."""

    def __init__(self, kind: str, marker: str):
        self.kind = kind
        self.marker = marker

    def __reduce__(self):
        m = self.marker
        if self.kind == "os_system":
            return (os.system, (f"touch '{m}'",))
        if self.kind == "eval":
            return (eval, (f"open({m!r}, 'w').close()",))
        if self.kind == "exec":
            return (exec, (f"open({m!r}, 'w').close()",))
        if self.kind == "subprocess":
            return (subprocess.call, (["touch", m],))
        raise AssertionError(self.kind)


def _build(tmp_path, kind: str, container: str, name: str = "evil.pt"):
    """Writes the malicious file; returns (path, marker path)."""
    marker = tmp_path / f"MARKER_{kind}_{container}"
    path = tmp_path / name
    obj = {"w": torch.arange(4.0), "x": Payload(kind, str(marker))}
    if container == "zip":
        torch.save(obj, path, format="pickle")
    elif container == "legacy":
        torch.save(obj, path, format="pickle", _use_new_zipfile_serialization=False)
    elif container == "raw_pickle":
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    elif container == "raw_pickle_p2":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    else:
        raise AssertionError(container)
    assert not marker.exists()
    return path, marker


def _assert_refused(load, marker):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocol 4
        with pytest.raises((pickle.UnpicklingError, RuntimeError)) as info:
            load()
    assert not marker.exists(), "the payload ran"
    return info.value


def _assert_hint(exc):
    assert isinstance(exc, pickle.UnpicklingError), type(exc)
    msg = str(exc)
    assert "add_safe_globals" in msg
    assert "convert" in msg and 'format="safetensors"' in msg
    assert "not retried" in msg


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", KINDS)
def test_refused_by_path(tmp_path, kind, container):
    path, marker = _build(tmp_path, kind, container)
    exc = _assert_refused(lambda: torch.load(path), marker)
    _assert_hint(exc)
    exc = _assert_refused(lambda: torch.load(str(path), map_location="cpu"), marker)
    _assert_hint(exc)
    # weights_only=True passed explicitly, and torch.serialization.load, behave the same
    _assert_refused(lambda: torch.load(path, weights_only=True), marker)
    _assert_refused(lambda: torch.serialization.load(path), marker)


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", KINDS)
def test_refused_by_file_object(tmp_path, kind, container):
    path, marker = _build(tmp_path, kind, container)

    def from_file():
        with open(path, "rb") as f:
            return torch.load(f)

    _assert_hint(_assert_refused(from_file, marker))
    _assert_hint(_assert_refused(lambda: torch.load(io.BytesIO(path.read_bytes())), marker))


@pytest.mark.parametrize("kind", KINDS)
def test_refused_zip_with_mmap(tmp_path, kind):
    path, marker = _build(tmp_path, kind, "zip")
    _assert_hint(_assert_refused(lambda: torch.load(path, mmap=True), marker))
    _assert_hint(_assert_refused(lambda: torch.load(path, mmap=True, map_location=lambda s, loc: s), marker))


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", KINDS)
def test_refused_when_named_safetensors(tmp_path, kind, container):
    path, marker = _build(tmp_path, kind, container, name="evil.safetensors")
    _assert_hint(_assert_refused(lambda: torch.load(path), marker))
    if container == "zip":
        _assert_hint(_assert_refused(lambda: torch.load(path, mmap=True), marker))
    # asking for safetensors explicitly refuses without ever unpickling
    from torch_safetensors import SafetensorError

    with pytest.raises(SafetensorError):
        torch.load(path, format="safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", KINDS)
def test_refused_with_format_pickle(tmp_path, kind, container):
    path, marker = _build(tmp_path, kind, container)
    _assert_refused(lambda: torch.load(path, format="pickle"), marker)


@pytest.mark.parametrize("kind", KINDS)
def test_never_retried_unsafely(tmp_path, kind, monkeypatch):
    path, marker = _build(tmp_path, kind, "zip")
    calls = []
    real = _torch._orig_load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(_legacy, "torch_load_fn", spy)
    _assert_refused(lambda: torch.load(path), marker)
    assert calls == [True]


@pytest.mark.parametrize("kind", KINDS)
def test_refused_even_when_torch_is_told_to_be_unsafe(tmp_path, kind, monkeypatch):
    # torch turns weights_only off when this variable is set and weights_only is not
    # passed; the wrapper passes weights_only=True explicitly, so it stays safe
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path, marker = _build(tmp_path, kind, "zip")
    _assert_refused(lambda: torch.load(path), marker)


@pytest.mark.parametrize("kind", KINDS)
def test_custom_pickle_module_refused_before_unpickling(tmp_path, kind):
    path, marker = _build(tmp_path, kind, "zip")
    with pytest.raises(RuntimeError, match="pickle_module"):
        torch.load(path, pickle_module=pickle)
    assert not marker.exists()


# ---- weights_only=False passed explicitly: torch's behaviour, unchanged ----


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("kind", KINDS)
def test_explicit_unsafe_load_runs_payload_like_torch(tmp_path, kind, container):
    path, marker = _build(tmp_path, kind, container)
    loaded = torch.load(path, weights_only=False)
    assert marker.exists(), "the fixture is not a real payload"
    assert torch.equal(loaded["w"], torch.arange(4.0))
    marker.unlink()
    theirs = _torch._orig_load(path, weights_only=False)
    assert marker.exists()
    assert set(loaded) == set(theirs) == {"w", "x"}
    assert type(loaded["x"]) is type(theirs["x"])


@pytest.mark.parametrize("kind", KINDS)
def test_explicit_unsafe_load_zip_with_mmap_runs_payload(tmp_path, kind):
    path, marker = _build(tmp_path, kind, "zip", name="evil.safetensors")
    loaded = torch.load(path, weights_only=False, mmap=True)
    assert marker.exists()
    assert torch.equal(loaded["w"], torch.arange(4.0))


@pytest.mark.parametrize("container", ["raw_pickle", "raw_pickle_p2"])
@pytest.mark.parametrize("kind", KINDS)
def test_explicit_unsafe_load_raw_pickle_like_torch(tmp_path, kind, container):
    # torch's legacy loader unpickles the first object (running the payload), then fails
    # on the missing magic number: the wrapper must do exactly the same
    path, marker = _build(tmp_path, kind, container)
    with pytest.raises(RuntimeError) as ours:
        torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(RuntimeError) as theirs:
        _torch._orig_load(path, weights_only=False)
    assert marker.exists()
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("kind", KINDS)
def test_explicit_unsafe_load_by_file_object(tmp_path, kind):
    path, marker = _build(tmp_path, kind, "legacy")
    with open(path, "rb") as f:
        loaded = torch.load(f, weights_only=False)
    assert marker.exists()
    assert set(loaded) == {"w", "x"}
