"""Hostile structures built from the schema (issue 22, section 6): every node kind, with
right and wrong fields, pointing at every stored tensor (every dtype and shape), tied and
numbered references, references inside references, and the budget's edges. Whatever
the file says: the validator (verify) and the loader agree, only SafetensorError comes
out, and verify prints one line for it."""
from __future__ import annotations

import contextlib
import io
import os
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_safetensors  # noqa: F401 - installs the wrappers
from torch_safetensors import _api, _checkpoint, _cli
from torch_safetensors._core import DTYPES, SafetensorError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_SHAPES = [(), (0,), (3,), (2, 3), (1, 0), (2, 2, 2)]
_KINDS = [torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]
TENSORS = {f"{str(d)[6:]}_{i}": torch.zeros(s, dtype=d) for d in _KINDS for i, s in enumerate(_SHAPES)}
_NAMES = {v: k for k, v in DTYPES.items() if v is not None}
HELD = {k: (_NAMES[t.dtype], list(t.shape), t.numel() * t.element_size()) for k, t in TENSORS.items()}

# what only building can tell: data-level invariants, what an allowed class does with its state
_LOADER_ONLY = ("cannot be rebuilt", "out of range", "rebuilding", "is not a class", "is not callable",
                "returned a", "is not a tensor subclass", "unhashable", "not hashable", "did not give back")


class Pair(torch.Tensor):
    """An allowed traceable subclass (the "tsub" row): one inner tensor, the outer dtype as
    its flatten context."""

    @staticmethod
    def __new__(cls, a, dtype):
        r = torch.Tensor._make_wrapper_subclass(cls, a.shape, dtype=dtype, device=a.device)
        r.a = a
        return r

    def __tensor_flatten__(self):
        return ["a"], self.dtype

    @classmethod
    def __tensor_unflatten__(cls, inner, ctx, outer_size, outer_stride):
        return cls(inner["a"], ctx)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"Pair: {func}")


_PAIR = f"{__name__}:Pair"

_ints = st.sampled_from([0, 1, 2, 3, -1, 2 ** 62, 2 ** 64, 10 ** 400])
_names = st.sampled_from(sorted(TENSORS) + ["missing"])


@st.composite
def ref(draw):
    node = {"t": draw(_names)}
    for flag in draw(st.sets(st.sampled_from(["p", "g", "same", "o"]), max_size=2)):
        node[flag] = draw(_ints) if flag == "o" else draw(st.sampled_from([1, 1, 0, 2, True]))
    return node


def tensor_node(inner):
    sizes = st.lists(_ints, max_size=3)
    return st.one_of(
        ref(),
        st.fixed_dictionaries({"tk": st.just("complex"), "data": ref()}),
        st.fixed_dictionaries({"tk": st.just("sparse_coo"), "size": sizes, "coalesced": st.booleans(),
                               "indices": ref(), "values": ref() | inner}),
        st.fixed_dictionaries({"tk": st.just("sparse_compressed"), "size": sizes,
                               "layout": st.sampled_from(["sparse_csr", "sparse_bsc", "strided"]),
                               "compressed": ref(), "plain": ref(), "values": ref()}),
        st.fixed_dictionaries({"tk": st.just("quant"), "dtype": st.sampled_from(["quint8", "qint8", "float32"]),
                               "scheme": st.sampled_from(["per_tensor_affine", "per_channel_affine", "bogus"]),
                               "int": ref(), "scale": st.floats() | _ints, "zero_point": _ints}),
        st.fixed_dictionaries({"tk": st.just("quant"), "dtype": st.just("quint8"),
                               "scheme": st.sampled_from(["per_channel_affine", "per_channel_affine_float_qparams"]),
                               "int": ref(), "scales": ref(), "zero_points": ref(), "axis": _ints}),
        st.fixed_dictionaries({"tk": st.just("nested"), "layout": st.sampled_from(["strided", "jagged", "x"]),
                               "parts": st.lists(ref() | inner, max_size=3)}),
        st.fixed_dictionaries({"tk": st.just("meta"), "dtype": st.sampled_from(["float32", "qint8", "nope"]),
                               "shape": sizes, "stride": st.none() | sizes}),
        st.fixed_dictionaries({"tk": st.just("sub"), "cls": st.sampled_from(["torch:Tensor", "os:system", "x"]),
                               "data": ref()}),
        st.fixed_dictionaries(
            {"tk": st.just("tsub"), "name": st.sampled_from(["a", "b"]),
             "cls": st.sampled_from([_PAIR, _PAIR, "torch:Tensor", "os:system", "x"]),
             "inner": st.dictionaries(st.sampled_from(["a", "b"]), ref() | inner, max_size=2),
             "ctx": st.sampled_from([{"dtype": "float32"}, {"dtype": "int64"}, {"dtype": "nope"}, None, 3]),
             "size": sizes, "stride": sizes, "dtype": st.sampled_from(["float32", "int64", "nope"])},
            optional={"param": st.sampled_from([1, 1, True, 2]), "grad": st.sampled_from([1, 0])}),
        st.fixed_dictionaries({"tk": st.just("tsub"), "name": st.sampled_from(["a", "b"]), "same": st.just(1)}),
    )


def value_node(inner):
    return st.one_of(
        tensor_node(inner),
        st.builds(lambda t: {"b": t}, ref() | st.sampled_from(["AAAA", "!!", ""])),
        st.builds(lambda t: {"ba": t}, ref()),
        st.builds(lambda d, t: {"nd": [d, t]}, st.sampled_from(["<f4", ">i8", "<c16", "|b1", "|O", "<u1"]),
                  ref() | st.fixed_dictionaries({"tk": st.just("complex"), "data": ref()})),
        st.builds(lambda d, v: {"npv": [d, v]}, st.sampled_from(["<f2", "<i1", "<u8", "<c8", "|b1"]),
                  _ints | st.floats() | st.booleans()),
        st.builds(lambda a, b: {"c": [a, b]}, _ints | st.floats(), _ints | st.just({"f": "nan"})),
        st.builds(lambda x: {"l": x}, st.lists(inner, max_size=3)),
        st.builds(lambda x: {"set": x}, st.lists(inner, max_size=3)),
        st.builds(lambda x: {"d": x}, st.lists(st.lists(inner, min_size=2, max_size=2), max_size=3)),
        st.builds(lambda x: {"d": x}, st.dictionaries(st.text(max_size=3), inner, max_size=3)),
        st.builds(lambda x, a: {"oda": [x, a]}, st.dictionaries(st.text(max_size=3), inner, max_size=2),
                  st.dictionaries(st.sampled_from(["_metadata", "keys", "x"]), inner, max_size=2)),
        st.builds(lambda x: {"ns": x}, st.lists(st.lists(inner, min_size=2, max_size=2), max_size=2)),
        st.builds(lambda f, x: {"dd": [f, x]}, st.sampled_from([None, "list", "nope", {"ref": "os:system"},
                                                                   {"l": []}]), st.just({})),
        st.builds(lambda b: {"obj": b}, st.fixed_dictionaries(
            {"new": st.sampled_from(["builtins:object", "os:system", "bad ref"])},
            optional={"args": st.lists(inner, max_size=2), "state": inner, "dict": st.just([[1, 2]])})),
        st.sampled_from([{"range": [0, 3, 0]}, {"size": [2 ** 70]}, {"device": "cuda:99999999999999999999"},
                         {"path": ["PosixPath", 3]}, {"dtype": "nope"}, {"f": "nan"}, {"x": 1}, {"l": 1}, {}]),
    )


_TREES = st.recursive(st.none() | st.integers() | st.text(max_size=3), value_node, max_leaves=6)


@settings(max_examples=int(os.environ.get("TS_HOSTILE_EXAMPLES", "300")), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(_TREES)
def test_hostile_structures_validator_and_loader_agree(root):
    text = json.dumps({"version": 2, "root": root})
    try:
        _checkpoint.validate(text, HELD)
        refused = None
    except SafetensorError as e:
        refused = e
    try:
        with torch.serialization.safe_globals([torch.Tensor, Pair]):
            _checkpoint.unflatten({k: t.detach() for k, t in TENSORS.items()}, {_checkpoint.STRUCTURE_KEY: text})
    except SafetensorError as e:
        assert refused is not None or e.code in ("not_allowed", "budget") or any(
            w in str(e) for w in _LOADER_ONLY), f"verify accepted what loading refuses: {e}"
    else:
        assert refused is None, f"loaded what verify refuses: {refused}"


def test_the_budget_edges(tmp_path):
    """Tie objects are charged before they are built; copies of data at most one copy."""
    n = _checkpoint.BUDGET_FLOOR // _checkpoint._COST_TENSOR
    over = {"l": [{"t": "w", "o": i} for i in range(1, n + 2)]}
    p = str(tmp_path / "over.safetensors")
    doc = json.dumps({"version": 2, "root": over}, separators=(",", ":"))
    _api.save_file({"w": torch.ones(1)}, p, metadata={_checkpoint.STRUCTURE_KEY: doc})
    with pytest.raises(SafetensorError) as info:
        torch.load(p)
    assert info.value.code == "budget"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert _cli.main(["verify", p]) == _cli.EXIT_INVALID
    assert out.getvalue().startswith("INVALID") and "budget" in out.getvalue()
