"""Every file object plain torch loads, the wrapper loads the same way (issue: drop-in).

A matrix of file-like classes (BytesIO, BufferedReader, raw FileIO, tarfile and zipfile
members, gzip, an fsspec-style wrapper, minimal classes with each method missing in turn,
streams that cannot seek) times payloads (torch's zip and pre-1.6 formats, tiny and
invalid bytes). For each, ``torch.load`` with torch_safetensors installed must give the
same result as plain torch, or raise the same exception class. Safetensors payloads, which
plain torch cannot read from a file object, load from every object that can be read.
"""
from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile

import pytest
import torch

import torch_safetensors  # noqa: F401 - installs the wrapper
from torch_safetensors import _torch

PLAIN_LOAD = _torch._orig_load


def _state():
    torch.manual_seed(0)
    w = torch.randn(3, 4)
    return {"w": w, "tied": w, "b": torch.arange(5, dtype=torch.int16), "n": 3, "s": "x"}


def _payloads():
    out = {}
    buf = io.BytesIO()
    torch.save(_state(), buf, format="pickle")
    out["zip"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save(_state(), buf, format="pickle", _use_new_zipfile_serialization=False)
    out["pre16"] = buf.getvalue()
    out["four_bytes"] = b"abcd"
    out["empty"] = b""
    out["garbage"] = b"this is not a checkpoint" * 20
    out["truncated_zip"] = out["zip"][: len(out["zip"]) // 2]
    return out


PAYLOADS = _payloads()


def _safetensors_payload() -> bytes:
    buf = io.BytesIO()
    torch.save(_state(), buf, format="safetensors")
    return buf.getvalue()


# ---- the file-like classes ----


class Minimal:
    """Only read/readinto/readline/seek/tell, as research code and torch's tests write them."""

    METHODS = ("read", "readinto", "readline", "seek", "tell")

    def __init__(self, data: bytes, missing: str = ""):
        self._b = io.BytesIO(data)
        self._missing = missing

    def __getattr__(self, name):
        if name in self.METHODS and name != self._missing:
            return getattr(self._b, name)
        raise AttributeError(name)


class FsspecLike:
    """An fsspec AbstractBufferedFile-style object: seekable, no descriptor."""

    def __init__(self, data: bytes):
        self._data = data
        self.loc = 0
        self.mode = "rb"
        self.closed = False

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.loc

    def seek(self, loc, whence=0):
        if whence == 0:
            nloc = loc
        elif whence == 1:
            nloc = self.loc + loc
        elif whence == 2:
            nloc = len(self._data) + loc
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if nloc < 0:
            raise ValueError("Seek before start of file")
        self.loc = nloc
        return self.loc

    def read(self, length=-1):
        if length is None or length < 0:
            length = len(self._data) - self.loc
        out = self._data[self.loc : self.loc + length]
        self.loc += len(out)
        return out

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readline(self):
        end = self._data.find(b"\n", self.loc)
        return self.read((end + 1 - self.loc) if end >= 0 else -1)

    def close(self):
        self.closed = True


class OneArgSeek(Minimal):
    """seek(pos) without whence: the size cannot be asked for."""

    def seek(self, pos):
        return self._b.seek(pos)


class NoSeekStream:
    """read() only: a stream torch cannot seek."""

    def __init__(self, data: bytes):
        self._b = io.BytesIO(data)

    def read(self, n=-1):
        return self._b.read(n)


class UnsupportedSeek(io.RawIOBase):
    """An io class whose seek/tell raise io.UnsupportedOperation (a socket or pipe)."""

    def __init__(self, data: bytes):
        self._b = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        return self._b.readinto(b)


def _make(kind: str, data: bytes, tmp_path):
    """(file object, closer) holding data, for one kind of file-like."""
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    if kind == "bytesio":
        return io.BytesIO(data)
    if kind == "buffered":
        return open(path, "rb")
    if kind == "fileio":
        return io.FileIO(path, "rb")
    if kind == "tar_member":
        tpath = tmp_path / "a.tar"
        with tarfile.open(tpath, "w") as t:
            t.add(path, arcname="ckpt.pt")
        t = tarfile.open(tpath, "r")
        return t.extractfile("ckpt.pt")
    if kind in ("zip_member_stored", "zip_member_deflated"):
        zpath = tmp_path / "a.zip"
        method = zipfile.ZIP_STORED if kind.endswith("stored") else zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(zpath, "w", compression=method) as z:
            z.writestr("ckpt.pt", data)
        return zipfile.ZipFile(zpath).open("ckpt.pt")
    if kind == "gzip":
        gpath = tmp_path / "a.gz"
        with gzip.open(gpath, "wb") as g:
            g.write(data)
        return gzip.open(gpath, "rb")
    if kind == "fsspec_like":
        return FsspecLike(data)
    if kind == "minimal":
        return Minimal(data)
    if kind.startswith("minimal_without_"):
        return Minimal(data, missing=kind[len("minimal_without_"):])
    if kind == "one_arg_seek":
        return OneArgSeek(data)
    if kind == "no_seek_stream":
        return NoSeekStream(data)
    if kind == "unsupported_seek":
        return UnsupportedSeek(data)
    raise AssertionError(kind)


KINDS = ["bytesio", "buffered", "fileio", "tar_member", "zip_member_stored", "zip_member_deflated",
         "gzip", "fsspec_like", "minimal", "one_arg_seek", "no_seek_stream", "unsupported_seek"]
KINDS += [f"minimal_without_{m}" for m in Minimal.METHODS]


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - the outcome is what is compared
        return "error", e


def _assert_equal(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_equal(a[k], b[k])
    else:
        assert a == b


def _assert_same(ours, theirs, what):
    assert ours[0] == theirs[0], (what, ours, theirs)
    if ours[0] == "ok":
        _assert_equal(ours[1], theirs[1])
        # ties survive as in torch
        assert (ours[1]["w"].data_ptr() == ours[1]["tied"].data_ptr()) == (
            theirs[1]["w"].data_ptr() == theirs[1]["tied"].data_ptr())
    else:
        assert type(ours[1]) is type(theirs[1]), (what, repr(ours[1]), repr(theirs[1]))
        # torch's own message comes first (torch's tests match on it); a hint may follow
        assert str(ours[1]).startswith(str(theirs[1]).split("\n")[0]), (what, str(ours[1]), str(theirs[1]))


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("kind", KINDS)
def test_same_as_plain_torch(kind, payload, tmp_path):
    data = PAYLOADS[payload]
    f1 = _make(kind, data, tmp_path)
    ours = _outcome(lambda: torch.load(f1))
    f2 = _make(kind, data, tmp_path)
    theirs = _outcome(lambda: PLAIN_LOAD(f2))
    _assert_same(ours, theirs, (kind, payload))


@pytest.mark.parametrize("kind", ["bytesio", "buffered", "fsspec_like", "minimal", "tar_member"])
@pytest.mark.parametrize("kw", [{"mmap": True}, {"weights_only": False}, {"map_location": "meta"},
                                {"map_location": {"cpu": "cpu"}}, {"map_location": lambda s, loc: s}])
def test_same_as_plain_torch_with_options(kind, kw, tmp_path):
    data = PAYLOADS["zip"]
    ours = _outcome(lambda: torch.load(_make(kind, data, tmp_path), **kw))
    theirs = _outcome(lambda: PLAIN_LOAD(_make(kind, data, tmp_path), **kw))
    if kw.get("map_location") == "meta" and ours[0] == "ok":
        assert theirs[0] == "ok"
        assert {k: (v.device.type, v.shape) for k, v in ours[1].items() if torch.is_tensor(v)} == \
            {k: (v.device.type, v.shape) for k, v in theirs[1].items() if torch.is_tensor(v)}
        return
    _assert_same(ours, theirs, (kind, kw))


@pytest.mark.parametrize("kind", KINDS)
def test_safetensors_from_every_readable_object(kind, tmp_path):
    """Plain torch cannot read safetensors from a file object; the wrapper reads it from
    any object that has read (seekable or not), exactly as from a path."""
    data = _safetensors_payload()
    path = tmp_path / "ref.safetensors"
    path.write_bytes(data)
    want = torch.load(path)
    f = _make(kind, data, tmp_path)
    if kind == "minimal_without_read":
        # readinto alone: torch needs read too; the wrapper leaves such an object to torch
        with pytest.raises(Exception) as theirs:
            PLAIN_LOAD(_make(kind, data, tmp_path))
        with pytest.raises(type(theirs.value)):
            torch.load(f)
        return
    got = torch.load(f)
    _assert_equal(got, want)
    assert got["w"].data_ptr() == got["tied"].data_ptr()


def test_position_is_kept_for_the_next_reader(tmp_path):
    """A checkpoint after other bytes of a stream: loading starts at the position (the
    file runs to the end of the stream) and leaves the object at its end."""
    st = _safetensors_payload()
    f = Minimal(b"HEAD" + st)
    f.seek(4)
    _assert_equal(torch.load(f), torch.load(io.BytesIO(st)))
    assert f.read() == b""


def test_a_misspelt_read_is_torchs_error():
    class NotAFile:
        pass

    ours = _outcome(lambda: torch.load(NotAFile()))
    theirs = _outcome(lambda: PLAIN_LOAD(NotAFile()))
    _assert_same(ours, theirs, "no methods")


def test_a_real_pipe_of_torch_bytes_is_torchs_error(tmp_path):
    r, w = os.pipe()
    os.write(w, PAYLOADS["zip"][:4096])
    os.close(w)
    with open(r, "rb", closefd=True) as f1:
        ours = _outcome(lambda: torch.load(f1))
    assert ours[0] == "error"
    r, w = os.pipe()
    os.write(w, PAYLOADS["zip"][:4096])
    os.close(w)
    with open(r, "rb", closefd=True) as f2:
        theirs = _outcome(lambda: PLAIN_LOAD(f2))
    _assert_same(ours, theirs, "pipe")
