"""Whole checkpoints under every map_location, module versions kept, checksums of
conjugate and negative views (issue 22, section 1)."""
from __future__ import annotations

import collections
import importlib
import pkgutil
import warnings

import numpy as np
import pytest
import torch

import torch_safetensors  # noqa: F401 - installs the wrappers
from torch_safetensors import _cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LOCATIONS = {
    "meta": "meta",
    "dict": {"cpu": "meta"},
    "callable": lambda storage, location: storage,
    "device": torch.device("cpu"),
}


def save(path, obj, **kw):
    torch.save(obj, path, format="safetensors", **kw)
    return path


@pytest.mark.parametrize("where", sorted(LOCATIONS))
def test_numpy_values_and_bytes_are_data_whatever_map_location_says(tmp_path, where):
    obj = {"a": np.arange(6, dtype=">i4"), "c": np.array([1 + 2j, 3j]), "b": bytes(range(256)) * 20,
           "ba": bytearray(5000), "rng": np.random.get_state(), "w": torch.ones(2)}
    out = torch.load(save(tmp_path / "a.safetensors", obj), map_location=LOCATIONS[where])
    assert out["a"].dtype == np.dtype(">i4") and (out["a"] == obj["a"]).all()
    assert (out["c"] == obj["c"]).all() and out["b"] == obj["b"] and out["ba"] == obj["ba"]
    assert type(out["ba"]) is bytearray
    assert out["rng"][0] == obj["rng"][0] and (out["rng"][1] == obj["rng"][1]).all()
    assert out["w"].device.type == ("meta" if where in ("meta", "dict") else "cpu")


@pytest.mark.parametrize("where", sorted(LOCATIONS))
def test_sparse_tensors_follow_map_location(tmp_path, where):
    obj = {"coo": torch.eye(3).to_sparse(), "csr": torch.eye(3).to_sparse_csr(), "c": torch.ones(2, dtype=torch.complex128)}
    out = torch.load(save(tmp_path / "a.safetensors", obj), map_location=LOCATIONS[where])
    device = "meta" if where in ("meta", "dict") else "cpu"
    for k, v in obj.items():
        assert out[k].device.type == device and out[k].layout == v.layout and out[k].shape == v.shape
        if device == "cpu":
            assert torch.equal(out[k].to_dense(), v.to_dense())


@pytest.mark.parametrize("kind", ["quantized", "nested"])
def test_quantized_and_nested_on_meta_fail_as_torch_does(tmp_path, kind):
    value = (torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8) if kind == "quantized"
             else torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]))
    p = save(tmp_path / "a.safetensors", {"v": value})
    with pytest.raises(NotImplementedError, match="meta device"):
        torch.load(p, map_location="meta")
    assert torch.load(p, map_location=LOCATIONS["callable"])["v"].device.type == "cpu"


# ---- module versions (OrderedDict._metadata) ----


def _quantized_model():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    return torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)


def test_state_dict_keeps_module_versions_and_loads_into_a_quantized_model(tmp_path):
    q = _quantized_model()
    sd = q.state_dict()
    back = torch.load(save(tmp_path / "sd.safetensors", sd))
    assert type(back) is collections.OrderedDict and back._metadata == sd._metadata
    fresh = _quantized_model()
    fresh.load_state_dict(back)  # without the versions: KeyError '0.weight'
    x = torch.randn(3, 4)
    assert torch.equal(fresh(x), q(x))
    ck = torch.load(save(tmp_path / "ck.safetensors", {"model": sd, "step": 3}))
    assert ck["model"]._metadata == sd._metadata
    _quantized_model().load_state_dict(ck["model"])
    assert _cli.main(["verify", str(tmp_path / "ck.safetensors")]) == 0


def _modules():
    found = set()
    for root in ("torch.nn", "torch.ao.nn"):
        pkg = importlib.import_module(root)
        for info in pkgutil.walk_packages(pkg.__path__, root + "."):
            try:
                mod = importlib.import_module(info.name)
            except Exception:  # noqa: BLE001 - optional backends
                continue
            for obj in vars(mod).values():
                if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__.startswith("torch."):
                    found.add(obj)
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _loaded(cls, args, sd, keep):
    d = collections.OrderedDict(sd)
    if keep:
        d._metadata = sd._metadata
    fresh = cls(*args)
    try:
        fresh.load_state_dict(d)
    except Exception as e:  # noqa: BLE001 - the difference is the finding
        return f"{type(e).__name__}"
    return [(k, v.dequantize() if isinstance(v, torch.Tensor) and v.is_quantized else v)
            for k, v in fresh.state_dict().items()]


def _equal(x, y):
    try:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
        return bool(x == y)
    except Exception:  # noqa: BLE001 - packed RNN cells have no ==, lazy parameters no shape
        return type(x) is type(y)


def _same(a, b):
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return [k for k, _ in a] == [k for k, _ in b] and all(_equal(x, y) for (_, x), (_, y) in zip(a, b))


def test_which_modules_need_their_version_and_that_none_has_a_plain_state_dict():
    """Investigation (issue 22): every torch.nn / torch.ao module that records a version,
    loaded with and without it. Those whose loading changes hold values a flat dict of
    plain tensors cannot (quantized tensors, packed parameters, dtypes): their state dicts
    always go with a structure, which keeps the versions, so plain state dicts stay
    byte-identical to the safetensors package's without losing anything."""
    affected, plain_versioned = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cls in _modules():
            for args in [(), (4,), (4, 4), (4, 4, 3)]:
                try:
                    module = cls(*args)
                    sd = module.state_dict()
                    break
                except Exception:  # noqa: BLE001 - not every constructor takes these
                    continue
            else:
                continue
            versions = {v.get("version") for v in getattr(sd, "_metadata", {}).values()}
            if not any(v not in (None, 1) for v in versions):
                continue
            plain = all(isinstance(v, torch.Tensor) and not v.is_quantized and v.layout is torch.strided
                        for v in sd.values())
            if not _same(_loaded(cls, args, sd, True), _loaded(cls, args, sd, False)):
                affected.append(cls.__qualname__)
                if plain:
                    plain_versioned.append(cls.__qualname__)
    assert "Linear" in affected  # torch.ao.nn.quantized(.dynamic).Linear: KeyError without the version
    assert plain_versioned == []


# ---- checksums of views with conjugate or negative bits ----


@pytest.mark.parametrize("view", ["conj", "neg", "conj_neg", "conj128"])
def test_checksums_cover_the_values_stored(tmp_path, capsys, view):
    x = torch.randn(4, dtype=torch.complex64)
    value = {"conj": x.conj(), "neg": torch._neg_view(torch.randn(3)), "conj_neg": torch._neg_view(x.conj()),
             "conj128": torch.randn(2, dtype=torch.complex128).conj()}[view]
    p = save(tmp_path / "a.safetensors", {"v": value, "w": torch.ones(2)}, checksums=True)
    assert _cli.main(["verify", "--data", str(p)]) == 0, capsys.readouterr().out
    assert torch.equal(torch.load(p)["v"], value.resolve_conj().resolve_neg())


def test_a_plain_state_dict_stays_byte_identical_to_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).state_dict()
    assert sd._metadata["1"]["version"] == 2
    ours = save(tmp_path / "ours.safetensors", sd)
    save_file(dict(sd), str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).load_state_dict(torch.load(ours))
