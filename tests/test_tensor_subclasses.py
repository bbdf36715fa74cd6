"""Tensor subclasses in safetensors checkpoints (issue 20), without torchao.

Traceable subclasses (``__tensor_flatten__`` / ``__tensor_unflatten__``) are stored as
their inner tensors plus one structure node and rebuilt only when the class is allowed;
everything else tensor-like either saves by value by a documented rule or is refused with
a TypeError naming the path before a byte is written, never a RecursionError or a crash.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from torch.utils._pytree import tree_map

import torch_safetensors as ts
from torch_safetensors import _checkpoint, _default

STRUCTURE = _checkpoint.STRUCTURE_KEY


# ---- a minimal traceable subclass: int8 codes and one scale per row ----


class RowScaled(torch.Tensor):
    """codes (int8, [rows, cols]) x scale (float32, [rows, 1]); outer dtype from ctx."""

    @staticmethod
    def __new__(cls, codes, scale, block=(1, 1), dtype=torch.float32):
        r = torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype, device=codes.device)
        r.codes, r.scale, r.block, r.out_dtype = codes, scale, tuple(block), dtype
        return r

    def __tensor_flatten__(self):
        return ["codes", "scale"], {"block": self.block, "dtype": self.out_dtype}

    @classmethod
    def __tensor_unflatten__(cls, inner, ctx, outer_size, outer_stride):
        return cls(inner["codes"], inner["scale"], ctx["block"], ctx["dtype"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default, torch.ops.aten.clone.default):
            s = args[0]
            return cls(func(s.codes), func(s.scale), s.block, s.out_dtype)
        if func is torch.ops.aten.copy_.default:
            dst, src = args
            dst.codes.copy_(src.codes)
            dst.scale.copy_(src.scale)
            return dst
        raise NotImplementedError(f"RowScaled: {func}")

    def dequantize(self):
        return (self.codes.to(self.out_dtype) * self.scale).to(self.out_dtype)


def row_scaled(rows=4, cols=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, generator=g)
    scale = torch.rand(rows, 1, generator=g) + 0.5
    return RowScaled(codes, scale, (1, cols), dtype)


def same_row_scaled(a, b):
    assert type(a) is RowScaled and type(b) is RowScaled
    assert a.shape == b.shape and a.dtype == b.dtype and a.block == b.block and a.out_dtype == b.out_dtype
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert a.codes.dtype == torch.int8 and a.scale.dtype == torch.float32


@pytest.fixture
def allowed():
    with torch.serialization.safe_globals([RowScaled]):
        yield


def _structure(path):
    with ts.safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()[STRUCTURE]), sorted(f.keys())


# ---- §1/§2: traceable subclasses are data, rebuilt only when allowed ----


def test_inner_tensors_are_plain_named_tensors_and_the_context_is_json(tmp_path):
    p = tmp_path / "s.safetensors"
    w = row_scaled()
    torch.save({"w": w, "b": torch.ones(4)}, p, format="safetensors")
    doc, keys = _structure(p)
    assert keys == ["b", "w.codes", "w.scale"]
    node = doc["root"]["d"]["w"]
    assert node["tk"] == "tsub" and node["cls"] == f"{__name__}:RowScaled"
    assert node["size"] == [4, 6] and node["stride"] == [6, 1] and node["dtype"] == "float32"
    assert node["ctx"] == {"d": {"block": {"tu": [1, 6]}, "dtype": {"dtype": "float32"}}}
    # every safetensors reader sees the inner tensors, as plain tensors
    with ts.safe_open(str(p), "pt") as f:
        assert torch.equal(f.get_tensor("w.codes"), w.codes)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    plain = safetensors_torch.load_file(str(p))
    assert torch.equal(plain["w.scale"], w.scale) and plain["w.codes"].dtype == torch.int8


def test_rebuilt_when_allowed(tmp_path, allowed):
    p = tmp_path / "s.safetensors"
    w = row_scaled(dtype=torch.bfloat16)
    torch.save({"w": w}, p, format="safetensors")
    got = torch.load(p)["w"]
    same_row_scaled(got, w)
    assert got.block == (1, 6)  # a tuple stays a tuple
    assert torch.equal(got.dequantize(), w.dequantize())


def test_weights_only_false_rebuilds_without_the_allowlist(tmp_path):
    p = tmp_path / "s.safetensors"
    torch.save({"w": row_scaled()}, p, format="safetensors")
    same_row_scaled(torch.load(p, weights_only=False)["w"], row_scaled())


def test_not_allowed_names_the_class(tmp_path):
    p = tmp_path / "s.safetensors"
    torch.save({"w": row_scaled()}, p, format="safetensors")
    with pytest.raises(ts.SafetensorError) as info:
        torch.load(p)
    assert info.value.code == "not_allowed"
    assert f"{__name__}.RowScaled" in str(info.value) and "add_safe_globals" in str(info.value)


def test_not_allowed_imports_nothing(tmp_path):
    p = tmp_path / "s.safetensors"
    torch.save({"w": row_scaled()}, p, format="safetensors")
    data = bytearray(p.read_bytes())
    old = f'\\"{__name__}:RowScaled\\"'.encode()  # inside the metadata's JSON string
    new = b'\\"tsub_never_imported_mod:Evil\\"'
    assert data.count(old) == 1 and len(new) <= len(old)
    # JSON allows spaces after a string: the header keeps its length
    q = tmp_path / "evil.safetensors"
    q.write_bytes(bytes(data).replace(old, new.ljust(len(old))))
    with pytest.raises(ts.SafetensorError) as info:
        torch.load(q)
    assert info.value.code == "not_allowed" and "tsub_never_imported_mod.Evil" in str(info.value)
    assert "tsub_never_imported_mod" not in sys.modules


def test_outer_size_stride_and_flags(tmp_path, allowed):
    p = tmp_path / "s.safetensors"
    w = torch.nn.Parameter(row_scaled(), requires_grad=False)
    assert isinstance(w, torch.nn.Parameter) and type(w) is RowScaled
    torch.save({"w": w, "bare": row_scaled(seed=1)}, p, format="safetensors")
    doc, _ = _structure(p)
    assert doc["root"]["d"]["w"].get("param") == 1 and "param" not in doc["root"]["d"]["bare"]
    got = torch.load(p)
    assert isinstance(got["w"], torch.nn.Parameter) and type(got["w"]) is RowScaled
    assert not isinstance(got["bare"], torch.nn.Parameter)
    same_row_scaled(got["bare"], row_scaled(seed=1))


def test_a_bare_subclass_and_nesting_in_containers(tmp_path, allowed):
    p = tmp_path / "s.safetensors"
    w = row_scaled()
    torch.save(w, p, format="safetensors")
    same_row_scaled(torch.load(p), w)
    ck = {"opt": [{"state": (w, 3)}], "step": 7}
    torch.save(ck, p, format="safetensors")
    got = torch.load(p)
    same_row_scaled(got["opt"][0]["state"][0], w)
    assert got["opt"][0]["state"][1] == 3 and got["step"] == 7


# ---- §3: ties and shared inner tensors ----


def test_a_tied_subclass_is_stored_once_and_loads_as_one_object(tmp_path, allowed):
    p = tmp_path / "s.safetensors"
    w = row_scaled()
    torch.save({"embed.weight": w, "lm_head.weight": w, "x": torch.ones(2)}, p, format="safetensors")
    doc, keys = _structure(p)
    assert keys == ["embed.weight.codes", "embed.weight.scale", "x"]
    assert doc["root"]["d"]["lm_head.weight"] == {"tk": "tsub", "name": "embed.weight", "same": 1}
    got = torch.load(p)
    assert got["embed.weight"] is got["lm_head.weight"]
    same_row_scaled(got["lm_head.weight"], w)


def test_tied_model_state_dict_round_trip(tmp_path, allowed):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Parameter(row_scaled(), requires_grad=False)
            self.head = self.embed

    m = Tied()
    sd = m.state_dict(keep_vars=True)
    p = tmp_path / "tied.safetensors"
    torch.save(sd, p, format="safetensors")
    assert _structure(p)[1] == ["embed.codes", "embed.scale"]
    got = torch.load(p)
    assert got["embed"] is got["head"] and isinstance(got["head"], torch.nn.Parameter)
    fresh = Tied()
    fresh.embed.codes.zero_()
    fresh.load_state_dict(got)
    same_row_scaled(fresh.head, m.embed)


def test_inner_tensors_sharing_memory_are_stored_once(tmp_path, allowed):
    p = tmp_path / "s.safetensors"
    scale = torch.rand(4, 1)
    codes = torch.randint(-128, 128, (4, 6), dtype=torch.int8)
    a = RowScaled(codes, scale, (1, 6))
    b = RowScaled(codes[:, :], scale, (1, 6))  # another view object over the same memory
    c = RowScaled(torch.randint(-128, 128, (4, 6), dtype=torch.int8), scale, (1, 6))
    torch.save({"a": a, "b": b, "c": c}, p, format="safetensors")
    _, keys = _structure(p)
    assert keys == ["a.codes", "a.scale", "c.codes"]
    got = torch.load(p)
    assert got["a"] is not got["b"]
    assert got["a"].scale.data_ptr() == got["b"].scale.data_ptr() == got["c"].scale.data_ptr()
    assert got["a"].codes.data_ptr() == got["b"].codes.data_ptr()
    for k, v in (("a", a), ("b", b), ("c", c)):
        same_row_scaled(got[k], v)


# ---- the paths every checkpoint takes ----


def test_map_location(tmp_path, allowed):
    p = tmp_path / "s.safetensors"
    w = row_scaled()
    torch.save({"w": w}, p, format="safetensors")
    meta = torch.load(p, map_location="meta")["w"]
    assert type(meta) is RowScaled and meta.codes.device.type == "meta" and meta.shape == (4, 6)
    for loc in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, where: storage):
        same_row_scaled(torch.load(p, map_location=loc)["w"], w)
    same_row_scaled(torch.load(p, mmap=False)["w"], w)


def test_a_meta_subclass_saves_and_loads(tmp_path, allowed):
    p = tmp_path / "s.safetensors"
    w = RowScaled(torch.empty(3, 5, dtype=torch.int8, device="meta"), torch.empty(3, 1, device="meta"), (1, 5))
    torch.save({"w": w}, p, format="safetensors")
    got = torch.load(p)["w"]
    assert type(got) is RowScaled and got.codes.device.type == "meta" and got.codes.shape == (3, 5)


def test_async_save_writes_the_same_bytes(tmp_path, allowed):
    ck = {"w": row_scaled(), "tied": None, "n": 1}
    ck["tied"] = ck["w"]
    torch.save(ck, tmp_path / "sync.safetensors", format="safetensors")
    ts.async_save(ck, tmp_path / "async.safetensors").result()
    assert (tmp_path / "async.safetensors").read_bytes() == (tmp_path / "sync.safetensors").read_bytes()
    got = torch.load(tmp_path / "async.safetensors")
    assert got["w"] is got["tied"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "torch_safetensors", *args], capture_output=True, text=True,
                          timeout=300)


def test_verify_and_checksums_need_no_allowlist(tmp_path):
    p = tmp_path / "s.safetensors"
    w = row_scaled()
    torch.save({"w": w, "t": w, "b": torch.ones(3)}, p, format="safetensors", checksums=True)
    out = _cli("verify", str(p))
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout + out.stderr
    out = _cli("verify", "--data", str(p))
    assert out.returncode == 0 and "data matches 3 recorded checksums" in out.stdout, out.stdout + out.stderr
    # a flipped byte in an inner tensor is caught by the checksums
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    out = _cli("verify", "--data", str(p))
    assert out.returncode != 0 and "INVALID" in out.stdout


def test_streams(tmp_path, allowed):
    w = row_scaled()
    ck = {"w": w, "again": w}
    buf = io.BytesIO()
    torch.save(ck, buf, format="safetensors")
    data = buf.getvalue()
    torch.save(ck, tmp_path / "s.safetensors", format="safetensors")
    assert data == (tmp_path / "s.safetensors").read_bytes()
    got = torch.load(io.BytesIO(data))
    same_row_scaled(got["w"], w)
    assert got["w"] is got["again"]
    r, wfd = os.pipe()

    def feed():
        with os.fdopen(wfd, "wb") as out:
            out.write(data)

    th = threading.Thread(target=feed)
    th.start()
    with os.fdopen(r, "rb") as pipe:
        got = torch.load(pipe)
    th.join()
    same_row_scaled(got["w"], w)
    assert got["w"] is got["again"]


# ---- hostile structures: refused as SafetensorError, nothing rebuilt ----


def _with_node(tmp_path, edit):
    p = tmp_path / "s.safetensors"
    torch.save({"w": row_scaled()}, p, format="safetensors")
    with ts.safe_open(str(p), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    doc = json.loads(meta[STRUCTURE])
    edit(doc["root"]["d"])
    meta[STRUCTURE] = json.dumps(doc)
    q = tmp_path / "edited.safetensors"
    ts.save_file(tensors, q, metadata=meta)
    return q


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d.update(x={"tk": "tsub", "name": "nowhere", "same": 1}), "not built before it"),
    (lambda d: d.update(x=dict(d["w"], param=1)), "two tensor subclass nodes"),  # an equal node is the same one
    (lambda d: d["w"].update(size=[4, 7]), "did not give back"),
    (lambda d: d["w"].update(dtype="int8"), "did not give back"),
    (lambda d: d["w"].update(stride=[1]), "differ in length"),
    (lambda d: d["w"].update(size="big"), "not a list of sizes"),
    (lambda d: d["w"].pop("ctx"), "lacks ['ctx']"),
    (lambda d: d["w"].update(inner=[1]), "not a JSON object of tensors"),
    (lambda d: d["w"]["inner"].pop("scale"), "rebuilding"),
    (lambda d: d["w"]["inner"].update(codes={"t": "w.nothing"}), "does not hold"),
    (lambda d: d["w"].update(param=2), "not 1"),
    (lambda d: d["w"].update(cls=f"{__name__}:same_row_scaled"), "is not a tensor subclass"),
    (lambda d: d["w"].update(evil=1), "unexpected fields"),
])
def test_hostile_nodes_are_refused(tmp_path, edit, fragment):
    q = _with_node(tmp_path, edit)
    with torch.serialization.safe_globals([RowScaled, same_row_scaled]):
        with pytest.raises(ts.SafetensorError) as info:
            torch.load(q)
    assert fragment in str(info.value), str(info.value)


# ---- §4: nothing tensor-like crashes ----


class DispatchOnly(torch.Tensor):
    """A wrapper subclass without the flatten protocol: its data is an attribute."""

    @staticmethod
    def __new__(cls, elem):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype)
        r.elem = elem
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda x: x.elem if isinstance(x, DispatchOnly) else x  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        return tree_map(lambda x: DispatchOnly(x) if isinstance(x, torch.Tensor) else x, out)


class RaisingFunction(torch.Tensor):
    """A __torch_function__ subclass whose every override fails."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("RaisingFunction: no")


class RecursingFunction(torch.Tensor):
    """A __torch_function__ subclass that calls itself without end (a classic mistake)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class SelfFlatten(RowScaled):
    """Names itself as its own inner tensor."""

    def __tensor_flatten__(self):
        self.me = self
        return ["me"], None


class EndlessFlatten(RowScaled):
    """Each flatten makes a new inner wrapper of its own kind."""

    def __tensor_flatten__(self):
        self.deeper = EndlessFlatten(self.codes, self.scale)
        return ["deeper"], None


class BrokenFlatten(RowScaled):
    def __tensor_flatten__(self):
        raise KeyError("broken")


class NotTensorInner(RowScaled):
    def __tensor_flatten__(self):
        return ["block"], None


def _refused(target, value, fragments, exc=TypeError):
    before = os.listdir(os.path.dirname(target))
    with pytest.raises(exc) as info:
        torch.save({"model": {"w": 1, "x": value}}, target, format="safetensors")
    for frag in fragments:
        assert frag in str(info.value), str(info.value)
    assert os.listdir(os.path.dirname(target)) == before  # not a byte: no file, no temp file
    return info.value


def test_functional_and_func_transform_tensors_are_refused(tmp_path):
    target = str(tmp_path / "f.safetensors")
    _refused(target, torch._to_functional_tensor(torch.ones(3)), ["model.x:", "functionalized tensor"])

    def in_grad(x):
        _refused(target, x, ["model.x:", "torch.func wrapper"])
        return x.sum()

    torch.func.grad(in_grad)(torch.ones(3))

    def in_vmap(x):
        _refused(target, x, ["model.x:", "torch.func wrapper"])
        return x

    torch.vmap(in_vmap)(torch.ones(2, 3))
    # the flat fast path (a plain dict of tensors) checks too
    with pytest.raises(TypeError, match="functionalized"):
        torch.save({"x": torch._to_functional_tensor(torch.ones(3))}, target, format="safetensors")
    with pytest.raises(TypeError, match="functionalized"):
        ts.async_save({"x": torch._to_functional_tensor(torch.ones(3))}, target)
    assert not os.path.exists(target)


def test_fake_tensors_are_refused(tmp_path):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.ones(3)
    _refused(str(tmp_path / "f.safetensors"), fake, ["model.x:", "FakeTensor", "outside tracing"])


def test_a_dispatch_subclass_without_the_protocol_is_refused(tmp_path):
    _refused(str(tmp_path / "f.safetensors"), DispatchOnly(torch.ones(3)),
             ["model.x:", "DispatchOnly", "__tensor_flatten__"])


@pytest.mark.parametrize("cls", [SelfFlatten, EndlessFlatten, BrokenFlatten, NotTensorInner])
def test_a_broken_protocol_is_refused_not_a_crash(tmp_path, cls):
    w = cls(torch.zeros(2, 2, dtype=torch.int8), torch.ones(2, 1), (1, 2))
    exc = ValueError if cls in (SelfFlatten, EndlessFlatten) else TypeError
    err = _refused(str(tmp_path / "f.safetensors"), w, ["model.x"], exc)
    assert not isinstance(err, RecursionError)


@pytest.mark.parametrize("cls", [RaisingFunction, RecursingFunction])
def test_torch_function_subclasses_save_their_storage_without_running_overrides(tmp_path, cls):
    p = tmp_path / "tf.safetensors"
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    t = base.as_subclass(cls)
    t.note = "kept"
    torch.save({"t": t}, p, format="safetensors")
    with ts.safe_open(str(p), "pt") as f:
        assert torch.equal(f.get_tensor("t"), base)
    with torch.serialization.safe_globals([cls]):
        got = torch.load(p)["t"]
    assert type(got) is cls and got.__dict__ == {"note": "kept"}
    with torch._C.DisableTorchFunctionSubclass():
        assert torch.equal(got.as_subclass(torch.Tensor), base)


def test_a_refused_subclass_falls_back_to_pickle_when_asked(tmp_path):
    saved = (_default._format, _default._fallback)
    try:
        ts.set_default_format("safetensors", fallback="pickle")
        with pytest.warns(ts.PickleFallbackWarning, match="x: tensor subclass .*DispatchOnly"):
            torch.save({"x": DispatchOnly(torch.arange(3.0))}, tmp_path / "fb.pt")
        assert (tmp_path / "fb.pt").read_bytes()[:2] == b"PK"
        got = torch.load(tmp_path / "fb.pt", weights_only=False)["x"]
        assert type(got) is DispatchOnly and torch.equal(got.elem, torch.arange(3.0))
    finally:
        _default._format, _default._fallback = saved


@pytest.mark.parametrize("make", [lambda: torch._to_functional_tensor(torch.ones(3)), lambda: row_scaled(),
                                  lambda: DispatchOnly(torch.ones(3))])
def test_the_flat_api_refuses_tensors_without_data(tmp_path, make):
    """save_file / save hold plain tensors only: one without storage of its own is a
    TypeError naming it (was a segfault in the writer), and nothing is written."""
    target = tmp_path / "flat.safetensors"
    with pytest.raises(TypeError, match="'y'"):
        ts.save_file({"x": torch.ones(2), "y": make()}, target)
    with pytest.raises(TypeError, match="'y'"):
        ts.save({"x": torch.ones(2), "y": make()})
    assert os.listdir(tmp_path) == []


def test_inspect_shows_the_subclass_and_its_inner_tensors(tmp_path):
    p = tmp_path / "s.safetensors"
    w = row_scaled()
    torch.save({"a": w, "b": w}, p, format="safetensors")
    out = _cli("inspect", str(p))
    assert out.returncode == 0, out.stderr
    lines = [line.strip() for line in out.stdout.splitlines()]
    assert f"a: tensor subclass {__name__}.RowScaled float32 [4, 6]" in lines
    assert "codes: tensor I8 [4, 6]  (a.codes)" in lines
    assert "b: tensor subclass, the same object as a" in lines


# ---- the documentation's examples run as printed ----

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "tensor-subclasses.md")


def _doc_blocks():
    import re

    with open(DOC, encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```$", f.read(), flags=re.S | re.M)


def _torchao_importable():
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


@pytest.mark.parametrize("index", range(len(_doc_blocks())))
def test_doc_examples_run_as_printed(tmp_path, index):
    code = _doc_blocks()[index]
    if "torchao" in code and not _torchao_importable():
        pytest.skip("the example needs torchao, which is not installed (pip install --no-deps torchao)")
    env = dict(os.environ)
    env.pop("TORCH_SAFETENSORS_FORMAT", None)
    env.pop("TORCH_SAFETENSORS_FALLBACK", None)
    script = tmp_path / "example.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), "every example prints what it shows"


# ---- the schema of the tsub row in the structure validator (verify, and every load first) ----


def _held(path):
    """The file's tensors as validate() takes them: (safetensors dtype name, shape, bytes)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return {k: (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


def _validate(doc, held):
    return _checkpoint.validate(json.dumps(doc), held)


def test_the_validator_knows_the_tsub_row_resolves_nothing_and_refuses_bad_nodes(tmp_path):
    p = tmp_path / "s.safetensors"
    w = row_scaled()
    torch.save({"a": w, "b": w}, p, format="safetensors")
    doc, _keys = _structure(p)
    held = _held(p)
    assert _validate(doc, held)["classes"] == [f"{__name__}.RowScaled"]
    a = doc["root"]["d"]["a"]
    assert doc["root"]["d"]["b"] == {"tk": "tsub", "name": "a", "same": 1}
    # a class that no process can import is reported, not resolved: the file is valid
    ghost = json.loads(json.dumps(doc))
    ghost["root"]["d"]["a"]["cls"] = "no_such_module_xyz.deep:Ghost"
    assert _validate(ghost, held)["classes"] == ["no_such_module_xyz.deep.Ghost"]
    for bad, fragment in [
        (dict(a, cls="os:system()"), "not 'module:qualname'"),
        (dict(a, inner={"codes": {"t": "missing"}}), "does not hold"),
        (dict(a, inner={"codes": [1]}), "not a tensor"),
        (dict(a, inner=[{"t": "a.codes"}]), "not a JSON object of tensors"),
        (dict(a, stride=[1]), "differ in length"),
        (dict(a, size=[-1, 6]), "not a list of sizes"),
        (dict(a, dtype="int4x"), "dtype"),
        (dict(a, grad=True), "flag 'grad' is not 1"),
        (dict(a, dtype="int32", grad=1), "cannot require grad"),
        (dict(a, extra=1), "unexpected fields"),
        ({k: v for k, v in a.items() if k != "ctx"}, r"lacks \['ctx'\]"),
        ({"tk": "tsub", "name": "a", "same": 1, "cls": "x:y"}, "a tie has other fields"),
    ]:
        broken = json.loads(json.dumps(doc))
        broken["root"]["d"]["a"] = bad
        with pytest.raises(ts.SafetensorError, match=fragment):
            _validate(broken, held)
    # a tie before its node, and two nodes of one name
    broken = json.loads(json.dumps(doc))
    broken["root"]["d"] = {"b": {"tk": "tsub", "name": "a", "same": 1}, "a": a}
    with pytest.raises(ts.SafetensorError, match="not built before it"):
        _validate(broken, held)
    broken["root"]["d"] = {"a": a, "b": dict(a, size=[4, 6, 1], stride=[6, 1, 1])}
    with pytest.raises(ts.SafetensorError, match="two tensor subclass nodes"):
        _validate(broken, held)


def test_verify_says_ok_and_loading_refuses_a_class_it_cannot_resolve(tmp_path):
    """The validator passes a file naming a class nobody can import; loading (which runs the
    same validator first) refuses it with not_allowed, naming the class, importing nothing."""
    p = tmp_path / "s.safetensors"
    torch.save({"w": row_scaled()}, p, format="safetensors")
    doc, _keys = _structure(p)
    doc["root"]["d"]["w"]["cls"] = "no_such_module_xyz:Ghost"
    tensors = ts.load_file(str(p))
    with ts.safe_open(str(p), "pt") as f:
        meta = dict(f.metadata())
    meta[STRUCTURE] = json.dumps(doc)
    q = tmp_path / "ghost.safetensors"
    ts.save_file(tensors, str(q), metadata=meta)
    out = _cli("verify", str(q))
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout + out.stderr
    assert "no_such_module_xyz" not in sys.modules
    with pytest.raises(ts.SafetensorError) as e:
        torch.load(q)
    assert e.value.code == "not_allowed" and "no_such_module_xyz" in str(e.value)
    assert "no_such_module_xyz" not in sys.modules


def test_a_jagged_nested_tensor_stays_a_nested_row_not_a_subclass_node(tmp_path):
    """torch's jagged NestedTensor implements the flatten protocol too, but its sizes are
    symbolic: it is stored as its parts, as a strided nested tensor is."""
    p = tmp_path / "n.safetensors"
    nt = torch.nested.nested_tensor([torch.arange(3.0), torch.arange(5.0)], layout=torch.jagged)
    torch.save({"n": nt}, p, format="safetensors")
    assert _structure(p)[0]["root"]["d"]["n"]["tk"] == "nested"
    got = torch.load(p)["n"]
    assert got.layout is torch.jagged and [x.tolist() for x in got.unbind()] == [[0, 1, 2], [0, 1, 2, 3, 4]]


def test_flat_and_sharded_files_refuse_a_subclass_pointing_at_torch_save(tmp_path):
    with pytest.raises(TypeError, match=r"w: tensor subclass .*RowScaled .*torch.save\(obj, f, format='safetensors'\)"):
        ts.save_sharded({"w": row_scaled(), "b": torch.ones(2)}, tmp_path / "shards")
