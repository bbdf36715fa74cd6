"""Whole training checkpoints as safetensors (issue 4).

Real training state round trips exactly and training resumes bit for bit; the structure
(container types, key types, key order, plain values) comes back exactly; ties are
stored once and restored sharing storage, other views are stored as values; Parameters
and requires_grad survive; what cannot be stored is refused by path before anything is
written; the file stays readable by the safetensors package; and hostile structure
metadata never builds anything but plain containers, plain values and tensors.
"""
from __future__ import annotations

import collections
import io
import json
import math
import os
import random
from collections import OrderedDict

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torch_safetensors as ts
from torch_safetensors import _checkpoint

SafetensorError = ts.SafetensorError
STRUCTURE_KEY = "torch_safetensors.structure"


# ---- helpers ----


def _roundtrip(obj, via, tmp_path=None, **load_kw):
    if via == "path":
        p = tmp_path / "ckpt.safetensors"
        torch.save(obj, p, format="safetensors")
        return torch.load(p, **load_kw)
    buf = io.BytesIO()
    torch.save(obj, buf, format="safetensors")
    buf.seek(0)
    return torch.load(buf, **load_kw)


def _assert_exact(a, b, path="root"):
    """Same types all the way down, same key order, equal values (nan == nan, -0.0 kept)."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.requires_grad == b.requires_grad, path
        assert a.device == b.device, path
        if a.device.type != "meta":
            assert torch.equal(a.detach().reshape(-1).view(torch.uint8) if a.numel() else a.detach(),
                               b.detach().reshape(-1).view(torch.uint8) if b.numel() else b.detach()), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for ka, kb in zip(a, b):
            assert type(ka) is type(kb), (path, ka)
        for k in a:
            _assert_exact(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_exact(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        if math.isnan(a):
            assert math.isnan(b), path
        else:
            assert a == b and math.copysign(1.0, a) == math.copysign(1.0, b), (path, a, b)
    else:
        assert a == b, (path, a, b)


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])


def _file_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, format="safetensors")
    return buf.getvalue()


# ---- real training checkpoints ----


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 16))
        self.norm = nn.BatchNorm1d(16)  # buffers, incl. an int64 num_batches_tracked
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.body(x))))


def _make(opt_kind, seed):
    torch.manual_seed(seed)
    model = Net()
    if opt_kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=50)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    return model, opt, sched, scaler


def _train_step(model, opt, sched, scaler):
    # data, dropout and a python-random choice all come from the saved RNG states
    x = torch.randn(8, 6)
    y = torch.randint(0, 3, (8,))
    if random.random() < 0.5:
        x = x * 2
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    loss = nn.functional.cross_entropy(out.float(), y)
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()


@pytest.mark.parametrize("via", ["path", "bytesio"])
@pytest.mark.parametrize("opt_kind", ["sgd", "adamw"])
def test_training_checkpoint_resumes_bitwise(tmp_path, opt_kind, via):
    random.seed(1)
    model, opt, sched, scaler = _make(opt_kind, seed=0)
    for _ in range(3):
        _train_step(model, opt, sched, scaler)
    ckpt = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "epoch": 3,
        "best": float("inf"),
    }
    if via == "path":
        p = tmp_path / "ckpt.pt"
        torch.save(ckpt, p, format="safetensors")
        file_before = p.read_bytes()
        loaded = torch.load(p)
    else:
        buf = io.BytesIO()
        torch.save(ckpt, buf, format="safetensors")
        buf.seek(0)
        loaded = torch.load(buf)
    # exactly the same structure and values, before training moves on
    _assert_exact(loaded, ckpt)
    assert type(loaded["model"]) is OrderedDict
    assert list(loaded["optimizer"]["state"]) == list(range(len(list(model.parameters()))))
    assert type(loaded["optimizer"]["param_groups"][0]["betas"] if opt_kind == "adamw" else ()) is tuple
    assert type(loaded["py_rng"]) is tuple and type(loaded["py_rng"][1]) is tuple

    # the original continues for one step
    _train_step(model, opt, sched, scaler)
    want = {k: v.detach().clone() for k, v in model.state_dict().items()}
    want_lr = sched.get_last_lr()
    want_scale = scaler.get_scale()
    want_opt = opt.state_dict()

    # a fresh run, differently initialised, restored from the file
    model2, opt2, sched2, scaler2 = _make(opt_kind, seed=123)
    assert not torch.equal(model2.head.weight, want["head.weight"])
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    scaler2.load_state_dict(loaded["scaler"])
    torch.set_rng_state(loaded["rng"])
    random.setstate(loaded["py_rng"])
    _train_step(model2, opt2, sched2, scaler2)

    got = model2.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k  # bitwise: no tolerance
    assert sched2.get_last_lr() == want_lr
    assert scaler2.get_scale() == want_scale
    _assert_exact(opt2.state_dict(), want_opt)
    if via == "path":
        # training wrote into the loaded tensors: the private mapping kept it off the file
        assert p.read_bytes() == file_before


def test_training_checkpoint_readable_by_safetensors_package(tmp_path):
    model, opt, sched, scaler = _make("sgd", seed=0)
    _train_step(model, opt, sched, scaler)
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}
    p = tmp_path / "ckpt.safetensors"
    torch.save(ckpt, p, format="safetensors")
    with safetensors.safe_open(str(p), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        assert torch.equal(f.get_tensor("model.head.weight"), model.head.weight.detach())
    assert "model.body.0.weight" in keys
    assert "model.norm.num_batches_tracked" in keys
    assert "optimizer.state.0.momentum_buffer" in keys
    assert meta["format"] == "pt"
    assert STRUCTURE_KEY in meta
    flat = safetensors.torch.load_file(str(p))
    assert set(flat) == keys
    for k, v in model.state_dict().items():
        assert torch.equal(flat[f"model.{k}"], v), k
    for i, s in opt.state_dict()["state"].items():
        assert torch.equal(flat[f"optimizer.state.{i}.momentum_buffer"], s["momentum_buffer"])
    # and ours reads the package's view of it the same way
    with ts.safe_open(str(p), framework="pt") as f:
        assert set(f.keys()) == keys


# ---- exact structure ----


def _everything():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    return OrderedDict(
        [
            ("z_first", 1),
            ("a_second", {"y": 2, "b": 3, "x": [4, 5]}),
            (10, "int key"),
            (2, "smaller int key after a bigger one"),
            ("-1", "a str that looks like an int"),
            (-1, "a negative int key"),
            ("plain", [None, True, False, 0, 1, -1, 2**63, -(2**63) - 1, 2**100, -(2**100),
                       0.0, -0.0, 1.0, 1.5, 1e-310, 1.7976931348623157e308,
                       float("inf"), float("-inf"), float("nan")]),
            ("bool_vs_int", [True, 1, 1.0, False, 0, 0.0]),
            ("strings", ["", "héllo wörld ✓ 漢字 🎉", "quote \" back\\slash \n\t\x00 nul",
                         "{\"t\": \"w\"}", "nan", "inf", "1", "true", "null"]),
            ("empty", [{}, [], (), OrderedDict(), ""]),
            ("tuples", (1, (2, (3, ())), [4, (5,)], {"k": (6, 7)})),
            ("od_in_list", [OrderedDict([("q", 1), ("p", 2)]), {"q": 1, "p": 2}]),
            ("tensors", {"t": t, "in_list": [t + 1, (t + 2, "mixed")], "scalar": torch.tensor(3.5),
                         "empty": torch.zeros(0, 4), "i64": torch.tensor([2**62, -(2**62)]),
                         "bool": torch.tensor([True, False])}),
            ("unicode_kéy ✓", {"ключ": torch.ones(2), "a key with spaces": 1, "dots.in.key": 2}),
            (0, {1: {2: {3: torch.full((2,), 7.0)}}}),
            ("none", None),
        ]
    )


@pytest.mark.parametrize("via", ["path", "bytesio"])
def test_exact_structure(tmp_path, via):
    obj = _everything()
    loaded = _roundtrip(obj, via, tmp_path)
    _assert_exact(loaded, obj)
    # spot checks of what _assert_exact covers, stated plainly
    assert type(loaded) is OrderedDict
    assert list(loaded)[:6] == ["z_first", "a_second", 10, 2, "-1", -1]
    assert math.copysign(1.0, loaded["plain"][11]) == -1.0
    assert loaded["plain"][8] == 2**100 and type(loaded["plain"][8]) is int
    assert [type(v) for v in loaded["bool_vs_int"]] == [bool, int, float, bool, int, float]
    assert type(loaded["tuples"][1][1]) is tuple and type(loaded["tuples"][2]) is list
    assert type(loaded["od_in_list"][0]) is OrderedDict and type(loaded["od_in_list"][1]) is dict


@pytest.mark.parametrize(
    "obj",
    [
        {"a": 1},
        {},
        [],
        (),
        {"od": OrderedDict(), "od2": OrderedDict([("b", torch.ones(1)), ("a", 1)])},
        [torch.ones(2), torch.zeros(3)],
        (torch.ones(2), 5),
        {"only": {"plain": [1, "two", None]}},
        {1: torch.ones(1), 2: torch.zeros(1)},
        {"x": torch.ones(1), "y": None},
        5,
        "just a string",
        None,
        float("nan"),
    ],
    ids=lambda o: type(o).__name__ + str(len(o) if hasattr(o, "__len__") else ""),
)
def test_small_structures(obj, tmp_path):
    _assert_exact(_roundtrip(obj, "path", tmp_path), obj)
    _assert_exact(_roundtrip(obj, "bytesio"), obj)


def test_bare_tensor_roundtrips_as_a_tensor(tmp_path):
    t = torch.arange(5.0)
    loaded = _roundtrip(t, "path", tmp_path)
    assert type(loaded) is torch.Tensor, type(loaded)
    assert torch.equal(loaded, t)


def test_bare_parameter_roundtrips(tmp_path):
    p = nn.Parameter(torch.arange(5.0))
    loaded = _roundtrip(p, "path", tmp_path)
    assert type(loaded) is nn.Parameter and loaded.requires_grad
    assert torch.equal(loaded.detach(), p.detach())


def test_deep_nesting_150_levels(tmp_path):
    obj = torch.ones(2)
    for i in range(150):
        obj = {"k": obj} if i % 3 == 0 else ([obj, i] if i % 3 == 1 else (obj,))
    loaded = _roundtrip(obj, "path", tmp_path)
    _assert_exact(loaded, obj)


def _nest(levels, leaf):
    obj = leaf
    for _ in range(levels):
        obj = {"k": obj}
    return obj


def test_nesting_at_the_limit_is_accepted():
    obj = _nest(200, torch.ones(1))
    _assert_exact(_roundtrip(obj, "bytesio"), obj)
    obj = _nest(200, 1)
    _assert_exact(_roundtrip(obj, "bytesio"), obj)


@pytest.mark.parametrize("levels", [201, 250, 5000])
@pytest.mark.parametrize("container", ["dict", "list"])
def test_too_deep_refused_before_writing(tmp_path, levels, container):
    obj = torch.ones(1)
    for _ in range(levels):
        obj = {"k": obj} if container == "dict" else [obj]
    p = tmp_path / "deep.safetensors"
    with pytest.raises(ValueError, match="deeper than"):
        torch.save(obj, p, format="safetensors")
    assert os.listdir(tmp_path) == []
    buf = io.BytesIO()
    with pytest.raises(ValueError):
        torch.save(obj, buf, format="safetensors")
    assert buf.getvalue() == b""


def test_wide_nesting_10000_keys(tmp_path):
    obj = {}
    for i in range(10_000):
        key = f"k{(i * 7919) % 10_000}"  # not sorted
        obj[key] = torch.full((2,), float(i)) if i % 2 else i
    obj = {"wide": obj, "list": list(range(10_000)), "int_keys": {i: str(i) for i in range(10_000, 0, -1)}}
    loaded = _roundtrip(obj, "path", tmp_path)
    _assert_exact(loaded, obj)


# ---- flat dicts need no structure ----


def _flat():
    return {
        "z.weight": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),
        "a.bias": torch.arange(3, dtype=torch.int64),
        "m": torch.ones(2, dtype=torch.bfloat16),
        "empty": torch.zeros(0),
        "noncontig": torch.arange(12.0).reshape(3, 4).t(),
    }


def test_flat_dict_bytes_identical_to_safetensors_package(tmp_path):
    sd = _flat()
    ours = _file_bytes(sd)
    ref = safetensors.torch.save({k: v.contiguous() for k, v in sd.items()}, metadata={"format": "pt"})
    assert ours == ref
    assert STRUCTURE_KEY not in _header(ours)["__metadata__"]
    p = tmp_path / "flat.safetensors"
    torch.save(sd, p, format="safetensors")
    assert p.read_bytes() == ref
    torch.save(OrderedDict(sd), p, format="safetensors")
    assert p.read_bytes() == ref
    loaded = torch.load(p)
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k


def test_flat_state_dict_of_a_model_needs_no_structure():
    model = Net()
    data = _file_bytes(model.state_dict())
    assert _header(data)["__metadata__"] == {"format": "pt"}
    assert data == safetensors.torch.save(dict(model.state_dict()), metadata={"format": "pt"})


def test_structure_written_only_when_needed():
    t = torch.ones(2)
    assert STRUCTURE_KEY not in _header(_file_bytes({"a": t}))["__metadata__"]
    for obj in ({"a": {"b": t}}, {"a": t, "n": 1}, [t], {1: t}, {"a": nn.Parameter(t.clone())},
                {"a": t.clone().requires_grad_()}, {"a": t, "b": t}):
        meta = _header(_file_bytes(obj))["__metadata__"]
        assert STRUCTURE_KEY in meta, obj
        json.loads(meta[STRUCTURE_KEY])


# ---- ties and views ----


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.embed(idx))))


@pytest.mark.parametrize("nested", [False, True])
def test_tied_weights_stored_once_and_restored_shared(tmp_path, nested):
    torch.manual_seed(0)
    model = TiedLM()
    sd = model.state_dict()
    assert sd["embed.weight"].data_ptr() == sd["head.weight"].data_ptr()
    obj = {"model": sd, "step": 1} if nested else sd
    p = tmp_path / "tied.safetensors"
    torch.save(obj, p, format="safetensors")
    prefix = "model." if nested else ""
    with safetensors.safe_open(str(p), framework="pt") as f:
        keys = sorted(f.keys())
    assert keys == sorted(prefix + k for k in ("embed.weight", "mid.weight", "mid.bias"))
    loaded = torch.load(p)
    lsd = loaded["model"] if nested else loaded
    assert list(lsd) == list(sd)
    assert lsd["embed.weight"].untyped_storage().data_ptr() == lsd["head.weight"].untyped_storage().data_ptr()
    assert torch.equal(lsd["head.weight"], sd["head.weight"])
    fresh = TiedLM()
    fresh.load_state_dict(lsd)  # strict: both names present
    assert fresh.head.weight is fresh.embed.weight
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(fresh(idx), model(idx))


def test_same_parameter_object_comes_back_as_one_object(tmp_path):
    p = nn.Parameter(torch.randn(3))
    q = nn.Parameter(torch.randn(2), requires_grad=False)
    obj = {"a": p, "b": p, "list": [p, q, q], "tuple": (q,)}
    loaded = _roundtrip(obj, "path", tmp_path)
    assert type(loaded["a"]) is nn.Parameter
    assert loaded["a"] is loaded["b"] is loaded["list"][0]
    assert loaded["list"][1] is loaded["list"][2] is loaded["tuple"][0]
    assert loaded["a"].requires_grad and not loaded["list"][1].requires_grad
    assert torch.equal(loaded["a"].detach(), p.detach())


def test_same_plain_tensor_object_twice():
    t = torch.arange(4.0)
    data = _file_bytes({"a": t, "b": t})
    assert list(k for k in _header(data) if k != "__metadata__") == ["a"]
    loaded = torch.load(io.BytesIO(data))
    assert loaded["a"] is loaded["b"]
    assert torch.equal(loaded["a"], t)


def test_views_are_stored_as_values_and_not_shared(tmp_path):
    base = torch.arange(24, dtype=torch.float32)
    views = {
        "base": base,
        "slice": base[2:8],
        "offset_slice": base[5:],
        "strided": base[::3],
        "transposed": base.view(4, 6).t(),
        "overlap1": base[0:10],
        "overlap2": base[5:15],
        "reshaped": base.view(2, 12),
        "as_int": base.view(torch.int32),
        "column": base.view(4, 6)[:, 1],
    }
    p = tmp_path / "views.safetensors"
    torch.save(views, p, format="safetensors")
    with safetensors.safe_open(str(p), framework="pt") as f:
        assert sorted(f.keys()) == sorted(views)
        for k, v in views.items():
            assert torch.equal(f.get_tensor(k), v), k
    loaded = torch.load(p)
    for k, v in views.items():
        assert loaded[k].shape == v.shape and torch.equal(loaded[k], v), k
    ptrs = [loaded[k].untyped_storage().data_ptr() for k in views]
    assert len(set(ptrs)) == len(ptrs), "views came back sharing storage"
    loaded["base"][0] = 100.0
    assert loaded["slice"][0] == 2.0 and loaded["overlap1"][0] == 0.0


NONCONTIGUOUS_WITH_OFFSET = {
    "every_other_from_1": lambda b: b[1::2],
    "column": lambda b: b.view(4, 6)[:, 1],
    "block_transposed": lambda b: b.view(4, 6)[1:, 2:].t(),
    "rows_then_cols": lambda b: b.view(4, 6)[1:, :3],
    "strided_rows": lambda b: b.view(4, 6)[1:, ::2],
    "expanded": lambda b: b[3:4].expand(5),
}


@pytest.mark.parametrize("name", sorted(NONCONTIGUOUS_WITH_OFFSET))
def test_noncontiguous_views_with_storage_offset_saved_by_value(tmp_path, name):
    base = torch.arange(24, dtype=torch.float32)
    view = NONCONTIGUOUS_WITH_OFFSET[name](base)
    assert not view.is_contiguous() and view.storage_offset() > 0
    want = view.contiguous()
    for obj in ({"v": view}, {"n": {"v": view}, "epoch": 1}):
        data = _file_bytes(obj)
        got = safetensors.torch.load(data)
        assert torch.equal(got["v" if "v" in obj else "n.v"], want), got
        loaded = torch.load(io.BytesIO(data))
        assert torch.equal(loaded["v"] if "v" in obj else loaded["n"]["v"], want)


def test_same_view_of_one_storage_is_a_tie():
    base = torch.arange(10.0)
    a = base[2:6]
    b = base[2:6]  # another object, the same view
    t = base.view(2, 5).t()
    obj = {"a": a, "b": b, "t1": t, "t2": base.view(2, 5).t()}
    data = _file_bytes(obj)
    assert sorted(k for k in _header(data) if k != "__metadata__") == ["a", "t1"]
    loaded = torch.load(io.BytesIO(data))
    assert loaded["a"] is not loaded["b"]
    assert loaded["a"].untyped_storage().data_ptr() == loaded["b"].untyped_storage().data_ptr()
    assert loaded["t1"].untyped_storage().data_ptr() == loaded["t2"].untyped_storage().data_ptr()
    assert torch.equal(loaded["t2"], obj["t2"]) and torch.equal(loaded["b"], b)
    loaded["a"][0] = -1.0
    assert loaded["b"][0] == -1.0


def test_tie_across_nested_paths_in_a_checkpoint():
    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "ema": model.state_dict(), "optimizer": opt.state_dict()}
    data = _file_bytes(ckpt)
    names = [k for k in _header(data) if k != "__metadata__"]
    assert len(names) == 3 + len(opt.state_dict()["state"])  # one copy of the model's memory
    loaded = torch.load(io.BytesIO(data))
    _assert_exact(loaded, ckpt)
    fresh = TiedLM()
    fresh.load_state_dict(loaded["ema"])
    assert torch.equal(fresh.embed.weight, model.embed.weight)


# ---- Parameters and requires_grad ----


@pytest.mark.parametrize("via", ["path", "bytesio"])
def test_parameters_and_requires_grad(tmp_path, via):
    x = torch.ones(3, requires_grad=True)
    obj = {
        "p": nn.Parameter(torch.randn(2, 2)),
        "frozen": nn.Parameter(torch.randn(2), requires_grad=False),
        "leaf": torch.randn(4).requires_grad_(),
        "nonleaf": x * 2,
        "plain": torch.randn(3),
        "int_param": nn.Parameter(torch.arange(3), requires_grad=False),
    }
    loaded = _roundtrip(obj, via, tmp_path)
    assert type(loaded["p"]) is nn.Parameter and loaded["p"].requires_grad
    assert type(loaded["frozen"]) is nn.Parameter and not loaded["frozen"].requires_grad
    assert type(loaded["int_param"]) is nn.Parameter and not loaded["int_param"].requires_grad
    assert type(loaded["leaf"]) is torch.Tensor and loaded["leaf"].requires_grad and loaded["leaf"].is_leaf
    assert type(loaded["nonleaf"]) is torch.Tensor and loaded["nonleaf"].requires_grad
    assert loaded["nonleaf"].is_leaf  # it comes back as a leaf: no graph is stored
    assert type(loaded["plain"]) is torch.Tensor and not loaded["plain"].requires_grad
    for k, v in obj.items():
        assert torch.equal(loaded[k].detach(), v.detach()), k
    # loaded Parameters are usable: gradients flow
    (loaded["p"].sum() + loaded["leaf"].sum()).backward()
    assert torch.equal(loaded["p"].grad, torch.ones(2, 2))


def test_parameters_with_meta_map_location(tmp_path):
    obj = {"p": nn.Parameter(torch.randn(2, 2)), "n": 1}
    p = tmp_path / "m.safetensors"
    torch.save(obj, p, format="safetensors")
    loaded = torch.load(p, map_location="meta")
    assert type(loaded["p"]) is nn.Parameter and loaded["p"].device.type == "meta"
    assert loaded["n"] == 1


# ---- refusal ----


class Thing:
    pass


class MyTensor(torch.Tensor):
    pass


Point = collections.namedtuple("Point", "x y")


def _quantized():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)


def _nested_tensor():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])


def _generator():
    yield 1


def _local_class_instance():
    class Local:
        pass

    return Local


REFUSALS = {
    # what stays refused (issue 14, "Limits that stay"):
    # name: (factory, type name in the message, extra fragment or None)
    "lambda": (lambda: (lambda x: x), "function", "no importable name"),
    "local_class": (_local_class_instance, "class", "no importable name"),
    "module": (lambda: os, "module", "its name as a str"),
    "open_file": (lambda: open(os.devnull, "rb"), "BufferedReader", "open file"),
    "lock": (lambda: __import__("threading").Lock(), "lock", "lock"),
    "generator": (_generator, "generator", "generator"),
    "numpy_object_array": (lambda: np.array([None, 1], dtype=object), "numpy.ndarray", "object"),
    "numpy_str_array": (lambda: np.array(["a"]), "numpy.ndarray", "string"),
    "numpy_datetime_array": (lambda: np.array(["2020-01-01"], dtype="datetime64[D]"), "numpy.ndarray", "datetime"),
    "numpy_structured_array": (lambda: np.zeros(2, dtype=[("a", "i4")]), "numpy.ndarray", "structured"),
    "numpy_longdouble": (lambda: np.zeros(2, dtype=np.longdouble), "numpy.ndarray", None),
    "storage": (lambda: torch.ones(2).untyped_storage(), "UntypedStorage", "tensor"),
    "mkldnn": (lambda: torch.ones(2).to_mkldnn(), "mkldnn", ".to_dense()"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refused_with_full_path_and_nothing_written(tmp_path, name):
    factory, type_name, fragment = REFUSALS[name]
    value = factory()
    obj = {
        "model": {"w": torch.ones(2)},
        "optimizer": {"state": {0: {"m": torch.zeros(2)}}, "param_groups": [{"lr": 0.1, "foo": value}]},
    }
    p = tmp_path / "ckpt.safetensors"
    with pytest.raises(TypeError) as info:
        torch.save(obj, p, format="safetensors")
    msg = str(info.value)
    assert msg.startswith("optimizer.param_groups[0].foo:"), msg
    assert type_name in msg, msg
    if fragment is not None:
        assert fragment in msg, msg
    assert os.listdir(tmp_path) == []
    buf = io.BytesIO()
    with pytest.raises(TypeError):
        torch.save(obj, buf, format="safetensors")
    assert buf.getvalue() == b""


def test_refusal_path_through_int_keys_and_lists(tmp_path):
    obj = {"optimizer": {"state": {3: {"buf": [torch.ones(1), (1, {"deep": {1: lambda: 0}})]}}}}
    with pytest.raises(TypeError) as info:
        torch.save(obj, tmp_path / "x.pt", format="safetensors")
    assert str(info.value).startswith("optimizer.state[3].buf[1][1].deep[1]: function"), str(info.value)
    assert os.listdir(tmp_path) == []


def test_refusal_at_the_top_level(tmp_path):
    with pytest.raises(TypeError) as info:
        torch.save(_generator(), tmp_path / "x.pt", format="safetensors")
    assert "generator" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_refusal_keeps_existing_file(tmp_path):
    p = tmp_path / "ckpt.safetensors"
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 1}, p, format="safetensors")
    before = p.read_bytes()
    with pytest.raises(TypeError):
        torch.save({"model": {"w": torch.zeros(3)}, "epoch": _generator()}, p, format="safetensors")
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


@pytest.mark.parametrize(
    "make",
    [
        lambda t, u: {"a.b": t, "a": {"b": u}},
        lambda t, u: {"a": {"b": t}, "a.b": u},
        lambda t, u: {"0": t, 0: u},
        lambda t, u: {"a": [t], "a.0": u},
        lambda t, u: {"x": {"y.z": t, "y": {"z": u}}},
        lambda t, u: {"a.": t, "a": {"": u}},
    ],
    ids=["dotted_then_nested", "nested_then_dotted", "int_vs_str", "list_vs_dotted", "deeper", "empty_key"],
)
def test_colliding_paths_refused(tmp_path, make):
    obj = make(torch.ones(2), torch.zeros(2))
    p = tmp_path / "c.safetensors"
    with pytest.raises(ValueError) as info:
        torch.save(obj, p, format="safetensors")
    assert "collide" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_keys_with_dots_that_do_not_collide_roundtrip(tmp_path):
    obj = {"a.b": torch.ones(2), "a": {"c": torch.zeros(2)}, "": {"x": torch.full((1,), 3.0)}}
    _assert_exact(_roundtrip(obj, "path", tmp_path), obj)


# ---- hostile structure metadata ----


def _crafted(text, tensors=None):
    tensors = {"w": torch.arange(3.0)} if tensors is None else tensors
    return safetensors.torch.save(tensors, metadata={"format": "pt", STRUCTURE_KEY: text})


def _load_crafted(tmp_path, text, **kw):
    data = _crafted(text)
    p = tmp_path / "crafted.safetensors"
    p.write_bytes(data)
    results = []
    for load in (lambda: torch.load(p, **kw), lambda: torch.load(io.BytesIO(data), **kw)):
        results.append(load())
    return results


def _doc(root, version=1):
    return json.dumps({"version": version, "root": root})


HOSTILE = {
    "not_json": "not json",
    "truncated_json": '{"version": 1, "root": {"d": [',
    "empty": "",
    "nan_constant": '{"version": 1, "root": NaN}',
    "infinity_constant": '{"version": 1, "root": [Infinity]}',
    "deep_arrays": "[" * 100_000 + "]" * 100_000,
    "deep_objects": '{"a":' * 100_000 + "1" + "}" * 100_000,
    "deep_nodes": '{"version":1,"root":' + '{"l":[' * 100_000 + "]}" * 100_000 + "}",
    "deep_nodes_250": '{"version":1,"root":' + '{"l":[' * 250 + "]}" * 250 + "}",
    "deep_dicts_250": '{"version":1,"root":' + '{"d":[["k",' * 250 + "1" + "]]}" * 250 + "}",
    "class_tag": _doc({"__class__": "os.system"}),
    "class_tag_list": _doc({"__class__": ["os.system", "touch x"]}),
    "reduce_tag": _doc({"d": [["a", {"__reduce__": ["posix.system", ["touch x"]]}]]}),
    "unknown_tag": _doc({"set": [1, 2]}),
    "bytes_tag": _doc({"b": ["AAAA"]}),
    "missing_tensor": _doc({"t": "missing"}),
    "missing_nested_tensor": _doc({"d": [["w", {"t": "w"}], ["v", {"t": "nope"}]]}),
    "tensor_name_not_str": _doc({"t": 5}),
    "tensor_name_list": _doc({"t": ["w"]}),
    "bare_array": _doc([1, 2]),
    "empty_node": _doc({}),
    "two_tags": _doc({"l": [], "tu": []}),
    "extra_field": _doc({"l": [], "x": 1}),
    "body_not_list": _doc({"tu": {"a": 1}}),
    "dict_item_not_pair": _doc({"d": [["a"]]}),
    "dict_item_triple": _doc({"d": [["a", 1, 2]]}),
    "dict_key_bool": _doc({"d": [[True, 1]]}),
    "dict_key_float": _doc({"d": [[1.5, 1]]}),
    "dict_key_null": _doc({"d": [[None, 1]]}),
    "dict_key_list": _doc({"od": [[["a"], 1]]}),
    "unknown_float": _doc({"f": "1e400"}),
    "float_body_number": _doc({"f": 1}),
    "version_3": _doc({"t": "w"}, version=3),
    "version_0": _doc({"t": "w"}, version=0),
    "version_str": _doc({"t": "w"}, version="1"),
    "version_null": _doc({"t": "w"}, version=None),
    "version_list": _doc({"t": "w"}, version=[1]),
    "version_true": _doc({"t": "w"}, version=True),
    "version_float": _doc({"t": "w"}, version=1.0),
    "no_version": json.dumps({"root": {"t": "w"}}),
    "no_root": json.dumps({"version": 1}),
    "doc_is_list": json.dumps([1, {"t": "w"}]),
    "doc_is_string": json.dumps("hello"),
    "doc_is_null": "null",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_structure_refused(tmp_path, name):
    text = HOSTILE[name]
    data = _crafted(text)
    p = tmp_path / "crafted.safetensors"
    p.write_bytes(data)
    for load in (lambda: torch.load(p), lambda: torch.load(io.BytesIO(data)),
                 lambda: torch.load(p, map_location="meta"), lambda: torch.load(p, mmap=False)):
        with pytest.raises(SafetensorError) as info:
            load()
        assert STRUCTURE_KEY in str(info.value)
    # the file is still a valid safetensors file for the package: only our structure is bad
    assert torch.equal(safetensors.torch.load_file(str(p))["w"], torch.arange(3.0))
    assert not (tmp_path / "x").exists() and not os.path.exists("x")


def test_hostile_structure_leaves_no_mapping(tmp_path):
    import gc

    from conftest import mapped_paths

    p = tmp_path / "crafted.safetensors"
    p.write_bytes(_crafted(HOSTILE["missing_tensor"]))
    with pytest.raises(SafetensorError):
        torch.load(p)
    gc.collect()
    assert os.path.realpath(p) not in mapped_paths()


@pytest.mark.parametrize(
    "root",
    [
        {"t": "i", "g": 1},
        {"t": "i", "p": 1, "g": 1},
        {"d": [["a", {"t": "w"}], ["b", {"t": "i", "g": 1}]]},
        {"t": "b", "p": 1, "g": 1},
    ],
    ids=["grad_on_int", "grad_param_on_int", "nested_grad_on_int", "grad_param_on_bool"],
)
def test_hostile_requires_grad_on_integer_tensor(root):
    # a crafted file may ask for gradients on a dtype that cannot have them: that is a
    # malformed file (SafetensorError), not a crash deep inside torch
    tensors = {"w": torch.ones(2), "i": torch.arange(3), "b": torch.tensor([True])}
    data = _crafted(_doc(root), tensors)
    with pytest.raises(SafetensorError):
        torch.load(io.BytesIO(data))


def test_valid_crafted_structure_builds_only_allowed_things(tmp_path):
    root = {
        "od": [
            ["p", {"t": "w", "p": 1, "g": 1}],
            ["again", {"t": "w"}],
            [7, {"tu": [None, True, 1, 1.5, "s", {"f": "-inf"}, {"l": []}]}],
        ]
    }
    for loaded in _load_crafted(tmp_path, _doc(root)):
        assert type(loaded) is OrderedDict
        assert type(loaded["p"]) is nn.Parameter and loaded["p"].requires_grad
        assert type(loaded["again"]) is torch.Tensor
        assert loaded["again"].untyped_storage().data_ptr() == loaded["p"].untyped_storage().data_ptr()
        assert loaded[7] == (None, True, 1, 1.5, "s", float("-inf"), [])


_ALLOWED_LEAVES = (type(None), bool, int, float, str, torch.Tensor, nn.Parameter)


def _only_allowed(obj, depth=0):
    assert depth < 300
    kind = type(obj)
    if kind in (dict, OrderedDict):
        for k, v in obj.items():
            assert type(k) in (str, int), type(k)
            _only_allowed(v, depth + 1)
    elif kind in (list, tuple):
        for v in obj:
            _only_allowed(v, depth + 1)
    else:
        assert kind in _ALLOWED_LEAVES, kind


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5),
    st.sampled_from(["w", "v", "t", "p", "g", "d", "od", "l", "tu", "f", "nan", "inf", "same", "__class__"]),
)
_tags = st.sampled_from(["t", "p", "g", "same", "d", "od", "l", "tu", "f", "__class__", "x"])


def _json_nodes(children):
    return st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(_tags, children, max_size=3),
        st.builds(lambda k, v: {k: v}, _tags, st.lists(st.lists(children, min_size=2, max_size=2), max_size=3)),
        st.builds(lambda name, p, g: {"t": name, "p": p, "g": g}, st.sampled_from(["w", "v", "x"]),
                  st.sampled_from([0, 1, True]), st.sampled_from([0, 1, "1"])),
    )


_json_docs = st.recursive(_json_leaf, _json_nodes, max_leaves=25)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(root=_json_docs)
def test_fuzzed_structure_never_builds_anything_else(root):
    data = _crafted(_doc(root), {"w": torch.arange(3.0), "v": torch.ones(2, dtype=torch.int64)})
    try:
        loaded = torch.load(io.BytesIO(data))
    except SafetensorError:
        return
    _only_allowed(loaded)


def test_structure_parser_is_not_pickle_or_eval(tmp_path, monkeypatch):
    # nothing in the structure reader may import or call by name
    import builtins

    calls = []
    real_import = builtins.__import__

    def spy_import(name, *args, **kwargs):
        calls.append(name)
        return real_import(name, *args, **kwargs)

    data = _crafted(_doc({"d": [["a", {"t": "w"}], ["b", {"tu": [1, "os.system"]}]]}))
    monkeypatch.setattr(builtins, "__import__", spy_import)
    loaded = torch.load(io.BytesIO(data))
    monkeypatch.undo()
    assert loaded["b"] == (1, "os.system")
    assert "os" not in calls and "posix" not in calls and "subprocess" not in calls


def test_max_depth_constant_is_what_the_tests_assume():
    assert _checkpoint.MAX_DEPTH == 200
