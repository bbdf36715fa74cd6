"""The C reader of legacy torch checkpoints (csrc/st_pickle.c + torch_safetensors/_legacy.py).

Every result is compared with plain ``torch.load(weights_only=True)`` on the same file:
types and key order, OrderedDict ``_metadata``, dtypes, shapes, strides, storage offsets,
which tensors share a storage, requires_grad and Parameter-ness, and the bytes."""
import collections
import io
import os
import pickle
import random
import struct
import warnings
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_safetensors  # noqa: F401 - installs the wrappers
from torch_safetensors import _C, _legacy, _torch

ORIG = _torch._orig_load


def plain(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ORIG(path, weights_only=True, **kw)


# ---- deep comparison ----


def assert_same(a, b, path="obj", pairs=None):
    """a and b are equal in every respect torch.load's result has, including which
    tensors share storages (pairs maps storage pointers of a to those of b)."""
    pairs = {} if pairs is None else pairs
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, path
        assert a.shape == b.shape and a.stride() == b.stride(), path
        assert a.storage_offset() == b.storage_offset(), path
        assert a.requires_grad == b.requires_grad, path
        assert a.device == b.device, path
        assert type(a._backward_hooks) is type(b._backward_hooks), path
        sa, sb = a.untyped_storage(), b.untyped_storage()
        assert sa.nbytes() == sb.nbytes(), path
        if a.device.type != "meta":
            assert bytes(sa) == bytes(sb), path
        if sa.nbytes():
            assert pairs.setdefault(("a", sa.data_ptr()), sb.data_ptr()) == sb.data_ptr(), path
            assert pairs.setdefault(("b", sb.data_ptr()), sa.data_ptr()) == sa.data_ptr(), path
        return
    if isinstance(a, dict):
        assert list(a) == list(b), path
        if isinstance(a, collections.OrderedDict):
            assert list(vars(a)) == list(vars(b)), path
            for k in vars(a):
                assert_same(vars(a)[k], vars(b)[k], f"{path}.{k}", pairs)
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]", pairs)
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", pairs)
        return
    if isinstance(a, float) and a != a:
        assert b != b, path
        return
    assert a == b, (path, a, b)


def check(path, *, expect_reader=True, **kw):
    want = plain(path, **kw)
    got = torch.load(path, **kw)
    if expect_reader:
        assert _legacy.last_fallback is None, _legacy.last_fallback
    assert_same(want, got)
    return got


# ---- fixed checkpoints ----


def _model_and_optimizer():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    return m, opt


def _cases():
    m, opt = _model_and_optimizer()
    x = torch.arange(24.0).view(4, 6)
    return {
        "state_dict": m.state_dict(),
        "optimizer": opt.state_dict(),
        "training": {"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                     "loss": 0.25, "names": ["a", "b"], "none": None, "flag": True},
        "views": {"x": x, "t": x.t(), "slice": x[1:, 2:4], "empty": x[:0], "scalar": x[1, 1],
                  "step": x.view(-1)[::5], "again": x},
        "params": {"p": torch.nn.Parameter(torch.ones(2)),
                   "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
                   "int": torch.nn.Parameter(torch.ones(2, dtype=torch.int64), requires_grad=False)},
        "requires_grad": {"g": torch.ones(3, requires_grad=True), "h": torch.ones(3)},
        "values": {"size": torch.Size([2, 3]), "dtype": torch.bfloat16, "cpu": torch.device("cpu"),
                   "cuda1": torch.device("cuda", 1), "big": 2**100, "neg": -(2**70), "i64": -(2**63),
                   "bytes": b"\x00\xff", "text": "h\u00e9\U0001f600", 1: 2, 2.5: "f", None: 0,
                   "nan": float("nan"), "inf": float("-inf"), "tuple": (1, (2, [3])), "empty": {}},
        "bare_tensor": torch.arange(5),
        "list": [torch.zeros(2), [torch.ones(1)], (1, 2)],
        "empty_dict": {},
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mmap", [False, True, None])
def test_same_as_torch(tmp_path, name, mmap):
    path = tmp_path / "ckpt.pt"
    torch.save(CASES[name], path)
    check(path, mmap=mmap)


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
          torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
          torch.float4_e2m1fn_x2, torch.complex32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mmap", [False, True])
def test_every_dtype(tmp_path, dtype, mmap):
    raw = torch.arange(64, dtype=torch.uint8)
    t = raw.view(dtype).view(2, -1)
    path = tmp_path / "d.pt"
    torch.save({"t": t, "view": t[:, 1:], "first": t[0]}, path)
    check(path, mmap=mmap)


def test_metadata_attribute(tmp_path):
    sd = torch.nn.Linear(2, 2).state_dict()
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    got = check(path)
    assert type(got) is collections.OrderedDict
    assert got._metadata == sd._metadata


def test_shared_storages_stay_shared(tmp_path):
    base = torch.arange(10.0)
    path = tmp_path / "s.pt"
    torch.save({"a": base, "b": base[2:5], "c": base.view(2, 5)}, path)
    got = check(path)
    got["b"][0] = 100.0
    assert got["a"][2] == 100.0 and got["c"][0, 2] == 100.0


# ---- map_location ----


@pytest.mark.parametrize("map_location", [None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, {},
                                          {"cuda:0": "cpu"}])
def test_map_location_cpu_forms_use_the_reader(tmp_path, map_location):
    path = tmp_path / "ml.pt"
    torch.save(CASES["training"], path)
    check(path, map_location=map_location)


@pytest.mark.parametrize("map_location", ["meta", torch.device("meta"), {"cpu": "meta"},
                                          lambda s, loc: s, lambda s, loc: None, b"cpu"])
def test_map_location_other_forms_go_to_torch(tmp_path, map_location):
    path = tmp_path / "ml.pt"
    torch.save(CASES["views"], path)
    try:
        want = plain(path, map_location=map_location)
    except Exception as e:  # noqa: BLE001 - whatever torch raises, we raise
        with pytest.raises(type(e)):
            torch.load(path, map_location=map_location)
        return
    got = torch.load(path, map_location=map_location)
    assert _legacy.last_fallback is not None
    assert_same(want, got)


def test_cuda_storage_goes_to_torch(tmp_path):
    path = tmp_path / "cuda.pt"
    torch.save({"w": torch.ones(2)}, path)
    # retag the storage as CUDA: only torch knows how (and here, that it cannot)
    pkl_name, members = _members(path)
    members[pkl_name] = members[pkl_name].replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    bad = tmp_path / "cuda2.pt"
    _write_zip(bad, members)
    with pytest.raises(RuntimeError) as want:
        plain(bad)
    with pytest.raises(RuntimeError) as got:
        torch.load(bad)
    assert str(got.value) == str(want.value)
    assert "another device" in _legacy.last_fallback
    got_cpu = torch.load(bad, map_location="cpu")
    assert _legacy.last_fallback is None
    assert torch.equal(got_cpu["w"], torch.ones(2))


# ---- mapping only when asked ----


def _maps_file(path):
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(real) for line in f)


def test_mmap_false_reads_into_memory(tmp_path):
    path = tmp_path / "r.pt"
    torch.save({"w": torch.arange(100000.0)}, path)
    got = torch.load(path, mmap=False)
    assert _legacy.last_fallback is None
    assert not _maps_file(path)
    # torch.save rewrites in place: the loaded tensor keeps its values
    torch.save({"w": torch.zeros(100000)}, path)
    assert torch.equal(got["w"], torch.arange(100000.0))


def test_mmap_true_maps_zero_copy(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(100000.0), "v": torch.arange(10, dtype=torch.int64)}, path)
    live = _C.live_mappings()
    got = torch.load(path, mmap=True)
    assert _legacy.last_fallback is None
    assert _C.live_mappings() == live + 1
    assert _maps_file(path)
    # private: writes stay in this process
    got["w"][0] = -1.0
    assert plain(path)["w"][0] == 0.0
    del got
    assert _C.live_mappings() == live


# ---- every storage record is checked ----


def _members(path):
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    return next(n for n in members if n.endswith("/data.pkl")), members


def _write_zip(path, members, compress=()):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED)


def test_short_record_refused_in_both_modes(tmp_path):
    path = tmp_path / "g.pt"
    torch.save({"w": torch.arange(100.0)}, path)
    pkl, members = _members(path)
    rec = pkl[: -len("data.pkl")] + "data/0"
    members[rec] = members[rec][:100]
    bad = tmp_path / "short.pt"
    _write_zip(bad, members)
    with pytest.raises(RuntimeError, match="record size 100 .* shorter than the 400 bytes"):
        torch.load(bad, mmap=True)
    with pytest.raises(RuntimeError, match="record size"):
        torch.load(bad, mmap=False)


def test_long_record_mmap_matches_torch(tmp_path):
    path = tmp_path / "g.pt"
    torch.save({"w": torch.arange(10.0)}, path)
    pkl, members = _members(path)
    rec = pkl[: -len("data.pkl")] + "data/0"
    members[rec] += b"\x00" * 16
    long = tmp_path / "long.pt"
    _write_zip(long, members)
    check(long, mmap=True)
    with pytest.raises(RuntimeError, match="record size"):
        torch.load(long, mmap=False)  # torch's own message, as plain torch


def test_missing_record_is_torchs_error(tmp_path):
    path = tmp_path / "g.pt"
    torch.save({"w": torch.arange(10.0)}, path)
    pkl, members = _members(path)
    del members[pkl[: -len("data.pkl")] + "data/0"]
    bad = tmp_path / "missing.pt"
    _write_zip(bad, members)
    for mmap in (False, True):
        with pytest.raises(RuntimeError, match="failed locating file data/0"):
            torch.load(bad, mmap=mmap)


def test_deflated_records(tmp_path):
    path = tmp_path / "g.pt"
    torch.save({"w": torch.arange(1000.0)}, path)
    pkl, members = _members(path)
    rec = pkl[: -len("data.pkl")] + "data/0"
    bad = tmp_path / "deflated.pt"
    _write_zip(bad, members, compress={rec})
    # torch inflates it without mmap: we give the same values
    got = torch.load(bad, mmap=False)
    assert torch.equal(got["w"], torch.arange(1000.0))
    # with mmap, torch 2.13 maps the compressed bytes: here it fails to, and its error stands
    # (tests/test_legacy_parity.py has the file it would load: refused there)
    with pytest.raises(RuntimeError):
        torch.load(bad, mmap=True)


def test_duplicate_storage_record_refused_with_mmap(tmp_path):
    path = tmp_path / "g.pt"
    torch.save({"w": torch.arange(100.0)}, path)
    pkl, members = _members(path)
    rec = pkl[: -len("data.pkl")] + "data/0"
    bad = tmp_path / "dup.pt"
    with zipfile.ZipFile(bad, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, data in members.items():
            z.writestr(name, data)
            if name == rec:
                z.writestr(name.upper() if False else name, data[:8])
    # the record torch's zip library finds is the one read (and checked): here the short one
    with pytest.raises(RuntimeError, match="refusing to map"):
        torch.load(bad, mmap=True)
    assert _legacy.last_fallback.startswith("refused")


def test_global_mmap_setting_cannot_bypass_the_check(tmp_path):
    from torch.utils.serialization import config

    path = tmp_path / "g.pt"
    torch.save({"w": torch.arange(100.0)}, path)
    pkl, members = _members(path)
    rec = pkl[: -len("data.pkl")] + "data/0"
    members[rec] = members[rec][:8]
    bad = tmp_path / "short.pt"
    _write_zip(bad, members)
    old = config.load.mmap
    config.load.mmap = True
    try:
        with pytest.raises(RuntimeError, match="record size"):
            torch.load(bad)
    finally:
        config.load.mmap = old


# ---- what goes to torch, unchanged ----


class Allowed:
    def __init__(self, v=0):
        self.v = v

    def __eq__(self, other):
        return type(other) is Allowed and other.v == self.v


def test_user_allowlisted_class_goes_to_torch(tmp_path):
    path = tmp_path / "a.pt"
    torch.save({"obj": Allowed(3), "w": torch.ones(2)}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    with torch.serialization.safe_globals([Allowed]):
        got = torch.load(path)
    assert "outside the reader's subset" in _legacy.last_fallback
    assert got["obj"] == Allowed(3) and torch.equal(got["w"], torch.ones(2))


def test_explicit_unsafe_goes_to_torch(tmp_path):
    path = tmp_path / "u.pt"
    torch.save({"obj": Allowed(1)}, path)
    assert torch.load(path, weights_only=False)["obj"] == Allowed(1)
    assert "weights_only=False" in _legacy.last_fallback


def test_malicious_payload_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Evil()}, path)
    for mmap in (False, True):
        with pytest.raises(pickle.UnpicklingError, match="system"):
            torch.load(path, mmap=mmap)
    assert not marker.exists()


def test_payload_after_stop_is_ignored(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "g.pt"
    torch.save({"w": torch.arange(3.0)}, path)
    pkl, members = _members(path)
    members[pkl] += b"cos\nsystem\n(X" + struct.pack("<I", len(f"touch {marker}")) + f"touch {marker}".encode() + b"tR."
    bad = tmp_path / "after.pt"
    _write_zip(bad, members)
    check(bad)
    assert not marker.exists()


def test_file_objects_still_load(tmp_path):
    path = tmp_path / "f.pt"
    torch.save(CASES["views"], path)
    with open(path, "rb") as f:
        assert_same(plain(str(path)), torch.load(f))
    assert_same(plain(str(path)), torch.load(io.BytesIO(path.read_bytes())))


# ---- generated checkpoints (hypothesis) ----

GEN_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
              torch.int8, torch.uint8, torch.bool, torch.complex64, torch.uint16, torch.float8_e5m2]


@st.composite
def tensors(draw, pool):
    if pool and draw(st.booleans()):
        base = draw(st.sampled_from(pool))
        if base.dim() == 0 or base.numel() == 0:
            return base
        start = draw(st.integers(0, base.shape[0] - 1))
        view = base[start:]
        if view.dim() >= 2 and draw(st.booleans()):
            view = view.transpose(0, 1)
        return view
    dtype = draw(st.sampled_from(GEN_DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 255, (n * torch.empty((), dtype=dtype).element_size(),), dtype=torch.uint8)
    t = raw.view(dtype).view(shape)
    if dtype.is_floating_point and draw(st.booleans()):
        t = torch.nn.Parameter(t, requires_grad=draw(st.booleans()))
    pool.append(t if not isinstance(t, torch.nn.Parameter) else t.data)
    return t


def leaves(pool):
    return st.one_of(
        st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(allow_nan=False),
        st.text(max_size=8), st.binary(min_size=1, max_size=8), tensors(pool),  # b"" pickles as builtins.bytes(): torch refuses it
        st.sampled_from([torch.float32, torch.int8, torch.Size([1, 2]), torch.device("cpu")]),
    )


def structures(pool):
    keys = st.one_of(st.text(max_size=6), st.integers(-5, 5))
    return st.recursive(
        leaves(pool),
        lambda kids: st.one_of(
            st.lists(kids, max_size=4),
            st.lists(kids, max_size=3).map(tuple),
            st.dictionaries(keys, kids, max_size=4),
            st.dictionaries(keys, kids, max_size=4).map(collections.OrderedDict),
        ),
        max_leaves=12,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), mmap=st.booleans())
def test_generated_checkpoints_same_as_torch(tmp_path_factory, data, mmap):
    pool: list = []
    obj = data.draw(structures(pool))
    path = tmp_path_factory.mktemp("gen") / "g.pt"
    torch.save(obj, path)
    check(path, mmap=mmap)


# ---- differential fuzzing: mutated pickles ----


def _mutate(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.random()
        i = rnd.randrange(len(b))
        if op < 0.5:
            b[i] = rnd.randrange(256)
        elif op < 0.7:
            del b[i]
        elif op < 0.85:
            b.insert(i, rnd.randrange(256))
        else:
            j = rnd.randrange(len(b))
            b[i:i] = b[j : j + rnd.randint(1, 8)]
    return bytes(b)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1), which=st.sampled_from(["training", "views", "params", "values"]),
       mmap=st.booleans())
def test_mutated_pickles_never_accepted_when_torch_refuses(tmp_path_factory, seed, which, mmap):
    d = tmp_path_factory.mktemp("mut")
    path = d / "g.pt"
    torch.save(CASES[which], path)
    pkl, members = _members(path)
    members[pkl] = _mutate(members[pkl], random.Random(seed))
    bad = d / "bad.pt"
    _write_zip(bad, members)
    fd = os.open(bad, os.O_RDONLY)
    try:
        ours = _C.legacy_load(fd, mmap, lambda loc: loc == "cpu", True)
    except RuntimeError:
        return  # refused by us: nothing to compare
    finally:
        os.close(fd)
    if ours[0] != "ok":
        return  # torch decides: the wrapper hands it over unchanged
    want = plain(bad, mmap=mmap)  # must not raise: we accepted it
    assert_same(want, ours[1])


# ---- the pre-1.6 format ----


@pytest.mark.parametrize("name", sorted(CASES))
def test_pre_1_6_same_as_torch(tmp_path, name):
    path = tmp_path / "old.pt"
    torch.save(CASES[name], path, _use_new_zipfile_serialization=False)
    check(path)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d in torch.storage._dtype_to_storage_type_map()], ids=str)
def test_pre_1_6_every_legacy_dtype(tmp_path, dtype):
    t = torch.arange(64, dtype=torch.uint8).view(dtype).view(2, -1)
    path = tmp_path / "old.pt"
    torch.save({"t": t, "row": t[1]}, path, _use_new_zipfile_serialization=False)
    check(path)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.float8_e4m3fn, torch.float4_e2m1fn_x2], ids=str)
def test_pre_1_6_new_dtypes_do_what_torch_does(tmp_path, dtype):
    # the pre-1.6 format has no storage names for these: whatever torch does, we do
    t = torch.arange(16, dtype=torch.uint8).view(dtype)
    path = tmp_path / "old.pt"
    try:
        torch.save({"t": t}, path, _use_new_zipfile_serialization=False)
    except Exception as e:  # noqa: BLE001 - torch cannot write it: nothing to load
        pytest.skip(f"torch cannot write it: {e}")
    try:
        want = plain(path)
    except Exception as e:  # noqa: BLE001
        with pytest.raises(type(e)):
            torch.load(path)
        return
    assert_same(want, torch.load(path))


def test_pre_1_6_mmap_maps_aligned_storages(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.arange(1000.0), "b": torch.ones(3, dtype=torch.int8)}, path,
               _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError, match="mmap can only be used"):
        plain(path, mmap=True)  # plain torch refuses
    live = _C.live_mappings()
    got = torch.load(path, mmap=True)
    assert _legacy.last_fallback is None
    assert _C.live_mappings() == live + 1
    assert_same(plain(path), got)


def test_pre_1_6_protocol_1_is_torchs_unpickling_error(tmp_path):
    path = tmp_path / "p1.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False, pickle_protocol=1)
    with pytest.raises(pickle.UnpicklingError) as want:
        plain(path)
    with pytest.raises(pickle.UnpicklingError) as got:
        torch.load(path)
    assert str(want.value).splitlines()[-1] in str(got.value)


def test_pre_1_6_wrong_storage_size_is_torchs_error(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    at = data.rfind(struct.pack("<q", 4))
    data[at : at + 8] = struct.pack("<q", 3)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(Exception) as want:
        plain(bad)
    with pytest.raises(type(want.value)):
        torch.load(bad)
    assert _legacy.last_fallback is not None


def test_pre_1_6_truncated(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.arange(100.0)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    for cut in (10, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(Exception) as want:
            plain(bad)
        with pytest.raises(type(want.value)):
            torch.load(bad)


def test_pre_1_6_large_pickle_read_in_steps(tmp_path):
    # the object's pickle is larger than the first read: the reader reads more
    obj = {f"layer.{i}.weight": torch.full((2,), float(i)) for i in range(30000)}
    path = tmp_path / "big.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    check(path)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), mmap=st.booleans())
def test_generated_pre_1_6_checkpoints_same_as_torch(tmp_path_factory, data, mmap):
    pool: list = []
    obj = data.draw(structures(pool))
    path = tmp_path_factory.mktemp("gen") / "g.pt"
    try:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
        want = plain(path)
    except Exception:  # noqa: BLE001 - dtypes the old format cannot hold: torch decides
        return
    got = torch.load(path, mmap=mmap)
    assert_same(want, got)


# ---- fuzzing findings stay fixed ----

REGRESSIONS = os.path.join(os.path.dirname(__file__), "..", "fuzz", "regressions", "pickle")


@pytest.mark.parametrize("name", sorted(os.listdir(REGRESSIONS)) if os.path.isdir(REGRESSIONS) else [])
def test_fuzz_findings_as_data_pkl(tmp_path, name):
    path = tmp_path / "g.pt"
    torch.save({"w": torch.arange(3.0)}, path)
    pkl, members = _members(path)
    members[pkl] = open(os.path.join(REGRESSIONS, name), "rb").read()
    bad = tmp_path / "finding.pt"
    _write_zip(bad, members)
    try:
        want = ("ok", plain(bad))
    except Exception as e:  # noqa: BLE001
        want = ("error", type(e))
    try:
        got = ("ok", torch.load(bad))
    except Exception as e:  # noqa: BLE001
        got = ("error", type(e))
    assert want[0] == got[0]
    if want[0] == "ok":
        assert_same(want[1], got[1])
    else:
        assert issubclass(got[1], want[1]) or issubclass(want[1], got[1])


# ---- hand-written pickles ----


def _with_pickle(tmp_path, pkl: bytes):
    path = tmp_path / "g.pt"
    torch.save({"w": torch.ones(1)}, path)
    name, members = _members(path)
    members[name] = pkl
    out = tmp_path / "hand.pt"
    _write_zip(out, members)
    return out


def test_self_referencing_list(tmp_path):
    path = _with_pickle(tmp_path, b"\x80\x02]q\x01h\x01a.")  # L = [L]
    got = torch.load(path)
    assert _legacy.last_fallback is None
    assert got[0] is got


def test_cycle_through_a_tuple_goes_to_torch(tmp_path):
    # L = [T], T = (L,), returned [T]: the reader builds tuples from finished children
    path = _with_pickle(tmp_path, b"\x80\x02]q\x01h\x01\x85q\x02a]q\x03h\x02a.")
    got = torch.load(path)
    assert _legacy.last_fallback == "a cycle through a tuple"
    assert got[0][0][0] is got[0]


@pytest.mark.parametrize("pkl,why", [
    (b"\x80\x03N.", "subset"),                      # protocol 3: torch warns, we hand it over
    (b"\x80\x02\x8c\x01a.", "subset"),              # SHORT_BINUNICODE: torch refuses it
    (b"\x80\x02}q\x00]q\x01h\x01s.", "subset"),     # an unhashable key
    (b"\x80\x02X\x02\x00\x00\x00\xff\xfe.", "subset"),  # not UTF-8
    (b"\x80\x02ctorch\nSize\n]\x85R.", "subset"),   # torch.Size of a list
    (b"\x80\x02r\xff\xff\xff\xff.", "subset"),       # LONG_BINPUT far beyond the input
])
def test_outside_the_subset_goes_to_torch(tmp_path, pkl, why):
    path = _with_pickle(tmp_path, pkl)
    try:
        want = ("ok", plain(path))
    except Exception as e:  # noqa: BLE001
        want = ("error", type(e))
    try:
        got = ("ok", torch.load(path))
    except Exception as e:  # noqa: BLE001
        got = ("error", type(e))
    assert _legacy.last_fallback is not None and why in _legacy.last_fallback
    assert want[0] == got[0]
    if want[0] == "ok":
        assert_same(want[1], got[1])


# ---- differential fuzzing findings (fuzz/diff_pickle.py) stay fixed ----

DIFF_FINDINGS = os.path.join(os.path.dirname(__file__), "..", "fuzz", "regressions", "diff")


@pytest.mark.parametrize("name", sorted(os.listdir(DIFF_FINDINGS)) if os.path.isdir(DIFF_FINDINGS) else [])
@pytest.mark.parametrize("mmap", [False, True])
def test_diff_findings(name, mmap):
    # zip files torch's reader refuses or reads differently from a plain zip reader
    # (multi-disk fields in the zip64 record, a directory attribute, a record outside the
    # archive folder, a non-UTF-8 serialization id...): we hand them to torch
    path = os.path.join(DIFF_FINDINGS, name)
    fd = os.open(path, os.O_RDONLY)
    try:
        ours = _C.legacy_load(fd, mmap, lambda loc: loc == "cpu", True)
    except RuntimeError:
        return
    finally:
        os.close(fd)
    if ours[0] == "ok":
        assert_same(plain(path, mmap=mmap), ours[1])


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1), which=st.sampled_from(["training", "views", "params"]),
       zipped=st.booleans(), mmap=st.booleans())
def test_mutated_files_never_accepted_when_torch_refuses(tmp_path_factory, seed, which, zipped, mmap):
    buf = io.BytesIO()
    torch.save(CASES[which], buf, _use_new_zipfile_serialization=zipped)
    bad = tmp_path_factory.mktemp("mutf") / "bad.pt"
    bad.write_bytes(_mutate(buf.getvalue(), random.Random(seed)))
    fd = os.open(bad, os.O_RDONLY)
    try:
        ours = _C.legacy_load(fd, mmap, lambda loc: loc == "cpu", True)
    except RuntimeError:
        return
    finally:
        os.close(fd)
    if ours[0] == "ok":
        # plain torch refuses mmap for pre-1.6 files: compare with its in-memory load
        assert_same(plain(bad, mmap=mmap and zipped), ours[1])
