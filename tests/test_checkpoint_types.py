"""The type table of whole checkpoints (issue 14 points 1, 2, 5; issue 11 point 3).

Data types round trip with no allowlist, nested in each other, with type and value
equality; RNG states restore the same next numbers; classes are rebuilt only when the
loading process allows them (a marker file proves nothing ran, a subprocess proves the
module was not even imported); hostile structures give SafetensorError in bounded time
and memory; the decoder's memory stays within its budget; other readers see plain tensors.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import io
import json
import math
import os
import pathlib
import random
import subprocess
import sys
import textwrap
import time
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torch_safetensors as ts
from torch_safetensors import _checkpoint

SafetensorError = ts.SafetensorError
STRUCTURE_KEY = _checkpoint.STRUCTURE_KEY
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- helpers ----


def _save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, format="safetensors")
    return buf.getvalue()


def _roundtrip(obj, tmp_path=None, **kw):
    if tmp_path is not None:
        p = tmp_path / "ckpt.safetensors"
        torch.save(obj, p, format="safetensors")
        return torch.load(p, **kw)
    return torch.load(io.BytesIO(_save_bytes(obj)), **kw)


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])


def _tensor_equal(a: torch.Tensor, b: torch.Tensor, path: str) -> None:
    assert a.is_quantized == b.is_quantized and a.is_nested == b.is_nested, path
    assert a.dtype == b.dtype and a.layout == b.layout, path
    assert a.device == b.device and a.requires_grad == b.requires_grad, path
    if not a.is_nested:
        assert a.shape == b.shape, path
    if a.device.type == "meta":
        assert a.stride() == b.stride(), path
        return
    if a.is_nested:
        for x, y in zip(a.unbind(), b.unbind()):
            _tensor_equal(x, y, path)
        return
    if a.is_quantized:
        assert a.qscheme() == b.qscheme(), path
        assert torch.equal(a.int_repr(), b.int_repr()), path
        if a.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            assert a.q_scale() == b.q_scale() and a.q_zero_point() == b.q_zero_point(), path
        else:
            assert torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales()), path
            assert a.q_per_channel_axis() == b.q_per_channel_axis(), path
        return
    if a.layout is not torch.strided:
        a, b = a.to_dense(), b.to_dense()
    assert torch.equal(a.detach(), b.detach()) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())), path


def _same(a, b, path="root"):
    """Same types all the way down, equal values (nan == nan, -0.0 kept, dtypes of numpy)."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        _tensor_equal(a, b, path)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), path
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype, path
        assert a == b or (a != a and b != b), path
    elif isinstance(a, argparse.Namespace):
        _same(vars(a), vars(b), path)
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()) or type(a) is collections.Counter, path
        for ka, kb in zip(a, b):
            assert type(ka) is type(kb), (path, ka)
        if isinstance(a, collections.defaultdict):
            assert a.default_factory is b.default_factory, path
        for k in a:
            _same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), path
    elif isinstance(a, complex):
        _same(a.real, b.real, path)
        _same(a.imag, b.imag, path)
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        _same(vars(a), vars(b), path)
    else:
        assert a == b, (path, a, b)


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


# ---- the corpus: every data type, nested in each other ----


def _tensor_kinds():
    q = torch.quantize_per_tensor(torch.tensor([-1.0, 0.0, 2.5]), 0.1, 3, torch.qint8)
    qc = torch.quantize_per_channel(torch.randn(3, 2), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
                                    torch.tensor([0, 1, 2]), 0, torch.quint8)
    return {
        "complex128": torch.randn(3, dtype=torch.complex128),
        "complex64": torch.randn(2, dtype=torch.complex64),
        "complex_param": nn.Parameter(torch.randn(2, dtype=torch.complex128)),
        "sparse_coo": torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse(),
        "sparse_uncoalesced": torch.sparse_coo_tensor([[0, 0], [1, 1]], [1.0, 2.0], (2, 2)),
        "sparse_csr": torch.eye(3).to_sparse_csr(),
        "sparse_csc": torch.eye(3).to_sparse_csc(),
        "sparse_bsr": torch.eye(4).to_sparse_bsr((2, 2)),
        "quant_per_tensor": q,
        "quant_per_channel": qc,
        "nested": _quiet(lambda: torch.nested.nested_tensor([torch.ones(2), torch.arange(3.0)])),
        "meta": torch.empty(2, 3, device="meta"),
        "meta_strided": torch.empty_strided((2, 3), (1, 2), device="meta", dtype=torch.float16),
        "param": nn.Parameter(torch.randn(2)),
        "grad": torch.randn(2).requires_grad_(),
    }


def _corpus():
    leaves = {
        "none": None, "bool": True, "int": -7, "bigint": 2**200, "float": 1.5, "neg_zero": -0.0,
        "nan": float("nan"), "inf": float("inf"), "ninf": float("-inf"), "str": "é\x00\n",
        "bytes": b"\x00\xffraw", "long_bytes": bytes(range(256)) * 20, "bytearray": bytearray(b"ba"),
        "complex": complex(1.5, float("nan")), "range": range(3, -10, -2), "slice": slice(1, None, -1),
        "set": {1, "a", (2, 3)}, "frozenset": frozenset({b"x", 1.5}),
        "dtype": torch.bfloat16, "dtypes": [torch.float8_e4m3fn, torch.bool, torch.complex128],
        "device": torch.device("cuda", 1), "device_cpu": torch.device("cpu"),
        "size": torch.Size([2, 0, 5]), "layout": torch.sparse_csr, "memory_format": torch.channels_last,
        "path": pathlib.Path("/tmp/x"), "pure_path": pathlib.PureWindowsPath("C:/a/b"),
        "namespace": argparse.Namespace(lr=0.1, dims=[1, 2], dtype=torch.float16, out=pathlib.Path("o")),
        "counter": collections.Counter({"a": 2, (1,): 3}),
        "defaultdict": collections.defaultdict(list, {"k": [1]}),
        "defaultdict_none": collections.defaultdict(None, {1: 2}),
        "defaultdict_od": collections.defaultdict(OrderedDict),
        "np_f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "np_bool": np.array([True, False]),
        "np_u64": np.array([2**64 - 1], dtype=np.uint64),
        "np_c128": np.array([1 + 2j, np.nan], dtype=np.complex128),
        "np_big_endian": np.arange(4, dtype=">i4"),
        "np_fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "np_0d": np.array(3.5),
        "np_empty": np.zeros((0, 4), dtype=np.int16),
        "np_f16_scalar": np.float16(1.5), "np_i8_scalar": np.int8(-3), "np_u64_scalar": np.uint64(2**64 - 1),
        "np_bool_scalar": np.bool_(True), "np_c64_scalar": np.complex64(1 - 1j), "np_nan": np.float64("nan"),
        "np_dtype": np.dtype("<f8"),
        "keys": {(1, 2): "tuple", 1.5: "float", None: "none", True: "bool", b"k": "bytes",
                 torch.float32: "dtype", float("-inf"): "inf", 3: "int", "s": "str", frozenset({1}): "fs"},
    }
    tensors = _tensor_kinds()
    nested = {
        "list_of_sets": [{1, 2}, frozenset()],
        "tuple_with_tensors": (torch.ones(2), {"inner": [np.ones(2), torch.float64]}),
        "od": OrderedDict([("z", {b"b": [1 + 1j]}), ("a", argparse.Namespace(t=torch.zeros(1)))]),
        "ns_in_dd": collections.defaultdict(dict, {"x": {"ns": argparse.Namespace(s={1})}}),
        "deep": [[[[{"x": (pathlib.PurePosixPath("a"),)}]]]],
    }
    return {"leaves": leaves, "tensors": tensors, "nested": nested}


@pytest.mark.parametrize("via", ["path", "bytesio"])
def test_corpus_roundtrips_with_types_and_values(tmp_path, via):
    obj = _corpus()
    loaded = _roundtrip(obj, tmp_path if via == "path" else None)
    _same(obj, loaded)


def test_corpus_file_is_json_and_plain_tensors_for_other_readers(tmp_path):
    obj = _corpus()
    p = tmp_path / "c.safetensors"
    torch.save(obj, p, format="safetensors")
    data = p.read_bytes()
    header = _header(data)
    structure = json.loads(header["__metadata__"][STRUCTURE_KEY])
    assert structure["version"] == _checkpoint.STRUCTURE_VERSION
    # plain values stay readable JSON
    leaves = structure["root"]["d"]["leaves"]["d"]
    assert leaves["int"] == -7 and leaves["str"] == "é\x00\n" and leaves["bigint"] == 2**200
    assert leaves["dtype"] == {"dtype": "bfloat16"} and leaves["path"] == {"path": ["PosixPath", "/tmp/x"]}
    assert b"pickle" not in data and b"\x80\x02" not in data[: 8 + len(json.dumps(header))]
    # every tensor is a plain named tensor for the safetensors package
    ours = {k: v for k, v in header.items() if k != "__metadata__"}
    theirs = safetensors.torch.load_file(str(p))
    assert set(theirs) == set(ours)
    for name, t in theirs.items():
        assert t.layout is torch.strided
    assert theirs["tensors.complex128"].dtype is torch.float64 and theirs["tensors.complex128"].shape == (3, 2)
    assert torch.equal(torch.view_as_complex(theirs["tensors.complex128"]), obj["tensors"]["complex128"])
    assert torch.equal(theirs["tensors.sparse_coo.values"], obj["tensors"]["sparse_coo"]._values())
    assert torch.equal(theirs["leaves.np_f32"], torch.from_numpy(obj["leaves"]["np_f32"]))
    with safetensors.safe_open(str(p), framework="np") as f:
        assert np.array_equal(f.get_tensor("leaves.np_f32"), obj["leaves"]["np_f32"])


def test_transformers_reads_every_tensor(tmp_path):
    from transformers.modeling_utils import load_state_dict

    obj = _corpus()
    p = tmp_path / "model.safetensors"
    torch.save(obj, p, format="safetensors")
    sd = load_state_dict(str(p))
    header = _header(p.read_bytes())
    assert set(sd) == {k for k in header if k != "__metadata__"}


def test_numpy_values_load_back_as_numpy_with_dtype_and_shape():
    a = np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2]  # a non-contiguous view
    loaded = _roundtrip({"a": a, "s": np.float32(0.1)})
    assert type(loaded["a"]) is np.ndarray and loaded["a"].dtype == np.int16 and loaded["a"].shape == (3, 2)
    assert np.array_equal(loaded["a"], a)
    assert type(loaded["s"]) is np.float32 and loaded["s"] == np.float32(0.1)
    a[0, 0] = 99  # the saved array was copied, not aliased
    assert loaded["a"][0, 0] == 0


def test_numpy_not_imported_unless_the_checkpoint_holds_numpy(tmp_path):
    p = tmp_path / "plain.safetensors"
    q = tmp_path / "np.safetensors"
    torch.save({"a": {1, 2}, "t": torch.ones(2), "c": 1j}, p, format="safetensors")
    torch.save({"a": np.ones(2)}, q, format="safetensors")
    code = textwrap.dedent(f"""
        import sys, torch, torch_safetensors
        sys.modules.pop("numpy", None)
        blocked = type(sys)("numpy")
        def refuse(name):
            raise AssertionError("numpy used")
        blocked.__getattr__ = refuse
        sys.modules["numpy"] = blocked
        torch.load({str(p)!r})
        del sys.modules["numpy"]
        print(type(torch.load({str(q)!r})["a"]).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ndarray"


# ---- RNG states restore the same next numbers ----


def test_rng_states_restore_the_same_next_numbers(tmp_path):
    random.seed(1)
    np.random.seed(2)
    gen = np.random.default_rng(3)
    torch.manual_seed(4)
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "numpy_legacy_dict": np.random.get_state(legacy=False),
        "generator": gen.bit_generator.state,
        "cpu": torch.get_rng_state(),
    }
    expected = (random.random(), np.random.rand(3), gen.random(3), torch.rand(3))
    loaded = _roundtrip(state, tmp_path)
    _same(state, loaded)
    assert loaded["generator"]["state"]["state"] >= 2**64 or loaded["generator"]["state"]["inc"] >= 2**64
    random.setstate(loaded["python"])
    np.random.set_state(loaded["numpy"])
    gen2 = np.random.default_rng()
    gen2.bit_generator.state = loaded["generator"]
    torch.set_rng_state(loaded["cpu"])
    again = (random.random(), np.random.rand(3), gen2.random(3), torch.rand(3))
    assert again[0] == expected[0]
    assert np.array_equal(again[1], expected[1]) and np.array_equal(again[2], expected[2])
    assert torch.equal(again[3], expected[3])
    np.random.set_state(loaded["numpy_legacy_dict"])


# ---- classes: stored generically, rebuilt only when allowed ----


@dataclasses.dataclass
class Config:
    lr: float
    path: pathlib.Path
    dtype: torch.dtype = torch.float32
    tags: tuple = ()


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: int


class Mode(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


class ByName(enum.Enum):
    """An enum reduced as early Python 3.11 releases (3.11.0 to 3.11.4, Debian 12's 3.11.2)
    reduce every enum member: getattr(cls, name)."""
    ON = 1
    OFF = 2

    def __reduce_ex__(self, proto):
        return getattr, (self.__class__, self._name_)


class ByValue(enum.Enum):
    ON = 1
    OFF = 2


class Perm(enum.Flag):
    """A flag whose composite members reduce as early 3.11 releases reduce them."""
    R = 1
    W = 2
    X = 4

    def __reduce_ex__(self, proto):
        import operator

        members = [m for m in type(self) if m in self]
        if len(members) > 1:
            rest = type(self)(self._value_ & ~members[0]._value_)
            return operator.or_, (rest, members[0])
        return getattr, (self.__class__, self._name_)


class Slotted:
    __slots__ = ("x", "y")

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return type(other) is Slotted and (self.x, self.y) == (other.x, other.y)


class TaggedDict(dict):
    pass


class TaggedList(list):
    pass


class WithState:
    def __init__(self, w):
        self.w = w

    def __getstate__(self):
        return {"w2": self.w * 2}

    def __setstate__(self, state):
        self.w = state["w2"] // 2

    def __eq__(self, other):
        return type(other) is WithState and other.w == self.w


class Tagged(torch.Tensor):
    pass


CLASSES = [Config, Frozen, Mode, Slotted, TaggedDict, TaggedList, WithState, Tagged]


def _objects():
    td = TaggedDict(a=1)
    td.extra = "attr"
    return {
        "config": Config(0.1, pathlib.Path("/x"), torch.bfloat16, ("a",)),
        "frozen": Frozen(3),
        "mode": Mode.EVAL,
        "slotted": Slotted(1, [torch.ones(1)]),
        "tagged_dict": td,
        "tagged_list": TaggedList([1, 2]),
        "with_state": WithState(21),
        "class_value": Config,
        "function_value": len,
        "subclass": torch.arange(3.0).as_subclass(Tagged),
    }


def _check_objects(obj, loaded):
    assert loaded["config"] == obj["config"] and type(loaded["config"].path) is pathlib.PosixPath
    assert loaded["frozen"] == obj["frozen"]
    assert loaded["mode"] is Mode.EVAL
    assert loaded["slotted"].x == 1 and torch.equal(loaded["slotted"].y[0], torch.ones(1))
    assert type(loaded["tagged_dict"]) is TaggedDict and loaded["tagged_dict"] == {"a": 1}
    assert loaded["tagged_dict"].extra == "attr"
    assert type(loaded["tagged_list"]) is TaggedList and loaded["tagged_list"] == [1, 2]
    assert loaded["with_state"] == obj["with_state"]
    assert loaded["class_value"] is Config and loaded["function_value"] is len
    assert type(loaded["subclass"]) is Tagged and torch.equal(loaded["subclass"], torch.arange(3.0))


def test_objects_refused_without_permission_then_rebuilt_with_it(tmp_path):
    obj = _objects()
    data = _save_bytes(obj)
    with pytest.raises(SafetensorError) as info:
        torch.load(io.BytesIO(data))
    msg = str(info.value)
    assert "add_safe_globals" in msg and "safe_globals" in msg and "test_checkpoint_types." in msg
    assert info.value.code == "not_allowed"
    with torch.serialization.safe_globals(CLASSES + [len]):
        loaded = torch.load(io.BytesIO(data))
    _check_objects(obj, loaded)
    # once the context is left, permission is gone again
    with pytest.raises(SafetensorError):
        torch.load(io.BytesIO(data))
    # an explicit weights_only=False trusts the file, as with pickle
    _check_objects(obj, torch.load(io.BytesIO(data), weights_only=False))


def test_add_safe_globals_and_string_entries(tmp_path):
    data = _save_bytes({"m": Mode.TRAIN})
    try:
        torch.serialization.add_safe_globals([(Mode, f"{__name__}.Mode")])
        assert torch.load(io.BytesIO(data))["m"] is Mode.TRAIN
    finally:
        torch.serialization.clear_safe_globals()
    with pytest.raises(SafetensorError):
        torch.load(io.BytesIO(data))


def test_each_class_needs_its_own_permission():
    data = _save_bytes({"c": Config(1.0, pathlib.Path("p")), "m": Mode.TRAIN})
    with torch.serialization.safe_globals([Config]):
        with pytest.raises(SafetensorError) as info:
            torch.load(io.BytesIO(data))
    assert "Mode" in str(info.value)


def test_framework_values_roundtrip_with_their_allowlist(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], learning_rate=3e-4)
    data = _save_bytes(args)
    with pytest.raises(SafetensorError):
        torch.load(io.BytesIO(data))
    loaded = torch.load(io.BytesIO(data), weights_only=False)
    assert type(loaded) is TrainingArguments and loaded.to_dict() == args.to_dict()


_MARKER_MODULE = '''
import os
MARK = os.environ["MARKER"]
def _mark(what):
    with open(MARK, "a") as f:
        f.write(what + "\\n")
_mark("import")

class Evil:
    def __new__(cls, *a, **k):
        _mark("new")
        return super().__new__(cls)
    def __init__(self, *a, **k):
        _mark("init")
    def __setstate__(self, state):
        _mark("setstate")
        self.__dict__.update(state)
    def __reduce_ex__(self, proto):
        return (make, (1,), {"s": 1})

def make(x):
    _mark("call")
    return Evil.__new__(Evil)

class Plain:
    def __init__(self):
        self.v = 1
'''


def _run(code: str, tmp_path, marker) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]), MARKER=str(marker))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_marker_proves_nothing_runs_or_imports_without_permission(tmp_path):
    (tmp_path / "evilmod.py").write_text(_MARKER_MODULE)
    marker = tmp_path / "marker.txt"
    ck = tmp_path / "evil.safetensors"
    out = _run(f"""
        import torch, torch_safetensors, evilmod
        obj = {{"evil": evilmod.Evil.__new__(evilmod.Evil), "plain": evilmod.Plain(), "cls": evilmod.Evil,
               "fn": evilmod.make}}
        torch.save(obj, {str(ck)!r}, format="safetensors")
    """, tmp_path, marker)
    assert out.returncode == 0, out.stderr
    marker.unlink()
    # refused: nothing constructed, and the module the file names is not even imported
    for load in ("torch.load(p)", "torch.load(io.BytesIO(open(p, 'rb').read()))",
                 "torch.load(p, map_location='meta')", "torch.load(p, weights_only=True)"):
        out = _run(f"""
            import io, sys, torch, torch_safetensors
            p = {str(ck)!r}
            try:
                {load}
            except torch_safetensors.SafetensorError as e:
                print("refused:", e)
            assert "evilmod" not in sys.modules
        """, tmp_path, marker)
        assert out.returncode == 0, out.stderr
        assert "refused:" in out.stdout and "evilmod." in out.stdout
        assert not marker.exists(), marker.read_text()
    # a permission for one class does not reach the others
    out = _run(f"""
        import torch, torch_safetensors, evilmod
        with torch.serialization.safe_globals([evilmod.Plain]):
            try:
                torch.load({str(ck)!r})
            except torch_safetensors.SafetensorError as e:
                print("refused:", e)
    """, tmp_path, marker)
    assert "refused:" in out.stdout, out.stderr
    assert marker.read_text() == "import\n"  # the test imported it itself; nothing else ran
    marker.unlink()
    # allowed: rebuilt exactly as pickle's protocol says
    out = _run(f"""
        import torch, torch_safetensors, evilmod
        with torch.serialization.safe_globals([evilmod.Evil, evilmod.Plain, evilmod.make]):
            obj = torch.load({str(ck)!r})
        assert type(obj["evil"]) is evilmod.Evil and obj["plain"].v == 1 and obj["cls"] is evilmod.Evil
    """, tmp_path, marker)
    assert out.returncode == 0, out.stderr
    assert marker.read_text().split() == ["import", "call", "new", "setstate"]


# ---- limits ----


def test_tensor_subclass_needs_permission_on_load_only():
    data = _save_bytes({"t": torch.ones(2).as_subclass(Tagged)})
    with pytest.raises(SafetensorError, match="Tagged"):
        torch.load(io.BytesIO(data))


def test_cycles_refused_with_a_path(tmp_path):
    a = [1]
    a.append({"back": a})
    with pytest.raises(ValueError, match="itself"):
        torch.save({"x": a}, tmp_path / "c.safetensors", format="safetensors")
    assert os.listdir(tmp_path) == []


def test_reduce_callable_that_is_not_a_class_needs_permission():
    import functools

    data = _save_bytes({"p": functools.partial(max, 1)})
    with pytest.raises(SafetensorError, match="functools.partial"):
        torch.load(io.BytesIO(data))


# ---- old files ----


def test_version_1_files_still_read():
    doc = {"version": 1, "root": {"od": [["w", {"t": "w", "p": 1}], [3, {"tu": [1.5, {"f": "nan"}]}],
                                         ["tie", {"t": "w"}], ["same", {"t": "w", "same": 1}]]}}
    data = safetensors.torch.save({"w": torch.arange(3.0)}, metadata={"format": "pt", STRUCTURE_KEY: json.dumps(doc)})
    loaded = torch.load(io.BytesIO(data))
    assert type(loaded) is OrderedDict and type(loaded["w"]) is nn.Parameter
    assert loaded[3][0] == 1.5 and math.isnan(loaded[3][1])
    assert loaded["same"] is loaded["w"] and loaded["tie"] is not loaded["w"]
    # version 1 never had the new tags
    for root in ({"set": [1]}, {"d": [[1.5, 1]]}, {"obj": {"new": "os:system"}}):
        bad = safetensors.torch.save({"w": torch.ones(1)}, metadata={
            "format": "pt", STRUCTURE_KEY: json.dumps({"version": 1, "root": root})})
        with pytest.raises(SafetensorError):
            torch.load(io.BytesIO(bad))


# ---- hostile structures ----


def _crafted(root, version=2, tensors=None) -> bytes:
    tensors = {"w": torch.arange(3.0), "i": torch.arange(4), "u": torch.zeros(5, dtype=torch.uint8)} \
        if tensors is None else tensors
    text = root if isinstance(root, str) else json.dumps({"version": version, "root": root})
    return safetensors.torch.save(tensors, metadata={"format": "pt", STRUCTURE_KEY: text})


_ALLOWED_FOR_HOSTILE = [Config, Mode, Slotted, WithState, TaggedDict, Tagged]

HOSTILE = {
    "unknown_class": {"obj": {"new": "os:system"}},
    "unknown_module": {"obj": {"new": "no_such_module_xyz:Thing"}},
    "call_unknown": {"obj": {"call": "builtins:eval", "args": ["1"]}},
    "ref_unknown": {"ref": "subprocess:Popen"},
    "ref_malformed": {"ref": "os.system"},
    "ref_injection": {"ref": "os:system; rm"},
    "ref_not_str": {"ref": ["os", "system"]},
    "obj_both": {"obj": {"new": "x:Y", "call": "x:y"}},
    "obj_neither": {"obj": {"args": []}},
    "obj_extra": {"obj": {"new": "x:Y", "oops": 1}},
    "obj_body_list": {"obj": ["x:Y"]},
    "allowed_wrong_arity": {"obj": {"call": f"{__name__}:Mode", "args": ["train", "eval", 3]}},
    "allowed_bad_value": {"obj": {"call": f"{__name__}:Mode", "args": ["nope"]}},
    "allowed_bad_state": {"obj": {"new": f"{__name__}:WithState", "state": {"l": [1]}}},
    "allowed_slots_bad": {"obj": {"new": f"{__name__}:Slotted", "state": {"tu": [None, {"d": {"zz": 1}}]}}},
    "allowed_dataclass_state_not_dict": {"obj": {"new": f"{__name__}:Config", "state": 5}},
    "allowed_dict_items_bad": {"obj": {"new": f"{__name__}:TaggedDict", "dict": [[{"l": []}, 1]]}},
    "allowed_subclass_state_list": {"tk": "sub", "cls": f"{__name__}:Tagged", "data": {"t": "w"}, "state": {"l": []}},
    "subclass_not_tensor": {"tk": "sub", "cls": f"{__name__}:Config", "data": {"t": "w"}},
    "huge_int_digits": "{\"version\":2,\"root\":" + "9" * 100_000 + "}",
    "huge_range": {"range": [0, 2**70, 0]},
    "huge_size": {"size": [2**80]},
    "huge_meta": {"tk": "meta", "dtype": "float32", "shape": [2**62, 2**62]},
    "meta_stride_mismatch": {"tk": "meta", "dtype": "float32", "shape": [2], "stride": [1, 1]},
    "deep_nesting": "{\"version\":2,\"root\":" + "{\"set\":[" * 300 + "]}" * 300 + "}",
    "deep_json": "[" * 200_000 + "]" * 200_000,
    "set_unhashable": {"set": [{"l": []}]},
    "key_unhashable": {"d": [[{"l": [1]}, 1]]},
    "bytes_not_b64": {"b": "!!!"},
    "bytes_int_tensor": {"b": {"t": "i"}},
    "complex_arity": {"c": [1]},
    "complex_str": {"c": ["a", "b"]},
    "range_float": {"range": [0, 1.5, 1]},
    "slice_arity": {"slice": [1]},
    "dtype_unknown": {"dtype": "float128"},
    "dtype_object": {"dtype": {"d": {}}},
    "device_bad": {"device": "warp:9"},
    "layout_unknown": {"layout": "strange"},
    "path_unknown_type": {"path": ["Path", "x"]},
    "path_not_str": {"path": ["PosixPath", 3]},
    "namespace_int_key": {"ns": [[1, 2]]},
    "defaultdict_factory_unknown": {"dd": ["eval", {}]},
    "defaultdict_factory_ref": {"dd": [{"ref": "os:system"}, {}]},
    "np_object_dtype": {"nd": ["|O", {"t": "w"}]},
    "np_str_dtype": {"nd": ["<U3", {"t": "w"}]},
    "np_dtype_mismatch": {"nd": ["<i8", {"t": "w"}]},
    "np_scalar_overflow": {"npv": ["|i1", 300]},
    "np_scalar_wrong_type": {"npv": ["<f4", "x"]},
    "np_dtype_datetime": {"npdt": "<M8"},
    "complex_kind_wrong_dtype": {"tk": "complex", "data": {"t": "i"}},
    "complex_kind_bad_shape": {"tk": "complex", "data": {"t": "w"}},
    "sparse_out_of_bounds": {"tk": "sparse_coo", "size": [2], "coalesced": False,
                             "indices": {"t": "i"}, "values": {"t": "w"}},
    "sparse_compressed_bad": {"tk": "sparse_compressed", "layout": "sparse_csr", "size": [2, 2],
                              "compressed": {"t": "i"}, "plain": {"t": "i"}, "values": {"t": "w"}},
    "sparse_layout_wrong": {"tk": "sparse_compressed", "layout": "strided", "size": [2, 2],
                            "compressed": {"t": "i"}, "plain": {"t": "i"}, "values": {"t": "w"}},
    "quant_wrong_int_dtype": {"tk": "quant", "dtype": "qint8", "scheme": "per_tensor_affine",
                              "int": {"t": "w"}, "scale": 0.1, "zero_point": 0},
    "quant_not_quantized": {"tk": "quant", "dtype": "float32", "scheme": "per_tensor_affine",
                            "int": {"t": "w"}, "scale": 0.1, "zero_point": 0},
    "quant_channel_bad_axis": {"tk": "quant", "dtype": "quint8", "scheme": "per_channel_affine",
                               "int": {"t": "u"}, "scales": {"t": "w"}, "zero_points": {"t": "i"}, "axis": 7},
    "nested_empty": {"tk": "nested", "layout": "strided", "parts": []},
    "nested_bad_layout": {"tk": "nested", "layout": "ragged", "parts": [{"t": "w"}]},
    "kind_unknown": {"tk": "pickle", "data": {"t": "w"}},
    "kind_not_str": {"tk": {"d": {}}, "data": {"t": "w"}},  # found by fuzz/fuzz_structure.py
    "nested_layout_list": {"tk": "nested", "layout": ["strided"], "parts": [{"t": "w"}]},
    "kind_extra_field": {"tk": "complex", "data": {"t": "w"}, "code": "x"},
    "tensor_extra_field": {"t": "w", "__class__": "os:system"},
    "tensor_object_number_negative": {"t": "w", "o": -1},
    "tensor_object_number_str": {"t": "w", "o": "1"},
    "missing_tensor": {"l": [{"t": "nope"}]},
    "unknown_tag": {"pickle": "gASV"},
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_structure_refused_in_bounded_time_and_memory(tmp_path, name):
    import tracemalloc

    data = _crafted(HOSTILE[name])
    p = tmp_path / "h.safetensors"
    p.write_bytes(data)
    marker_before = set(sys.modules)
    tracemalloc.start()
    try:
        start = time.monotonic()
        with torch.serialization.safe_globals(_ALLOWED_FOR_HOSTILE):
            for load in (lambda: torch.load(p), lambda: torch.load(io.BytesIO(data)),
                         lambda: torch.load(p, map_location="meta")):
                with pytest.raises(SafetensorError) as info:
                    load()
                assert STRUCTURE_KEY in str(info.value) or "not allowed" in str(info.value)
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 20, elapsed
    assert peak < 64 << 20, peak
    new_modules = set(sys.modules) - marker_before
    assert not {m for m in new_modules if m.split(".")[0] in ("subprocess", "no_such_module_xyz")}
    # the tensors are still there for the package: only our structure is refused
    assert torch.equal(safetensors.torch.load_file(str(p))["w"], torch.arange(3.0))


# ---- the structure decoder's memory budget (issue 11 point 3) ----


_MEASURE = r"""
import gc, json, sys, time
import torch
from torch_safetensors import _checkpoint as ck
unit, mb = sys.argv[1], float(sys.argv[2])
k = int(mb * 1e6) // len(unit)
parts = [unit] * k
text = '{"version":2,"root":{"l":[' + "".join(parts)[:-1] + ']}}'
del parts
gc.collect()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak RSS starts again from here
base = status("VmRSS:")
start = time.monotonic()
try:
    out = ck.unflatten({"w": torch.ones(2)}, {ck.STRUCTURE_KEY: text})
    result = "ok"
except ck.SafetensorError as e:
    result = "refused " + str(e)[:200]
print(json.dumps({"text": len(text), "peak": status("VmHWM:") - base, "seconds": time.monotonic() - start,
                  "result": result}))
"""


def _measure(unit: str, mb: float) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, unit, str(mb)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux peak-RSS reset")
def test_header_near_the_limit_costs_at_most_about_4x():
    # a structure of long strings and floats near the 100 MB header limit loads within 4x
    r = _measure('"' + "s" * 90 + '",-1.2345678901234567e-100,', 95)
    assert r["result"] == "ok", r
    assert r["peak"] <= 4 * r["text"], r


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux peak-RSS reset")
@pytest.mark.parametrize("unit", ['{"t":"w"},', '{"t":"w","o":1},', "[],", '{"d":{"a":1}},', '"ab",'])
def test_amplifying_header_refused_before_parsing(unit):
    # each of these would cost 10-50x its size as Python objects (a 98 MB file of tensor
    # references took 4.5 GB and 70 s before the budget)
    r = _measure(unit, 98)
    assert r["result"].startswith("refused") and "budget" in r["result"], r
    assert r["peak"] <= r["text"], r
    assert r["seconds"] < 10, r


def test_budget_counts_tensor_objects_while_building():
    # many distinct tie objects: each costs a tensor object, charged against the budget
    n = 3000
    root = {"l": [{"t": "w", "o": i + 1} for i in range(n)]}
    text = json.dumps({"version": 2, "root": root})
    old = _checkpoint.BUDGET_FLOOR
    try:
        _checkpoint.BUDGET_FLOOR = _checkpoint.estimate(text) + 1000 * _checkpoint._COST_TENSOR
        with pytest.raises(SafetensorError, match="budget"):
            _checkpoint.unflatten({"w": torch.ones(2)}, {STRUCTURE_KEY: text})
    finally:
        _checkpoint.BUDGET_FLOOR = old
    out = _checkpoint.unflatten({"w": torch.ones(2)}, {STRUCTURE_KEY: text})
    assert len({id(t) for t in out}) == n


def test_one_tensor_object_per_stored_object():
    w = torch.arange(4.0)
    tie = w.view(4)  # another object over the same memory
    loaded = _roundtrip({"a": [w] * 50, "b": [tie] * 50, "c": w})
    assert len({id(t) for t in loaded["a"]}) == 1 and loaded["a"][0] is loaded["c"]
    assert len({id(t) for t in loaded["b"]}) == 1 and loaded["b"][0] is not loaded["a"][0]
    assert loaded["b"][0].data_ptr() == loaded["a"][0].data_ptr()


# ---- fuzzing the structure decoder ----

_TAGS = sorted(_checkpoint._TAGS) + ["t", "tk", "obj", "new", "call", "state", "args", "x"]
_STRINGS = ["w", "i", "u", "float32", "PosixPath", "<f4", "|b1", "<i8", "|O", "os:system",
            f"{__name__}:Mode", f"{__name__}:Config", f"{__name__}:Tagged", "sparse_coo", "strided",
            "complex", "meta", "nested", "quant", "sub", "per_tensor_affine", "qint8", "AAAA", "train"]

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                  st.sampled_from(_STRINGS), st.text(max_size=4))


def _node(children):
    return st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(_TAGS), children, min_size=1, max_size=3),
        st.builds(lambda k, v: {k: v}, st.sampled_from(_TAGS), st.lists(children, max_size=4)),
        st.builds(lambda k, v: {k: v}, st.sampled_from(_TAGS), children),
        st.builds(lambda tk, d: dict({"tk": tk}, **d), st.sampled_from(list(_checkpoint._KIND_FIELDS)),
                  st.dictionaries(st.sampled_from(sorted(set().union(*_checkpoint._KIND_FIELDS.values()))),
                                  children, max_size=4)),
        st.builds(lambda kind, body: {"obj": dict({kind: body[0]}, **body[1])},
                  st.sampled_from(["new", "call"]),
                  st.tuples(st.sampled_from(_STRINGS), st.dictionaries(
                      st.sampled_from(["args", "state", "list", "dict", "kwargs"]), children, max_size=2))),
    )


_docs = st.recursive(_leaf, _node, max_leaves=30)


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(root=_docs)
def test_fuzzed_structures_give_a_value_or_safetensor_error(root):
    tensors = {"w": torch.arange(3.0), "i": torch.arange(4), "u": torch.zeros(5, dtype=torch.uint8)}
    text = json.dumps({"version": 2, "root": root})
    with torch.serialization.safe_globals([Mode, Config, Tagged]):
        try:
            _checkpoint.unflatten(dict(tensors), {STRUCTURE_KEY: text})
        except SafetensorError:
            pass


# ---- inspect shows the whole checkpoint as a tree (issue 14 point 6) ----


def test_inspect_tree_text_and_json(tmp_path, capsys):
    from torch_safetensors import _cli

    w = torch.ones(2, 3)
    obj = {"model": {"w": w, "tied": w}, "epoch": 3, "args": Config(0.1, pathlib.Path("x")),
           "rng": np.random.get_state(), "sp": torch.eye(2).to_sparse(), "keys": {(1, 2): {1}}}
    p = tmp_path / "c.safetensors"
    torch.save(obj, p, format="safetensors")
    assert _cli.main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint tree" in out
    assert "w: tensor F32 [2, 3]  (model.w)" in out
    assert f"args: object {__name__}.Config" in out
    assert "epoch: int 3" in out and "sp: tensor (sparse_coo)" in out
    assert "tie: model.w is referenced at model.w, model.tied" in out
    assert _cli.main(["inspect", "--json", str(p)]) == 0
    tree = json.loads(capsys.readouterr().out)["files"][0]["tree"]
    assert tree["ties"] == {"model.w": ["model.w", "model.tied"]}
    items = {i["key"]: i["value"] for i in tree["root"]["items"]}
    assert items["model"]["items"][0]["value"] == {"type": "tensor", "name": "model.w", "dtype": "F32",
                                                   "shape": [2, 3]}
    assert items["args"]["type"] == "object" and items["args"]["class"] == f"{__name__}.Config"
    assert items["rng"]["type"] == "tuple" and items["rng"]["items"][1]["type"] == "numpy.ndarray"


def test_inspect_tree_of_a_hostile_structure_reports_and_lists_tensors(tmp_path, capsys):
    from torch_safetensors import _cli

    p = tmp_path / "h.safetensors"
    p.write_bytes(_crafted("{\"version\":2,\"root\":" + '{"tk":"complex","data":' * 3000 + "1" + "}" * 3001))
    assert _cli.main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint tree: invalid" in out and "w  " in out


def test_structure_fuzzer_runs_clean_for_a_few_seconds():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "fuzz", "fuzz_structure.py"), "5", "7"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "structure fuzzer:" in out.stdout and " inputs," in out.stdout


def make_plain_dict():
    """An allowlisted callable that returns an instance of a class nobody allowed."""
    return WithState(1)


def test_state_goes_only_into_allowed_classes():
    doc = {"obj": {"call": f"{__name__}:make_plain_dict", "state": {"d": {"w2": 8}}}}
    data = _crafted(doc)
    with torch.serialization.safe_globals([make_plain_dict]):
        with pytest.raises(SafetensorError, match="WithState"):
            torch.load(io.BytesIO(data))
    with torch.serialization.safe_globals([make_plain_dict, WithState]):
        assert torch.load(io.BytesIO(data)).w == 4


def test_huge_int_refused_fast_even_where_the_int_limit_is_lifted():
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # a program may lift CPython's limit; ours stays
    try:
        text = '{"version":2,"root":{"l":[1,' + "9" * 2_000_000 + "]}}"
        start = time.monotonic()
        with pytest.raises(SafetensorError, match="digits"):
            _checkpoint.unflatten({}, {STRUCTURE_KEY: text})
        assert time.monotonic() - start < 5
    finally:
        sys.set_int_max_str_digits(old)
    assert _checkpoint.unflatten({}, {STRUCTURE_KEY: '{"version":2,"root":{"l":[' + "9" * 4300 + "]}}"})[0] > 0


def test_an_enum_member_is_stored_as_its_class_called_whatever_python_wrote_it():
    # saved through getattr(cls, name), an enum would need builtins.getattr allowed to
    # load: it is written as cls(value), as later Pythons reduce it, byte for byte
    def structure(obj):
        return _checkpoint.flatten(obj)[1][_checkpoint.STRUCTURE_KEY]

    assert structure({"m": ByName.OFF}) == structure({"m": ByValue.OFF}).replace("ByValue", "ByName")
    assert "getattr" not in structure({"m": ByName.OFF})
    data = _save_bytes({"m": ByName.OFF, "n": [ByName.ON]})
    with torch.serialization.safe_globals([ByName]):
        back = torch.load(io.BytesIO(data))
    assert back["m"] is ByName.OFF and back["n"][0] is ByName.ON
    with pytest.raises(SafetensorError, match="ByName"):
        torch.load(io.BytesIO(data))
    # composite flags: operator.or_(a, b) on early 3.11, cls(value) after
    flags = {"rw": Perm.R | Perm.W, "x": Perm.X, "none": Perm(0)}
    text = structure(flags)
    assert "getattr" not in text and "or_" not in text
    with torch.serialization.safe_globals([Perm]):
        back = torch.load(io.BytesIO(_save_bytes(flags)))
    assert back == flags and all(back[k] is flags[k] for k in flags)
