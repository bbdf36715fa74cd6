"""The safetensors.torch API, complete: what the safetensors package documents and tests
for save_model/load_model, the shared-tensor helpers, serialize/deserialize, numpy
handles, backends and exception classes, checked against ours (and against the package
itself where both can run)."""
import copy
import inspect

import numpy as np
import pytest
import torch

import torch_safetensors as ts
from torch_safetensors._api import _end_ptr, _is_complete

st = pytest.importorskip("safetensors")
stt = pytest.importorskip("safetensors.torch")


# ---- models from the package's documentation of shared tensors ----


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = self.a


class Copied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = copy.deepcopy(self.a)


class Untied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)


class Transposed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.a.weight = torch.nn.Parameter(torch.arange(64.0).reshape(8, 8).t())


def assert_same_state(m1, m2):
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k])


# ---- signatures ----


@pytest.mark.parametrize("name", ["save_file", "save", "load_file", "load", "save_model", "load_model",
                                  "storage_ptr", "storage_size", "_find_shared_tensors",
                                  "_remove_duplicate_names"])
def test_signature_matches_the_package(name):
    theirs = inspect.signature(getattr(stt, name)).parameters
    ours = inspect.signature(getattr(ts, name)).parameters
    for pname, p in theirs.items():
        assert pname in ours, f"{name}: missing parameter {pname}"
        q = ours[pname]
        assert q.kind == p.kind, (name, pname)
        assert q.default == p.default, (name, pname, q.default, p.default)
    # anything we add is keyword-only with a default
    for pname in set(ours) - set(theirs):
        assert ours[pname].kind is inspect.Parameter.KEYWORD_ONLY and ours[pname].default is not inspect.Parameter.empty


def test_top_level_names():
    for name in ("serialize", "serialize_file", "deserialize", "safe_open", "SafetensorError", "TensorSpec"):
        assert hasattr(ts, name), name
        assert hasattr(st, name), name
    assert isinstance(ts.__version__, str) and ts.__version__.count(".") == 2


# ---- the shared-tensor helpers ----


def test_is_complete():
    a = torch.zeros((3, 3))
    assert _is_complete(a)
    assert not _is_complete(a[:1, :])
    assert not _is_complete(a[::2, :])  # spans the storage, with holes
    assert _is_complete(torch.zeros((2, 2), device="meta"))


def test_end_ptr():
    a = torch.zeros(4)
    assert _end_ptr(a) - a.data_ptr() == 16
    b = torch.zeros(16)[::4]
    assert _end_ptr(b) - b.data_ptr() == 16 * 3 + 4
    h = torch.zeros(16, dtype=torch.float16)[::4]
    assert _end_ptr(h) - h.data_ptr() == 8 * 3 + 2
    assert _end_ptr(a) == stt._end_ptr(a) and _end_ptr(h) == stt._end_ptr(h)


def test_storage_ptr_and_size():
    w = torch.zeros(4)
    assert ts.storage_ptr(w[2:]) == ts.storage_ptr(w) == stt.storage_ptr(w) != 0
    assert ts.storage_size(w[:1]) == 16 == stt.storage_size(w[:1])
    meta = torch.zeros(3, device="meta")
    assert ts.storage_ptr(meta) == 0 == stt.storage_ptr(meta)
    assert ts.storage_size(meta) == stt.storage_size(meta) == 12


def test_find_shared_tensors():
    a = torch.zeros((3, 3))
    b = a[:1, :]
    assert ts._find_shared_tensors({"A": a, "B": b}) == [{"A", "B"}]
    assert ts._find_shared_tensors({"A": a}) == [{"A"}]
    assert ts._find_shared_tensors({"B": b}) == [{"B"}]
    c = torch.zeros((2, 2), device="meta")
    assert ts._find_shared_tensors({"C": c, "D": c[:1]}) == []  # meta shares nothing


def test_find_shared_tensors_by_overlap():
    a = torch.zeros(4)
    assert ts._find_shared_tensors({"B": a[:2], "C": a[2:]}) == [{"B"}, {"C"}]
    assert ts._find_shared_tensors({"B": a[:2], "C": a[1:]}) == [{"B", "C"}]
    assert ts._find_shared_tensors({"B": a[:2], "C": a[2:], "D": a[:1]}) == [{"B", "D"}, {"C"}]
    # in order of first appearance, as the package
    assert ts._find_shared_tensors(Copied().state_dict()) == [{"a.weight"}, {"a.bias"}, {"b.weight"}, {"b.bias"}]
    sd = Copied().state_dict()
    assert ts._find_shared_tensors(sd) == stt._find_shared_tensors(sd)
    sd = Tied().state_dict()
    assert ts._find_shared_tensors(sd) == stt._find_shared_tensors(sd)


def test_remove_duplicate_names():
    a = torch.zeros((3, 3))
    b = a[:1, :]
    assert ts._remove_duplicate_names({"A": a, "B": b}) == {"A": ["B"]}
    assert ts._remove_duplicate_names({"A": a, "B": b, "C": a}) == {"A": ["B", "C"]}
    with pytest.raises(RuntimeError, match="whole storage"):
        ts._remove_duplicate_names({"B": b})
    # preferences: discard first, preferred above all, among complete names only
    assert ts._remove_duplicate_names({"x": a, "y": a}, discard_names=["x"]) == {"y": ["x"]}
    assert ts._remove_duplicate_names({"x": a, "y": a, "z": b}, preferred_names=["y", "z"]) == {"y": ["x", "z"]}
    sd = {"x": a, "y": a, "z": b}
    assert dict(ts._remove_duplicate_names(sd, discard_names=["x"])) == dict(
        stt._remove_duplicate_names(sd, discard_names=["x"]))


# ---- save_model / load_model ----


def test_save_model_stores_ties_once_and_records_aliases(tmp_path):
    m = Tied()
    p = tmp_path / "m.safetensors"
    ts.save_model(m, p)
    with ts.safe_open(p, framework="pt") as f:
        assert f.keys() == ["a.bias", "a.weight"]
        assert f.metadata() == {"b.bias": "a.bias", "b.weight": "a.weight"}
    m2 = Tied()
    assert ts.load_model(m2, p) == (set(), [])
    assert_same_state(m, m2)
    assert m2.a.weight is m2.b.weight  # the tie survives the load


def test_save_model_matches_the_package(tmp_path):
    m = Tied()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    ts.save_model(m, ours)
    stt.save_model(m, theirs)
    with ts.safe_open(ours) as a, st.safe_open(str(theirs), framework="pt") as b:
        assert a.metadata() == b.metadata()
        assert a.keys() == sorted(b.keys())
    # the data bytes are identical (the header differs only in metadata key order)
    assert ours.read_bytes()[-len(ours.read_bytes()) + 8 + int.from_bytes(ours.read_bytes()[:8], "little"):] == \
        theirs.read_bytes()[8 + int.from_bytes(theirs.read_bytes()[:8], "little"):]
    # each loads the other's file into a tied model
    m2, m3 = Tied(), Tied()
    assert stt.load_model(m2, str(ours)) == (set(), [])
    assert ts.load_model(m3, theirs) == (set(), [])
    assert_same_state(m, m2)
    assert_same_state(m, m3)


def test_save_model_keeps_caller_metadata(tmp_path):
    meta = {"b.weight": "mine", "note": "x"}
    ts.save_model(Tied(), tmp_path / "m.safetensors", metadata=meta)
    assert meta == {"b.weight": "mine", "note": "x"}  # not modified
    with ts.safe_open(tmp_path / "m.safetensors") as f:
        assert f.metadata() == {"b.weight": "mine", "b.bias": "a.bias", "note": "x"}


def test_load_model_with_other_names_on_file(tmp_path):
    m = Tied()
    sd = m.state_dict()
    del sd["a.weight"], sd["a.bias"]
    ts.save_file(sd, tmp_path / "m.safetensors")  # the file keeps the b.* names
    m2 = Tied()
    assert ts.load_model(m2, tmp_path / "m.safetensors") == (set(), [])
    assert_same_state(m, m2)


def test_load_model_copies_and_untied(tmp_path):
    m = Copied()
    ts.save_model(m, tmp_path / "c.safetensors")
    m2 = Copied()
    ts.load_model(m2, tmp_path / "c.safetensors")
    assert_same_state(m, m2)


def test_load_model_reports_missing_tied_names_in_an_untied_model(tmp_path):
    ts.save_model(Tied(), tmp_path / "t.safetensors")
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "b.bias", "b.weight"'):
        ts.load_model(Untied(), tmp_path / "t.safetensors")
    missing, unexpected = ts.load_model(Untied(), tmp_path / "t.safetensors", strict=False)
    assert missing == {"b.bias", "b.weight"} and unexpected == []


def test_load_model_reports_unexpected_names_in_a_tied_model(tmp_path):
    ts.save_model(Untied(), tmp_path / "u.safetensors")
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "b.bias", "b.weight"'):
        ts.load_model(Tied(), tmp_path / "u.safetensors")


def test_load_model_device_and_backend(tmp_path):
    m = Untied()
    ts.save_model(m, tmp_path / "u.safetensors")
    m2 = Untied()
    assert ts.load_model(m2, tmp_path / "u.safetensors", device="cpu", backend="pread") == (set(), [])
    assert_same_state(m, m2)
    with pytest.raises(ts.SafetensorError, match="backend"):
        ts.load_model(m2, tmp_path / "u.safetensors", backend="cuda")


def test_save_model_non_contiguous_is_saved_by_value(tmp_path):
    # the package refuses force_contiguous=False here (ValueError); we store the values
    m = Transposed()
    for force in (False, True):
        ts.save_model(m, tmp_path / "n.safetensors", force_contiguous=force)
        m2 = Transposed()
        ts.load_model(m2, tmp_path / "n.safetensors")
        assert_same_state(m, m2)


def test_save_file_refuses_shared_tensors_like_the_package(tmp_path):
    sd = Tied().state_dict()
    with pytest.raises(RuntimeError):
        stt.save_file(sd, str(tmp_path / "x.safetensors"))
    with pytest.raises(RuntimeError):
        ts.save_file(sd, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ---- exception classes that fit either library ----


BAD_INPUTS = {
    "not a dict": [torch.zeros(1)],
    "not a tensor": {"a": 1},
    "sparse": {"a": torch.eye(2).to_sparse()},
    "meta": {"a": torch.empty(2, device="meta")},
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_unsupported_inputs_fit_either_library(case, tmp_path):
    value = BAD_INPUTS[case]
    # what the package raises, our error is too
    with pytest.raises(Exception) as theirs:
        stt.save_file(value, str(tmp_path / "p.safetensors"))
    with pytest.raises(ts.UnsupportedTensorError) as ours:
        ts.save_file(value, tmp_path / "o.safetensors")
    assert isinstance(ours.value, TypeError)
    base = ValueError if isinstance(theirs.value, ValueError) else RuntimeError
    assert isinstance(theirs.value, base) and isinstance(ours.value, base), (case, type(theirs.value))
    with pytest.raises(base):
        ts.save(value)
    assert not (tmp_path / "o.safetensors").exists()


def test_unsupported_error_is_all_three():
    assert issubclass(ts.UnsupportedTensorError, TypeError)
    assert issubclass(ts.UnsupportedTensorError, ValueError)
    assert issubclass(ts.UnsupportedTensorError, RuntimeError)


def test_names_and_metadata_stay_type_errors(tmp_path):
    with pytest.raises(TypeError):
        ts.save_file({1: torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError):
        ts.save_file({"a": torch.zeros(1)}, tmp_path / "x.safetensors", metadata={"a": 1})


# ---- safe_open: closed handles, numpy, backends ----


@pytest.fixture
def small(tmp_path):
    p = tmp_path / "s.safetensors"
    ts.save_file({"f": torch.arange(6, dtype=torch.float32).reshape(1, 2, 3),
                  "i": torch.arange(4, dtype=torch.int16),
                  "h": torch.ones(2, dtype=torch.bfloat16)}, p, metadata={"k": "v"})
    return p


@pytest.mark.parametrize("method", ["keys", "offset_keys", "metadata", "get_tensors"])
def test_closed_handle_raises_safetensor_error(small, method):
    with ts.safe_open(small, framework="pt") as f:
        pass
    with pytest.raises(ts.SafetensorError, match="closed"):
        getattr(f, method)()
    with pytest.raises(ts.SafetensorError, match="closed"):
        f.get_tensor("f")
    with pytest.raises(ts.SafetensorError, match="closed"):
        f.get_slice("f")


def test_slice_of_a_closed_handle(small):
    f = ts.safe_open(small, framework="pt")
    s = f.get_slice("f")
    f.close()
    with pytest.raises(ts.SafetensorError, match="closed"):
        s[0]


@pytest.mark.parametrize("framework", ["np", "numpy"])
def test_numpy_framework(small, framework):
    with ts.safe_open(small, framework=framework) as ours, st.safe_open(str(small), framework=framework) as theirs:
        for name in ("f", "i"):
            a, b = ours.get_tensor(name), theirs.get_tensor(name)
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ours.get_slice("f")[:, :, 1:2], theirs.get_slice("f")[:, :, 1:2])
        with pytest.raises(TypeError):
            ours.get_tensor("h")  # numpy has no bfloat16: TypeError in both
        with pytest.raises(TypeError):
            theirs.get_tensor("h")


def test_numpy_get_tensors(tmp_path):
    p = tmp_path / "n.safetensors"
    ts.save_file({"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.int64)}, p)
    with ts.safe_open(p, framework="np") as f:
        out = f.get_tensors()
    assert all(isinstance(v, np.ndarray) for v in out.values())
    np.testing.assert_array_equal(out["a"], np.ones(3, dtype=np.float32))


def test_numpy_refuses_other_devices(small):
    with pytest.raises(ValueError, match="CPU"):
        ts.safe_open(small, framework="np", device="meta")


def test_unknown_framework_refused(small):
    with pytest.raises(ValueError, match="framework"):
        ts.safe_open(small, framework="jax")


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_backends_read_the_same(small, backend):
    expected = stt.load_file(str(small))
    got = ts.load_file(small, backend=backend)
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k])
    with ts.safe_open(small, framework="pt", backend=backend) as f:
        assert torch.equal(f.get_tensor("i"), expected["i"])


def test_pread_backend_reads_into_memory(tmp_path):
    # pread copies the bytes: an in-place rewrite of the file does not show through
    p = tmp_path / "w.safetensors"
    ts.save_file({"w": torch.zeros(4096)}, p)
    loaded = ts.load_file(p, backend="pread")
    data = bytearray(p.read_bytes())
    data[-4:] = torch.tensor([7.0]).numpy().tobytes()
    with open(p, "r+b") as f:
        f.write(data)
    assert loaded["w"][-1].item() == 0.0


@pytest.mark.parametrize("backend", ["MMAP", "", "gds", None])
def test_unknown_backend_refused(small, backend):
    with pytest.raises(ts.SafetensorError, match="backend"):
        ts.load_file(small, backend=backend)
    with pytest.raises(ts.SafetensorError, match="backend"):
        ts.safe_open(small, framework="pt", backend=backend)


# ---- serialize / serialize_file / deserialize ----


def _specs(mod, tensors):
    return {k: mod.TensorSpec(dtype=str(v.dtype).split(".")[-1], shape=v.shape, data_ptr=v.data_ptr(),
                              data_len=v.numel() * v.element_size()) for k, v in tensors.items()}


TENSORS = {"w": torch.randn(3, 4), "i": torch.arange(5, dtype=torch.int64), "h": torch.ones(2, 2, dtype=torch.bfloat16),
           "e": torch.zeros(0, 3), "s": torch.tensor(3.5)}


def test_serialize_tensor_specs_like_the_package():
    ours = ts.serialize(_specs(ts, TENSORS), metadata={"k": "v"})
    theirs = st.serialize(_specs(st, TENSORS), metadata={"k": "v"})
    assert bytes(ours) == bytes(theirs)
    assert ours == ts.save(TENSORS, {"k": "v"})


def test_serialize_dict_form():
    raw = {k: {"dtype": v["dtype"], "shape": v["shape"], "data": v["data"]} for k, v in ts.deserialize(ts.save(TENSORS))}
    assert ts.serialize(raw) == ts.save(TENSORS)
    # torch's dtype names are accepted too
    assert ts.serialize({"a": {"dtype": "float32", "shape": [1], "data": b"\x00\x00\x80?"}}) == ts.save({"a": torch.ones(1)})


def test_serialize_file(tmp_path):
    ts.serialize_file(_specs(ts, TENSORS), tmp_path / "a.safetensors", metadata={"k": "v"})
    st.serialize_file(_specs(st, TENSORS), str(tmp_path / "b.safetensors"), metadata={"k": "v"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_deserialize_like_the_package(tmp_path):
    data = ts.save(TENSORS, {"k": "v"})
    ours, theirs = ts.deserialize(data), st.deserialize(data)
    assert dict(ours) == dict(theirs)
    (tmp_path / "d.safetensors").write_bytes(data)
    with ts.safe_open(tmp_path / "d.safetensors") as f:  # in the order of the data in the file
        assert [n for n, _ in ours] == f.offset_keys()
    with pytest.raises(ts.SafetensorError):
        ts.deserialize(data[:-1])


def test_tensor_spec():
    t = torch.ones(2, 3)
    spec = ts.TensorSpec(dtype="float32", shape=t.shape, data_ptr=t.data_ptr(), data_len=24)
    assert (spec.dtype, spec.shape, spec.data_len, spec.data_ptr) == ("F32", [2, 3], 24, t.data_ptr())
    with pytest.raises(ts.SafetensorError, match="unknown dtype"):
        ts.TensorSpec(dtype="F32", shape=[1], data_ptr=0, data_len=4)  # the package wants torch names too
    with pytest.raises(TypeError):
        ts.TensorSpec("float32", [1], 0, 4)  # keyword-only, as the package
    if hasattr(torch, "float4_e2m1fn_x2"):
        spec = ts.TensorSpec(dtype="float4_e2m1fn_x2", shape=[2, 3], data_ptr=0, data_len=6)
        assert spec.shape == [2, 6] == st.TensorSpec(dtype="float4_e2m1fn_x2", shape=[2, 3], data_ptr=0, data_len=6).shape


def test_serialize_refuses_wrong_lengths():
    with pytest.raises(ts.SafetensorError, match="bytes of data"):
        ts.serialize({"a": {"dtype": "F32", "shape": [2], "data": b"1234"}})
    with pytest.raises(ts.SafetensorError, match="unknown dtype"):
        ts.serialize({"a": {"dtype": "F99", "shape": [1], "data": b"1234"}})
    with pytest.raises(TypeError):
        ts.serialize({"a": 3})
