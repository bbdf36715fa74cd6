"""The errors of the safetensors.torch API: the `safetensors` package's exception
classes and message texts wherever its own tests assert them (code matches on them),
checked against the package itself when it is installed."""
import os

import numpy as np
import pytest
import torch

import torch_safetensors as ts

try:
    import safetensors
    import safetensors.torch as st
except ImportError:  # the comparisons below then check our texts only
    st = None

SPARSE = (
    "You are trying to save a sparse tensors: `['test']` which this library does not support. You can make it"
    " a dense tensor before saving with `.to_dense()` but be aware this might make a much larger file than"
    " needed."
)


def _both(call):
    """(ours, the package's) exception of one call given each library's module."""
    out = []
    for lib in (ts, st):
        if lib is None:
            out.append(None)
            continue
        with pytest.raises(Exception) as info:
            call(lib)
        out.append(info.value)
    return out


def test_not_a_tensor(tmp_path):
    ours, theirs = _both(lambda lib: lib.save_file({"test": {"some": "thing"}}, str(tmp_path / "x")))
    assert str(ours) == "Key `test` is invalid, expected torch.Tensor but received <class 'dict'>"
    assert isinstance(ours, (ValueError, TypeError)) and isinstance(ours, ts.UnsupportedTensorError)
    if theirs is not None:
        assert str(ours) == str(theirs) and isinstance(ours, type(theirs))
    assert not (tmp_path / "x").exists()


def test_not_a_dict(tmp_path):
    ours, theirs = _both(lambda lib: lib.save_file("notadict", str(tmp_path / "x")))
    assert str(ours) == "Expected a dict of [str, torch.Tensor] but received <class 'str'>"
    if theirs is not None:
        assert str(ours) == str(theirs) and isinstance(ours, type(theirs))
    with pytest.raises(ValueError, match=r"^Expected a dict of \[str, torch.Tensor\] but received <class 'list'>$"):
        ts.save([1])


def test_sparse(tmp_path):
    sparse = torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (2, 3))
    ours, theirs = _both(lambda lib: lib.save_file({"test": sparse}, str(tmp_path / "x")))
    assert str(ours) == SPARSE and isinstance(ours, ValueError)
    if theirs is not None:
        assert str(ours) == str(theirs)
    # every non-strided tensor is named, in the dict's order, as the package does
    with pytest.raises(ValueError, match=r"`\['b', 'a'\]`"):
        ts.save({"b": sparse, "ok": torch.zeros(1), "a": sparse.to_sparse_csr()})


def test_meta_tensor_keeps_our_advice_after_the_packages_text(tmp_path):
    ours, theirs = _both(lambda lib: lib.save_file({"test": torch.zeros(10, 10, device="meta")},
                                                   str(tmp_path / "x")))
    assert isinstance(ours, RuntimeError)
    assert str(ours).startswith("Cannot copy out of meta tensor; no data! Tensor 'test' is on the meta device")
    assert "to_empty" in str(ours)
    if theirs is not None:
        assert isinstance(theirs, RuntimeError) and str(theirs) in str(ours)


def test_non_tensor_is_reported_before_sparse_and_meta():
    sparse = torch.zeros(2).to_sparse()
    with pytest.raises(ValueError, match="^Key `z` is invalid, expected torch.Tensor but received <class 'int'>$"):
        ts.save({"a": sparse, "m": torch.zeros(1, device="meta"), "z": 3})
    with pytest.raises(ValueError, match="sparse tensors: `\\['a'\\]`"):
        ts.save({"m": torch.zeros(1, device="meta"), "a": sparse})


def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for call in (lambda lib: lib.safe_open("notafile", framework="pt"),
                 lambda lib: lib.load_file("notafile")):
        ours, theirs = _both(call)
        assert type(ours) is FileNotFoundError
        assert str(ours) == "No such file or directory: notafile"
        assert ours.errno == 2
        if theirs is not None:
            assert str(ours) == str(theirs) and type(ours) is type(theirs)
    with pytest.raises(FileNotFoundError, match="^No such file or directory: notafile$"):
        ts.load_model(torch.nn.Linear(1, 1), "notafile")


def _slice_file(tmp_path, lib):
    path = str(tmp_path / f"slice-{lib.__name__}.safetensors")
    lib.save_file({"a": torch.arange(50, dtype=torch.float64).reshape(10, 5)}, path)
    return path


@pytest.mark.parametrize("framework", ["pt", "np"])
def test_slice_index_out_of_range(tmp_path, framework):
    path = _slice_file(tmp_path, ts)
    with ts.safe_open(path, framework=framework) as f:
        s = f.get_slice("a")
        with pytest.raises(ts.SafetensorError) as info:
            s[2:, -6]
        assert str(info.value) == "Invalid index -6 for dimension 1 of size 5"
        assert isinstance(info.value, IndexError)  # what torch (and the package's pt slices) raise
        with pytest.raises(IndexError) as info:
            s[2:, 20]
        assert str(info.value) == ("Error during slicing [2:, 20] with shape [10, 5]: index 20 out of bounds "
                                   "for tensor dimension #1 of size 5")
        with pytest.raises(ts.SafetensorError, match="^Invalid index -11 for dimension 0 of size 10$"):
            s[np.int64(-11)]
        with pytest.raises(ts.SafetensorError, match="dimension #1 of size 5"):
            s[..., 5]
        with pytest.raises(ts.SafetensorError, match="dimension #0 of size 10"):
            s[None, 10, 1]
        # in range: the values torch gives, including the edges and the other index kinds
        full = torch.arange(50, dtype=torch.float64).reshape(10, 5)
        for index in [(slice(2, None), -5), (slice(2, None), 4), -10, (Ellipsis, -1), (None, 3), slice(None, 20),
                      (slice(None), slice(None, 20)), ([0, 1],), (torch.tensor([9]),), ()]:
            got = s[index]
            want = full[index]
            assert np.array_equal(np.asarray(got), want.numpy()), index


def test_slice_messages_match_the_package(tmp_path):
    if st is None:
        pytest.skip("the safetensors package is not installed")
    path = _slice_file(tmp_path, ts)
    for index in [(slice(2, None), -6), (slice(2, None), 20), -11, 10]:
        texts = []
        for lib in (ts, safetensors):
            with lib.safe_open(path, framework="np") as f, pytest.raises(Exception) as info:
                f.get_slice("a")[index]
            texts.append(str(info.value))
        assert texts[0] == texts[1], index


def test_serialize_bad_spec_is_safetensor_error_and_type_error():
    # the package raised SafetensorError for this before 0.8, TypeError since: ours is both
    with pytest.raises(ts.SafetensorError) as info:
        ts.serialize({"test": {"dtype": "float32", "shape": [1]}})
    assert isinstance(info.value, TypeError) and "without ['data']" in str(info.value)


def test_good_saves_unchanged(tmp_path):
    path = str(tmp_path / "ok.safetensors")
    ts.save_file({"a": torch.ones(2), "b": torch.zeros(1, dtype=torch.bfloat16)}, path)
    assert ts.load_file(path)["a"].tolist() == [1.0, 1.0]
    assert os.path.getsize(path) > 0
