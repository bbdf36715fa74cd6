"""torch.load decides once what f is (``_source.resolve``), then one loader per kind.

Also the messages a newcomer meets when the kind and the call disagree: a legacy file
with ``format="safetensors"``, a safetensors file with ``format="pickle"``, a truncated
safetensors file (named).
"""
from __future__ import annotations

import io
import os
import pickle

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _source, _torch


@pytest.fixture()
def files(tmp_path):
    sd = {"a": torch.arange(6.0).reshape(2, 3)}
    out = {}
    out["st"] = tmp_path / "m.safetensors"
    torch.save(sd, out["st"], format="safetensors")
    out["zip"] = tmp_path / "m.pt"
    torch.save(sd, out["zip"], format="pickle")
    out["pre16"] = tmp_path / "old.pt"
    torch.save(sd, out["pre16"], format="pickle", _use_new_zipfile_serialization=False)
    out["truncated"] = tmp_path / "cut.bin"
    out["truncated"].write_bytes(out["st"].read_bytes()[:-5])
    ts.save_sharded({"a": torch.zeros(100), "b": torch.zeros(100)}, tmp_path / "sh", max_shard_size=500)
    out["index"] = tmp_path / "sh" / "model.safetensors.index.json"
    out["dir"] = tmp_path / "sh"
    return out


def _kind(f):
    with _source.resolve(f) as src:
        return src.kind


def test_paths_resolve_by_content(files):
    assert _kind(files["st"]) == _source.SAFETENSORS
    assert _kind(str(files["truncated"])) == _source.SAFETENSORS  # claims to be: our reader explains
    assert _kind(files["zip"]) == _source.LEGACY
    assert _kind(files["pre16"]) == _source.LEGACY
    assert _kind(files["index"]) == _source.INDEX
    assert _kind(files["dir"]) == _source.DIRECTORY


def test_file_objects_resolve_and_keep_their_position(files):
    data = files["st"].read_bytes()
    b = io.BytesIO(b"xx" + data)
    b.seek(2)
    with _source.resolve(b) as src:
        assert src.kind == _source.FILEOBJ_SAFETENSORS and src.map_fd is None
        assert (src.pos, src.size) == (2, len(data))
    assert b.tell() == 2
    with open(files["st"], "rb") as f:
        with _source.resolve(f) as src:
            assert src.kind == _source.FILEOBJ_SAFETENSORS and src.map_fd == f.fileno()
        assert f.tell() == 0
    with open(files["zip"], "rb") as f:
        assert _kind(f) == _source.FILEOBJ
        assert f.tell() == 0
    r, w = os.pipe()
    with open(r, "rb") as f:
        os.close(w)
        assert _kind(f) == _source.STREAM


class _TellOnly:
    """seek/tell without seekable(): torch calls it seekable, so do we."""

    def __init__(self, data):
        self._b = io.BytesIO(data)

    def read(self, n=-1):
        return self._b.read(n)

    def seek(self, *a):
        return self._b.seek(*a)

    def tell(self):
        return self._b.tell()


def test_seekable_is_decided_as_torch_decides(files):
    f = _TellOnly(files["zip"].read_bytes())
    assert _kind(f) == _source.FILEOBJ
    assert list(torch.load(f)) == ["a"]


def test_every_kind_has_one_loader():
    assert set(_torch.LOADERS) == set(_source.KINDS)


def test_format_safetensors_on_a_legacy_file_says_what_it_is(files):
    with pytest.raises(ts.SafetensorError) as e:
        torch.load(files["zip"], format="safetensors")
    msg = str(e.value)
    assert msg.startswith(str(files["zip"]))
    assert "zip format" in msg and "not a safetensors file" in msg and "convert" in msg
    assert e.value.code == "not_safetensors"
    with pytest.raises(ts.SafetensorError, match="pre-1.6 pickle format"):
        torch.load(files["pre16"], format="safetensors")
    with pytest.raises(ts.SafetensorError, match="zip format\\), not a safetensors file"):
        torch.load(io.BytesIO(files["zip"].read_bytes()), format="safetensors")


def test_format_pickle_on_a_safetensors_file_says_so(files, tmp_path):
    # (not a "*.safetensors" name: torch's own loader hands those to the safetensors package)
    named_bin = tmp_path / "weights.bin"
    named_bin.write_bytes(files["st"].read_bytes())
    for f in (named_bin, io.BytesIO(files["st"].read_bytes())):
        with pytest.raises(pickle.UnpicklingError) as e:
            torch.load(f, format="pickle")
        assert "is a safetensors file" in str(e.value)
        assert "legacy (pickle) checkpoint" not in str(e.value)
        assert "weights_only=False" not in str(e.value)


def test_truncated_file_error_names_the_file(files):
    with pytest.raises(ts.SafetensorError) as e:
        torch.load(files["truncated"])
    assert str(e.value).startswith(str(files["truncated"]) + ": ")


class Custom:
    """A class no allowlist holds."""


def test_torch_refusal_of_a_legacy_file_keeps_the_hint(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"x": Custom()}, path, format="pickle")
    with pytest.raises(pickle.UnpicklingError, match="was not retried unsafely"):
        torch.load(path)


def test_garbage_keeps_torchs_message_without_the_legacy_hint(tmp_path):
    path = tmp_path / "g.pt"
    path.write_bytes(b"\x00garbage bytes, no format at all")
    with pytest.raises(Exception) as theirs:
        _torch._orig_load(path)
    with pytest.raises(type(theirs.value)) as ours:
        torch.load(path)
    assert str(ours.value) == str(theirs.value)


def test_safetensors_api_on_a_legacy_file_says_what_it_is(files):
    for fn in (lambda: ts.load_file(files["zip"]), lambda: ts.safe_open(files["zip"], "pt")):
        with pytest.raises(ts.SafetensorError) as e:
            fn()
        assert str(e.value).startswith(f"{files['zip']}: a legacy PyTorch checkpoint (torch.save's zip format)")
        assert "convert" in str(e.value)
    with pytest.raises(ts.SafetensorError, match="pre-1.6 pickle format\\), not a safetensors file"):
        ts.load_file(files["pre16"])
    with pytest.raises(ts.SafetensorError, match="zip format\\), not a safetensors file"):
        ts.load(files["zip"].read_bytes())
    # a damaged safetensors file keeps the rule it breaks
    with pytest.raises(ts.SafetensorError, match="data bytes"):
        ts.load_file(files["truncated"])


def test_map_location_on_streams_reads_data_values_on_the_cpu():
    """numpy values and bytes are data, not storages: from a BytesIO or a pipe they come
    back whole whatever map_location says, as from a path."""
    np = pytest.importorskip("numpy")
    ckpt = {"rng": np.random.RandomState(0).get_state(), "blob": b"x" * 5000,
            "w": torch.ones(3), "n": np.arange(4)}
    buf = io.BytesIO()
    torch.save(ckpt, buf, format="safetensors")
    data = buf.getvalue()

    class Pipe:
        def __init__(self, d):
            self._b = io.BytesIO(d)

        def read(self, n=-1):
            return self._b.read(n)

    for ml in ("meta", {"cpu": "meta"}, lambda s, loc: s, None):
        for f in (io.BytesIO(data), Pipe(data)):
            out = torch.load(f, map_location=ml)
            assert out["blob"] == ckpt["blob"]
            assert (out["n"] == ckpt["n"]).all() and out["n"].dtype == ckpt["n"].dtype
            assert out["rng"][0] == ckpt["rng"][0] and (out["rng"][1] == ckpt["rng"][1]).all()
            assert out["w"].device.type == ("meta" if ml in ("meta", {"cpu": "meta"}) else "cpu")
