"""Errors and refusals of whole checkpoints (issue 22, section 4): malformed structures
raise SafetensorError naming the node; per-channel quantized parameters are checked as
torch's loader checks them; jagged nested tensors are stored; every refusal is a
TypeError, so the pickle fallback applies to it."""
from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _api, _checkpoint, _cli, _default
from torch_safetensors._core import SafetensorError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def craft(path, tensors, root):
    meta = {_checkpoint.STRUCTURE_KEY: json.dumps({"version": 2, "root": root})}
    _api.save_file(tensors, str(path), metadata=meta)
    return str(path)


@pytest.mark.parametrize("root,where", [
    ({"d": {"a": {"l": [1, {"c": [10 ** 400, 0]}]}}}, "a[1]"),
    ({"d": {"x": {"b": {"tk": "sparse_coo", "size": [4], "coalesced": True,
                        "indices": {"t": "i"}, "values": {"t": "v"}}}}}, "at x"),
    ({"d": {"k": {"d": [[{"l": []}, 1]]}}}, "k[0]"),
])
def test_malformed_structures_raise_safetensor_error_naming_the_node(tmp_path, root, where):
    tensors = {"i": torch.zeros(1, 1, dtype=torch.int64), "v": torch.zeros(1, dtype=torch.uint8)}
    p = craft(tmp_path / "a.safetensors", tensors, root)
    with pytest.raises(SafetensorError) as info:
        torch.load(p)
    assert where in str(info.value)


def test_a_namespace_keeps_exactly_what_vars_held(tmp_path):
    ns = argparse.Namespace(lr=0.1)
    ns.__dict__["__class__"] = "not a class"  # vars() shows it; setattr would fail
    back = torch.load(ts_save(tmp_path, {"ns": ns}))["ns"]
    assert type(back) is argparse.Namespace and vars(back) == vars(ns)
    p = craft(tmp_path / "b.safetensors", {}, {"ns": {"__class__": 1, "__dict__": 2}})
    back = torch.load(p)
    assert type(back) is argparse.Namespace and vars(back) == {"__class__": 1, "__dict__": 2}


def ts_save(tmp_path, obj, name="a.safetensors"):
    torch.save(obj, tmp_path / name, format="safetensors")
    return tmp_path / name


def _per_channel(tmp_path, scales, zero_points, axis, shape=(3, 4), scheme="per_channel_affine"):
    tensors = {"q": torch.zeros(shape, dtype=torch.uint8), "s": scales, "z": zero_points}
    return craft(tmp_path / "q.safetensors", tensors, {"d": {"w": {
        "tk": "quant", "dtype": "quint8", "scheme": scheme, "int": {"t": "q"},
        "scales": {"t": "s"}, "zero_points": {"t": "z"}, "axis": axis}}})


@pytest.mark.parametrize("scales,zero_points,axis,fragment", [
    (torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), 2, "axis 2 out of range"),
    (torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), -1, "axis -1 out of range"),
    (torch.ones(4, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), 0, "w.scales"),
    (torch.ones(3, dtype=torch.float64), torch.zeros(2, dtype=torch.int64), 0, "w.zero_points"),
    (torch.ones(3, dtype=torch.float32), torch.zeros(3, dtype=torch.int64), 0, "w.scales"),
    (torch.ones(3, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), 0, "w.scales"),
])
def test_per_channel_parameters_are_checked_as_torch_checks_them(tmp_path, scales, zero_points, axis, fragment):
    p = _per_channel(tmp_path, scales, zero_points, axis)
    with pytest.raises(SafetensorError, match=fragment):
        torch.load(p)
    assert _cli.main(["verify", p]) == _cli.EXIT_INVALID


def test_valid_per_channel_loads(tmp_path):
    p = _per_channel(tmp_path, torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.int64), 1)
    w = torch.load(p)["w"]
    assert w.q_per_channel_axis() == 1 and w.shape == (3, 4)


def test_jagged_nested_tensors_are_stored(tmp_path, capsys):
    nt = torch.nested.nested_tensor([torch.ones(2, 3), torch.arange(12.0).reshape(4, 3)], layout=torch.jagged)
    p = ts_save(tmp_path, {"n": nt, "strided": torch.nested.nested_tensor([torch.ones(2)])})
    back = torch.load(p)["n"]
    assert back.layout is torch.jagged and back.is_nested
    assert all(torch.equal(a, b) for a, b in zip(back.unbind(), nt.unbind()))
    assert _cli.main(["verify", "--data", str(p)]) == 0, capsys.readouterr().out


class _Stubborn(torch.Tensor):
    """A traceable subclass (the "tsub" row) whose flatten raises NotImplementedError, as
    some do. (A __torch_function__ subclass whose overrides all raise is no refusal any
    more: its storage is saved with the overrides disabled, see test_tensor_subclasses.)"""

    def __tensor_flatten__(self):
        raise NotImplementedError("__tensor_flatten__ is not supported")

    @classmethod
    def __tensor_unflatten__(cls, inner, ctx, outer_size, outer_stride):
        raise NotImplementedError("__tensor_unflatten__ is not supported")


def test_every_refusal_is_a_type_error_naming_the_path(tmp_path):
    bad = torch.ones(2).as_subclass(_Stubborn)
    with pytest.raises(TypeError, match=r"model\.w: .*NotImplementedError"):
        torch.save({"model": {"w": bad}}, tmp_path / "a.safetensors", format="safetensors")


def test_the_pickle_fallback_applies_to_a_refusal_whatever_raised_it(tmp_path):
    saved = (_default._format, _default._fallback)
    try:
        ts.set_default_format("safetensors", fallback="pickle")
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.save({"w": torch.ones(2), "odd": torch.ones(2).as_subclass(_Stubborn)}, tmp_path / "x.pt")
        assert any(issubclass(w.category, ts.PickleFallbackWarning) for w in rec)
        assert (tmp_path / "x.pt").read_bytes()[:2] == b"PK"  # torch's zip
    finally:
        _default._format, _default._fallback = saved


def test_ordered_dict_attributes_cannot_hide_its_methods(tmp_path):
    p = craft(tmp_path / "a.safetensors", {}, {"oda": [{"a": 1}, {"keys": 1}]})
    with pytest.raises(SafetensorError, match="hide an OrderedDict method"):
        torch.load(p)
    assert _cli.main(["verify", p]) == _cli.EXIT_INVALID
    od = __import__("collections").OrderedDict(a=1)
    od.items = "x"
    with pytest.raises(TypeError, match="would hide an OrderedDict method"):
        torch.save({"od": od}, tmp_path / "b.safetensors", format="safetensors")
    od = __import__("collections").OrderedDict(a=1)
    od._metadata = {"": {"version": 1}}
    od.note = "kept"
    back = torch.load(ts_save(tmp_path, {"od": od}, "c.safetensors"))["od"]
    assert back._metadata == od._metadata and back.note == "kept"


def test_attack_findings_stay_fixed(tmp_path):
    """From the section 6 attack: a torch refusal of an unsupported part dtype is a
    SafetensorError, and a value that is data reads the stored bytes whatever flags another
    node gave the same tensor object (the validator accepted both)."""
    p = craft(tmp_path / "a.safetensors", {"u": torch.zeros(4, dtype=torch.uint16)},
              {"tk": "nested", "layout": "strided", "parts": [{"t": "u"}]})
    with pytest.raises(SafetensorError, match="cannot be rebuilt"):
        torch.load(p)
    p = craft(tmp_path / "b.safetensors", {"w": torch.arange(4.0)},
              {"l": [{"t": "w", "g": 1}, {"nd": ["<f4", {"t": "w", "same": 1}]}]})
    w, arr = torch.load(p)
    assert w.requires_grad and arr.tolist() == [0.0, 1.0, 2.0, 3.0]
