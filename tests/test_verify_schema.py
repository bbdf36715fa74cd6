"""verify validates a whole checkpoint's structure against its schema (issue 22, section 2):
valid files of every kind say OK without any allowlist and without anything imported or
built; malformed structures are one INVALID line naming the node; every argument gets
its line, whatever a crafted file raises; verify --data checks that the recorded checksums
cover exactly the tensors the file holds."""
from __future__ import annotations

import dataclasses
import datetime
import json
import sys

import numpy as np
import pytest
import torch

import torch_safetensors as ts  # noqa: F401 - installs the wrappers
from torch_safetensors import _api, _checkpoint, _checksums, _cli
from torch_safetensors._core import SafetensorError


@dataclasses.dataclass
class Config:
    lr: float
    name: str = "run"


def run(capsys, *argv):
    status = _cli.main(list(map(str, argv)), prog="torch-safetensors")
    out, err = capsys.readouterr()
    return status, out, err


def save(path, obj, **kw):
    torch.save(obj, path, format="safetensors", **kw)
    return path


def craft(path, tensors, root, *, version=_checkpoint.STRUCTURE_VERSION, extra=None):
    """A file whose structure is exactly root (no writer in between)."""
    meta = {_checkpoint.STRUCTURE_KEY: json.dumps({"version": version, "root": root})}
    meta.update(extra or {})
    _api.save_file(tensors, str(path), metadata=meta)
    return path


def quantized():
    return {
        "per_tensor": torch.quantize_per_tensor(torch.tensor([-1.0, 0.0, 2.5]), 0.1, 3, torch.qint8),
        "per_channel": torch.quantize_per_channel(torch.randn(3, 4), torch.tensor([0.1, 0.2, 0.3], dtype=torch.double),
                                                  torch.tensor([0, 1, 2]), 0, torch.quint8),
        "float_qparams": torch.quantize_per_channel(torch.randn(2, 5), torch.tensor([0.5, 0.25]),
                                                    torch.tensor([0.0, 1.0]), 0, torch.quint8),
    }


VALID = {
    "rng_state": lambda: {"python": __import__("random").getstate(), "numpy": np.random.get_state(),
                          "cpu": torch.get_rng_state()},
    "numpy_values": lambda: {"a": np.arange(6, dtype=">i4").reshape(2, 3), "s": np.float32(1.5),
                             "c": np.array([1 + 2j]), "dt": np.dtype("<u2")},
    "big_bytes": lambda: {"b": bytes(range(256)) * 20, "ba": bytearray(5000), "small": b"xy"},
    "sparse": lambda: {"coo": torch.eye(3).to_sparse(), "csr": torch.eye(4).to_sparse_csr(),
                       "csc": torch.eye(4).to_sparse_csc(), "bsr": torch.eye(4).to_sparse_bsr((2, 2)),
                       "bsc": torch.eye(4).to_sparse_bsc((2, 2)),
                       "hybrid": torch.ones(3, 2, 2).to_sparse(1), "batched": torch.eye(3).repeat(2, 1, 1).to_sparse_csr()},
    "quantized": quantized,
    "nested": lambda: {"n": torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)])},
    "objects": lambda: {"cfg": Config(0.1), "date": datetime.date(2024, 5, 1), "cls": Config},
    "complex_meta": lambda: {"c": torch.ones(3, dtype=torch.complex128), "m": torch.empty(2, 3, device="meta")},
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_checkpoints_verify_ok_without_an_allowlist(tmp_path, capsys, kind):
    p = save(tmp_path / f"{kind}.safetensors", VALID[kind](), checksums=True)
    status, out, _ = run(capsys, "verify", p)
    assert status == 0, out
    assert out.startswith("OK"), out
    status, out, _ = run(capsys, "verify", "--data", p)
    assert status == 0 and out.startswith("OK") and "matches" in out, out


def test_verify_reports_the_classes_a_file_names_without_importing_them(tmp_path, capsys):
    p = craft(tmp_path / "a.safetensors", {"w": torch.ones(2)},
              {"d": {"w": {"t": "w"}, "o": {"obj": {"new": "no_such_module_xyz.sub:Thing", "args": [1]}},
                     "r": {"ref": "os:system"}}})
    status, out, _ = run(capsys, "verify", p)
    assert status == 0, out
    assert "no_such_module_xyz.sub.Thing" in out and "os.system" in out
    assert "no_such_module_xyz" not in sys.modules
    # loading is what the allowlist is for
    with pytest.raises(SafetensorError, match="not allowed"):
        torch.load(p)


def test_validate_never_resolves_or_builds(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("validation resolved or built something")

    monkeypatch.setattr(_checkpoint._types.Allowlist, "resolve", boom)
    monkeypatch.setattr(_checkpoint._Builder, "build", boom)
    monkeypatch.setattr(torch, "sparse_coo_tensor", boom)
    monkeypatch.setattr(torch.nested, "nested_tensor", boom)
    text = json.dumps({"version": 2, "root": {"l": [
        {"obj": {"new": "builtins:object"}},
        {"tk": "sparse_coo", "size": [3, 3], "coalesced": True, "indices": {"t": "i"}, "values": {"t": "v"}},
        {"tk": "nested", "layout": "strided", "parts": [{"t": "v"}]},
    ]}})
    report = _checkpoint.validate(text, {"i": ("I64", [2, 3], 48), "v": ("F32", [3], 12)})
    assert report["classes"] == ["builtins.object"]


# ---- malformed structures: one INVALID line naming the node ----

BAD = {
    "missing tensor": ({"w": torch.ones(2)}, {"d": {"a": {"l": [{"t": "nope"}]}}}, "a[0]"),
    "bytes from a sparse tensor": (
        {"i": torch.zeros(1, 1, dtype=torch.int64), "v": torch.zeros(1, dtype=torch.uint8)},
        {"d": {"b": {"b": {"tk": "sparse_coo", "size": [4], "coalesced": True,
                           "indices": {"t": "i"}, "values": {"t": "v"}}}}}, "at b"),
    "bytes of float data": ({"x": torch.ones(4)}, {"d": {"b": {"b": {"t": "x"}}}}, "at b"),
    "complex with a huge int": ({}, {"d": {"z": {"c": [10 ** 400, 0]}}}, "at z"),
    "quant axis out of range": (
        {"q": torch.zeros(3, 4, dtype=torch.uint8), "s": torch.ones(3, dtype=torch.float64),
         "z": torch.zeros(3, dtype=torch.int64)},
        {"d": {"q": {"tk": "quant", "dtype": "quint8", "scheme": "per_channel_affine", "int": {"t": "q"},
                     "scales": {"t": "s"}, "zero_points": {"t": "z"}, "axis": 5}}}, "axis 5 out of range"),
    "quant wrong number of scales": (
        {"q": torch.zeros(3, 4, dtype=torch.uint8), "s": torch.ones(4, dtype=torch.float64),
         "z": torch.zeros(3, dtype=torch.int64)},
        {"d": {"q": {"tk": "quant", "dtype": "quint8", "scheme": "per_channel_affine", "int": {"t": "q"},
                     "scales": {"t": "s"}, "zero_points": {"t": "z"}, "axis": 0}}}, "q.scales"),
    "sparse values do not fit": (
        {"i": torch.zeros(2, 3, dtype=torch.int64), "v": torch.ones(2)},
        {"d": {"s": {"tk": "sparse_coo", "size": [4, 4], "coalesced": False,
                     "indices": {"t": "i"}, "values": {"t": "v"}}}}, "at s"),
    "csr indices do not fit": (
        {"c": torch.zeros(3, dtype=torch.int64), "p": torch.zeros(2, dtype=torch.int64), "v": torch.ones(2)},
        {"d": {"s": {"tk": "sparse_compressed", "layout": "sparse_csr", "size": [4, 4],
                     "compressed": {"t": "c"}, "plain": {"t": "p"}, "values": {"t": "v"}}}}, "at s"),
    "numpy dtype disagrees": ({"x": torch.ones(2)}, {"d": {"a": {"nd": ["<i4", {"t": "x"}]}}}, "at a"),
    "namespace key not str": ({}, {"d": {"ns": {"ns": [[1, 2]]}}}, "ns[0]"),
    "unhashable set item": ({}, {"d": {"s": {"set": [{"l": []}]}}}, "s[0]"),
    "flag not 1": ({"w": torch.ones(2)}, {"d": {"w": {"t": "w", "p": 2}}}, "at w"),
    "grad on ints": ({"w": torch.ones(2, dtype=torch.int64)}, {"d": {"w": {"t": "w", "g": 1}}}, "at w"),
    "malformed reference": ({}, {"d": {"r": {"ref": "os.system"}}}, "at r"),
    "factory not callable": ({}, {"d": {"dd": {"dd": [{"l": []}, {}]}}}, "at dd"),
    "npv overflow": ({}, {"d": {"v": {"npv": ["<i1", 300]}}}, "at v"),
    "jagged parts differ": ({"a": torch.ones(2, 3), "b": torch.ones(2, 4)},
                            {"d": {"n": {"tk": "nested", "layout": "jagged", "parts": [{"t": "a"}, {"t": "b"}]}}},
                            "n[1]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_structure_is_invalid_naming_the_node(tmp_path, capsys, case):
    tensors, root, where = BAD[case]
    p = craft(tmp_path / "bad.safetensors", tensors, root)
    status, out, _ = run(capsys, "verify", p)
    assert status == _cli.EXIT_INVALID, out
    assert out.startswith("INVALID") and where in out, out
    # the loader refuses what verify refuses, with the same message and only SafetensorError
    with pytest.raises(SafetensorError, match=where.replace("[", r"\[").replace("]", r"\]")):
        torch.load(p)


def test_every_argument_gets_one_line_whatever_a_file_raises(tmp_path, capsys):
    good = save(tmp_path / "good.safetensors", {"a": [1, 2], "w": torch.ones(2)}, checksums=True)
    deep = "[" * 100_000 + "]" * 100_000
    deep_sums = craft(tmp_path / "deep.safetensors", {"w": torch.ones(2)}, {"d": {"w": {"t": "w"}}},
                      extra={_checksums.CHECKSUM_KEY: '{"algorithm":"crc32c","tensors":' + deep + "}"})
    huge = craft(tmp_path / "huge.safetensors", {}, {"c": [10 ** 300 * 10 ** 100, 1]})
    status, out, _ = run(capsys, "verify", "--data", good, deep_sums, huge, good)
    lines = out.splitlines()
    assert status == _cli.EXIT_INVALID
    assert [line.split()[0] for line in lines] == ["OK", "INVALID", "INVALID", "OK"], out
    assert str(deep_sums) in lines[1] and str(huge) in lines[2]


def _sums(path, sums):
    from torch_safetensors import _C

    r = _C.Reader(path=str(path))
    tensors = {n: r.tensor(n) for n in r.offset_keys()}
    meta = dict(r.metadata() or {})
    r.close()
    meta[_checksums.CHECKSUM_KEY] = json.dumps({"algorithm": "crc32c", "tensors": sums})
    tensors = {n: t.clone() for n, t in tensors.items()}
    _api.save_file(tensors, str(path), metadata=meta)


def test_verify_data_invalid_when_checksums_and_tensors_disagree(tmp_path, capsys):
    p = save(tmp_path / "a.safetensors", {"w": torch.ones(3), "b": torch.zeros(2)}, checksums=True)
    assert run(capsys, "verify", "--data", p)[0] == 0
    good = json.loads(_read_meta(p)[_checksums.CHECKSUM_KEY])["tensors"]
    _sums(p, dict(good, ghost="00000000"))
    status, out, _ = run(capsys, "verify", "--data", p)
    assert status == _cli.EXIT_INVALID and "does not hold" in out and "ghost" in out, out
    _sums(p, {"w": good["w"]})
    status, out, _ = run(capsys, "verify", "--data", p)
    assert status == _cli.EXIT_INVALID and "miss tensors" in out and "'b'" in out, out


def _read_meta(path):
    from torch_safetensors import _C

    r = _C.Reader(path=str(path))
    try:
        return dict(r.metadata() or {})
    finally:
        r.close()


def test_validate_names_the_tensors_read_as_data_and_tolerates_unknown_tags(monkeypatch):
    tensors, meta = _checkpoint.flatten({"a": np.arange(3), "c": np.array([1j]), "b": bytes(5000), "w": torch.ones(2)})
    names = {v: k for k, v in _checkpoint.DTYPES.items() if v is not None}
    held = {k: (names[v.dtype], list(v.shape), v.numel() * v.element_size()) for k, v in tensors.items()}
    assert _checkpoint.validate(meta[_checkpoint.STRUCTURE_KEY], held)["data"] == ["a", "b", "c"]
    # a tag added to the type table later, without a schema here: what it holds must still exist
    monkeypatch.setitem(_checkpoint._TAGS, "zz", lambda b, body, depth: body)
    ok = json.dumps({"version": 2, "root": {"zz": {"inner": {"t": "w"}, "x": [1, {"l": [2]}]}}})
    assert _checkpoint.validate(ok, {"w": ("F32", [2], 8)})["classes"] == []
    bad = json.dumps({"version": 2, "root": {"zz": {"inner": {"t": "nope"}}}})
    with pytest.raises(SafetensorError, match="at inner: .*'nope'"):
        _checkpoint.validate(bad, {})


def test_every_kind_and_tag_of_the_table_has_its_own_schema():
    """The generic walk is for rows another branch adds later; a row that ships (the tsub
    row included) must have its own schema, or verify checks only that its tensors exist."""
    missing = [tk for tk in _checkpoint._KIND_FIELDS if not hasattr(_checkpoint._Validator, "kind_" + tk)]
    missing += [tag for tag in set(_checkpoint._TAGS) | set(_checkpoint._V1_TAGS)
                if not hasattr(_checkpoint._Validator, "tag_" + tag)]
    assert missing == []
