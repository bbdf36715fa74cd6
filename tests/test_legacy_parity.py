"""The legacy reader gives what plain torch.load(weights_only=True) gives (issue 19).

Every file here is written from raw bytes (fuzz/gen_pickle.py's builders: names with NUL
bytes, directories Python's zipfile reads differently from torch's) and loaded by plain
torch and through the wrapper in every mmap and map_location mode: the values, dtypes,
strides, offsets, sharing, identity and exception classes must agree. The one accepted
difference: mmap=True refuses a file whose records torch would map from other bytes."""
import os
import struct
import sys
import warnings

import pytest
import torch

import torch_safetensors  # noqa: F401 - installs the wrappers
from torch_safetensors import _C, _legacy, _torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fuzz"))
from gen_pickle import Pickle, compare_file, pre16_bytes, torch_records, zip_bytes  # noqa: E402

ORIG = _torch._orig_load
F32 = bytes(range(16))  # four float32 values


def plain(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ORIG(path, weights_only=True, **kw)


def v2(p: Pickle, stype, key, numel, sizes, strides=None, offset=0, grad=False, mod="torch"):
    """_rebuild_tensor_v2(storage, offset, sizes, strides, grad, OrderedDict())"""
    p.glob("torch._utils", "_rebuild_tensor_v2").mark()
    persid(p, stype, key, numel, mod)
    p.int(offset).mark()
    for d in sizes:
        p.int(d)
    p.tuple().mark()
    for d in strides or [1] * len(sizes):
        p.int(d)
    p.tuple().bool(grad).glob("collections", "OrderedDict").tuple(0).op(b"R").tuple().op(b"R")


def persid(p: Pickle, stype, key, numel, mod="torch", view=False):
    p.mark().str("storage").glob(mod, stype).str(key).str("cpu").int(numel)
    if view:
        p.none()
    p.tuple().op(b"Q")


def write_zip(tmp_path, pkl, storages, name="g.pt", **kw):
    path = tmp_path / name
    path.write_bytes(zip_bytes(torch_records(b"archive/", pkl, storages), **kw))
    return str(path)


def agree(path):
    counts = compare_file(path)
    return counts


# ---- 1.1: NUL bytes in record names and storage keys ----


def test_nul_in_a_storage_key_reads_the_record_torch_reads(tmp_path):
    p = Pickle().op(b"}").str("w")
    v2(p, "FloatStorage", b"0\x00x", 4, [4])
    path = write_zip(tmp_path, p.op(b"s").stop(), [(b"0", F32), (b"0\x00x", bytes(16))])
    want = plain(path)
    assert want["w"].tolist() == torch.frombuffer(bytearray(F32), dtype=torch.float32).tolist()
    got = torch.load(path)
    assert _legacy.last_fallback is None  # the C reader read it
    assert torch.equal(got["w"], want["w"])
    agree(path)


def test_keys_cut_to_one_record_are_two_storages(tmp_path):
    # "0\0a" and "0\0b" read the same record as two storages (torch caches by the key)
    p = Pickle().op(b"]").mark()
    v2(p, "FloatStorage", b"0\x00a", 4, [4])
    v2(p, "FloatStorage", b"0\x00b", 4, [4])
    path = write_zip(tmp_path, p.op(b"e").stop(), [(b"0", F32)])
    for mmap in (False, True):
        got = torch.load(path, mmap=mmap)
        assert _legacy.last_fallback is None
        want = plain(path, mmap=mmap)
        assert (got[0].data_ptr() == got[1].data_ptr()) == (want[0].data_ptr() == want[1].data_ptr())
    agree(path)


def test_constants_pkl_with_a_nul_is_torchscript_for_torch(tmp_path):
    p = Pickle().op(b"}")
    recs = torch_records(b"archive/", p.stop(), [], extra=[(b"archive/constants.pkl\x00", b"x")])
    path = tmp_path / "ts.pt"
    path.write_bytes(zip_bytes(recs))
    with pytest.raises(RuntimeError, match="TorchScript"):
        plain(str(path))
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.load(path)
    agree(str(path))


def test_constants_pkl_in_another_case_is_not_torchscript(tmp_path):
    p = Pickle().op(b"}")
    recs = torch_records(b"archive/", p.stop(), [], extra=[(b"archive/Constants.pkl", b"x")])
    path = tmp_path / "nots.pt"
    path.write_bytes(zip_bytes(recs))
    assert torch.load(path) == plain(str(path)) == {}
    assert _legacy.last_fallback is None


# ---- 1.2: a storage's dtype is its first reference's ----


def test_untyped_then_typed_reference_is_uint8(tmp_path):
    p = Pickle().op(b"]").mark()
    v2(p, "UntypedStorage", b"0", 16, [16], mod="torch.storage")
    v2(p, "FloatStorage", b"0", 4, [4])
    path = write_zip(tmp_path, p.op(b"e").stop(), [(b"0", F32)])
    want = plain(path)
    assert want[1].dtype == torch.uint8
    got = torch.load(path)
    assert _legacy.last_fallback is None
    assert got[1].dtype == torch.uint8 and torch.equal(got[1], want[1])
    agree(path)


def test_unused_reference_on_the_stack_decides_the_dtype(tmp_path):
    p = Pickle()
    persid(p, "FloatStorage", b"0", 4)  # left on the stack, never used
    p.op(b"}").str("w")
    v2(p, "LongStorage", b"0", 2, [2])
    path = write_zip(tmp_path, p.op(b"s").stop(), [(b"0", F32)])
    want = plain(path)
    assert want["w"].dtype == torch.float32
    got = torch.load(path)
    assert _legacy.last_fallback is None
    assert got["w"].dtype == torch.float32 and torch.equal(got["w"], want["w"])
    agree(path)


def test_later_reference_with_another_size_reuses_the_first(tmp_path):
    p = Pickle().op(b"]").mark()
    v2(p, "FloatStorage", b"0", 4, [4])
    v2(p, "FloatStorage", b"0", 99, [2])  # torch ignores the second claim
    path = write_zip(tmp_path, p.op(b"e").stop(), [(b"0", F32)])
    got = torch.load(path)
    assert _legacy.last_fallback is None
    assert got[1].untyped_storage().nbytes() == 16
    agree(path)


def test_pre_1_6_first_reference_decides_the_dtype(tmp_path):
    p = Pickle()
    p.mark().str("storage").glob("torch", "FloatStorage").str("0").str("cpu").int(4).none().tuple().op(b"Q")
    p.op(b"}").str("w").glob("torch._utils", "_rebuild_tensor_v2").mark()
    p.mark().str("storage").glob("torch", "LongStorage").str("0").str("cpu").int(2).none().tuple().op(b"Q")
    p.int(0).int(2).tuple(1).int(1).tuple(1).bool(False).glob("collections", "OrderedDict").tuple(0).op(b"R")
    p.tuple().op(b"R").op(b"s")
    path = tmp_path / "old.pt"
    path.write_bytes(pre16_bytes(p.stop(), [b"0"], {b"0": F32}, {b"0": 4}))
    want = plain(str(path))
    assert want["w"].dtype == torch.float32
    got = torch.load(path)
    assert _legacy.last_fallback is None
    assert got["w"].dtype == torch.float32 and torch.equal(got["w"], want["w"])
    agree(str(path))


# ---- 1.3: record checks are never skipped ----


def _short_long_key(tmp_path, key):
    p = Pickle().op(b"}").str("w")
    v2(p, "FloatStorage", key, 4, [4])
    # the record torch finds is 8 bytes long: mmap=True would read 8 bytes past it
    return write_zip(tmp_path, p.op(b"s").stop(), [(key.split(b"\x00")[0], F32[:8])])


@pytest.mark.parametrize("key", [b"k" * 5000, b"0\x00x"])
def test_key_the_old_lookup_missed_is_checked(tmp_path, key):
    path = _short_long_key(tmp_path, key)
    plain(path, mmap=True)  # torch maps the short record
    with pytest.raises(RuntimeError, match="refusing to map"):
        torch.load(path, mmap=True)
    with pytest.raises(RuntimeError):
        torch.load(path, mmap=False)
    agree(path)


def _zipfile_disagrees(tmp_path, how):
    p = Pickle().op(b"}").str("w").glob("torch._utils", "_rebuild_tensor_v2").mark()
    # a pickle the C reader leaves to torch (a callable map_location does too)
    persid(p, "FloatStorage", b"0", 4)
    p.int(0).int(4).tuple(1).int(1).tuple(1).bool(False).glob("collections", "OrderedDict").tuple(0).op(b"R")
    p.tuple().op(b"R").op(b"s")
    recs = torch_records(b"archive/", p.stop(), [(b"0", F32[:8])])
    if how == "local name":
        blob = zip_bytes(recs, local_names={b"archive/data.pkl": b"archive/other.pk"})
    else:
        blob = zip_bytes(recs, cd_size_delta=4)
    path = tmp_path / "odd.pt"
    path.write_bytes(blob)
    return str(path)


@pytest.mark.parametrize("how", ["local name", "directory size"])
def test_files_pythons_zipfile_cannot_read_are_still_checked(tmp_path, how):
    import zipfile

    path = _zipfile_disagrees(tmp_path, how)
    if how == "local name":
        with pytest.raises(zipfile.BadZipFile):
            zipfile.ZipFile(path).read("archive/data.pkl")
    plain(path, mmap=True)  # torch maps the short record
    for ml in (None, lambda s, loc: s):
        with pytest.raises(RuntimeError, match="refusing to map"):
            torch.load(path, mmap=True, map_location=ml)
    agree(path)


def test_a_directory_nothing_can_check_is_refused_with_mmap(tmp_path, monkeypatch):
    path = _zipfile_disagrees(tmp_path, "directory size")
    monkeypatch.setattr(_C, "legacy_zip_records", lambda fd: None)
    with pytest.raises(RuntimeError, match="cannot check"):
        torch.load(path, mmap=True, map_location=lambda s, loc: s)


def test_a_short_record_no_tensor_uses_is_not_refused(tmp_path):
    p = Pickle()
    persid(p, "FloatStorage", b"0", 4)  # maps 16 bytes of an 8-byte record, unused
    path = write_zip(tmp_path, p.op(b"N").stop(), [(b"0", F32[:8])])
    assert torch.load(path, mmap=True) is None is plain(path, mmap=True)
    agree(path)


# ---- 1.4: requires_grad as torch 2.13 ----


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float16", "int8"])
def test_v3_with_requires_grad_is_torchs_error(tmp_path, dtype):
    p = Pickle().op(b"}").str("w").glob("torch._utils", "_rebuild_tensor_v3").mark()
    persid(p, "UntypedStorage", b"0", 16, mod="torch.storage")
    p.int(0).int(2).tuple(1).int(1).tuple(1).bool(True).glob("collections", "OrderedDict").tuple(0).op(b"R")
    p.glob("torch", dtype).tuple().op(b"R").op(b"s")
    path = write_zip(tmp_path, p.stop(), [(b"0", F32)])
    with pytest.raises(RuntimeError):
        plain(path)
    with pytest.raises(RuntimeError):
        torch.load(path)
    agree(path)


def test_float8_saved_with_requires_grad(tmp_path):
    t = torch.zeros(4, dtype=torch.float8_e4m3fn)
    t.requires_grad = True
    path = tmp_path / "f8.pt"
    torch.save({"t": t, "p": torch.nn.Parameter(t.detach(), requires_grad=True)}, path, format="pickle")
    with pytest.raises(RuntimeError):
        plain(str(path))
    with pytest.raises(RuntimeError):
        torch.load(path)
    agree(str(path))


# ---- the grammar fuzzer's findings (fuzz/gen_pickle.py) stay fixed ----

GEN = os.path.join(os.path.dirname(__file__), "..", "fuzz", "regressions", "gen")


@pytest.mark.parametrize("name", sorted(os.listdir(GEN)) if os.path.isdir(GEN) else [])
def test_gen_findings(name):
    compare_file(os.path.join(GEN, name))


def test_generated_checkpoints_agree(tmp_path):
    """A short run of the generator: 40 files, every mode."""
    import random

    from gen_pickle import Gen

    rnd = random.Random(19)
    for i in range(40):
        path = tmp_path / f"g{i}.pt"
        path.write_bytes(Gen(rnd, pre16=i % 3 == 0).file())
        compare_file(str(path))


@pytest.mark.parametrize("order", [0, 1])
def test_records_equal_but_for_case_read_as_torch_picks(tmp_path, order):
    # torch's zip library finds one of "data/k" and "data/K" for both keys
    p = Pickle().op(b"]").mark()
    v2(p, "FloatStorage", b"k", 4, [4])
    v2(p, "FloatStorage", b"K", 4, [4])
    stor = [(b"k", F32), (b"K", bytes(reversed(F32)))]
    path = write_zip(tmp_path, p.op(b"e").stop(), stor if order else stor[::-1])
    for mmap in (False, True):
        want = plain(path, mmap=mmap)
        got = torch.load(path, mmap=mmap)
        assert _legacy.last_fallback is None
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    agree(path)


def _name_hash(name: bytes) -> int:
    """The C reader's hash of a record name (FNV-1a over the case-folded bytes)."""
    h = 1469598103934665603
    for b in name.lower():
        h = ((h ^ b) * 1099511628211) & (2**64 - 1)
    return h ^ (h >> 29)


def test_record_names_crafted_to_collide_read_as_torch_reads(tmp_path):
    # 80 storage keys whose names fall in one slot of the reader's name table: past 64
    # probes it takes miniz's sort and search (as torch does), never a quadratic lookup
    n = 80
    mask = 2 ** (n * 2 - 1).bit_length() - 1  # the table: a power of two >= 2 x records
    keys, i = [], 0
    while len(keys) < n:
        key = str(i).encode()
        if _name_hash(b"archive/data/" + key) & mask == 0:
            keys.append(key)
        i += 1
    p = Pickle().op(b"]").mark()
    for key in keys:
        v2(p, "FloatStorage", key, 1, [1])
    stor = [(key, struct.pack("<f", float(j))) for j, key in enumerate(keys)]
    path = write_zip(tmp_path, p.op(b"e").stop(), stor)
    for mmap in (False, True):
        want = plain(path, mmap=mmap)
        got = torch.load(path, mmap=mmap)
        assert _legacy.last_fallback is None
        assert len(got) == n and all(torch.equal(a, b) for a, b in zip(got, want))
    agree(path)


# ---- 3: file objects through the C reader (_legacy.load_fileobj, for the lead's loader) ----


def _bound(**kw):
    import inspect

    return inspect.signature(torch.load).bind(None, weights_only=True, **kw)


class MinimalReader:
    """read/readline/seek/tell only (no readinto), recording every read size. (readline:
    torch reads a pre-1.6 file with pickle, which needs it; without it torch refuses
    the object, and so does the wrapper: tests/test_fileobj_matrix.py.)"""

    def __init__(self, data):
        self.f = __import__("io").BytesIO(data)
        self.reads = []

    def read(self, n=-1):
        self.reads.append(n)
        return self.f.read(n)

    def readline(self):
        return self.f.readline()

    def seek(self, off, whence=0):
        return self.f.seek(off, whence)

    def tell(self):
        return self.f.tell()


def _via_fileobj(f, **kw):
    from gen_pickle import same  # noqa: F401

    def torch_load():
        return plain(f, **kw)

    return _legacy.load_fileobj(f, _bound(**kw), torch_load)


@pytest.mark.parametrize("zipped", [True, False])
@pytest.mark.parametrize("kind", ["bytesio", "file", "minimal"])
def test_file_objects_read_by_the_c_reader(tmp_path, zipped, kind):
    import io

    from gen_pickle import same

    torch.manual_seed(0)
    base = torch.randn(300, 50)
    obj = {"w": base, "row": base[3], "t": base.t(), "big": torch.randn(2_000_000),
           "p": torch.nn.Parameter(torch.ones(3)), "n": [1, "x", None], "h": torch.arange(5).half()}
    path = tmp_path / "c.pt"
    torch.save(obj, path, format="pickle", _use_new_zipfile_serialization=zipped)
    data = path.read_bytes()
    f = {"bytesio": lambda: io.BytesIO(data), "file": lambda: open(path, "rb"),
         "minimal": lambda: MinimalReader(data)}[kind]()
    got = _via_fileobj(f)
    assert _legacy.last_fallback is None, _legacy.last_fallback
    same(plain(io.BytesIO(data)), got)
    if kind == "minimal":
        # never the whole stream at once: reads of at most the 1 MiB window or one record
        # (straight into the tensor's memory where the object has readinto)
        assert max(f.reads) <= 2_000_000 * 4 < len(data)
        assert sorted(f.reads)[-2] <= 1 << 20


def test_file_object_fallback_puts_it_back_at_its_start(tmp_path):
    import io

    p = Pickle().op(b"}").str("x").glob("builtins", "set").tuple(0).op(b"R").op(b"s")  # outside the subset
    data = zip_bytes(torch_records(b"archive/", p.stop(), []))
    f = io.BytesIO(data)
    got = _via_fileobj(f)  # torch reads it from the start again
    assert _legacy.last_fallback is not None
    assert got == plain(io.BytesIO(data)) == {"x": set()}


@pytest.mark.parametrize("name", sorted(os.listdir(GEN)) if os.path.isdir(GEN) else [])
def test_file_objects_agree_on_the_findings(name):
    import io

    from gen_pickle import same

    data = open(os.path.join(GEN, name), "rb").read()
    for ml in (None, "cpu"):
        try:
            want = ("ok", plain(io.BytesIO(data), map_location=ml))
        except Exception as e:  # noqa: BLE001
            want = ("error", type(e))
        try:
            got = ("ok", _via_fileobj(io.BytesIO(data), map_location=ml))
        except Exception as e:  # noqa: BLE001
            got = ("error", type(e))
        assert want[0] == got[0], (want, got)
        if want[0] == "ok":
            same(want[1], got[1])
        else:
            assert want[1] is got[1]
