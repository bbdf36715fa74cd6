"""Issue 5, point 2: no leaks of file descriptors, mappings or memory.

Every way to open, load and free a file, and every error path, runs 1,000 times; afterwards
the process holds exactly the descriptors and mappings it held before (counted in
/proc/self/fd, by _C.live_mappings() and in /proc/self/maps). Leaks of memory are made
visible by size: loading a file with a multi-megabyte header or data a few hundred times
would grow the resident set by gigabytes if a table, a buffer or a copy were kept.
.ci/valgrind.sh runs this file under memcheck for the leaks too small to see this way.
"""
from __future__ import annotations

import gc
import io
import json
import os
import struct

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _C, _core

SafetensorError = ts.SafetensorError
# .ci/valgrind.sh lowers the rounds: memcheck finds leaks in a few, and is ~50x slower
N = int(os.environ.get("TORCH_SAFETENSORS_LEAK_ROUNDS", "1000"))


@pytest.fixture(scope="module", autouse=True)
def _cheap_gc():
    """Moves everything alive now out of the collector's sight: each gc.collect() below
    then scans only what the tests create (a full collection with torch loaded takes
    ~0.1 s)."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps_naming(path) -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if str(path) in line)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _counts(*paths):
    gc.collect()
    return _fds(), _C.live_mappings(), tuple(_maps_naming(p) for p in paths)


def _raw(header: str, data: bytes = b"") -> bytes:
    h = header.encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.fixture
def files(tmp_path):
    """A valid file, malformed ones, and one whose tensors fail only at creation."""
    good = tmp_path / "good.safetensors"
    ts.save_file({"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(3, 5),
                  "c": torch.zeros(0)}, good, metadata={"k": "v"})
    trailing = tmp_path / "trailing.safetensors"  # mapped, parsed, then refused
    trailing.write_bytes(good.read_bytes() + b"x")
    notjson = tmp_path / "notjson.safetensors"
    notjson.write_bytes(_raw("{not json}"))
    f6 = tmp_path / "f6.safetensors"  # valid file, no torch dtype: fails in tensor creation
    f6.write_bytes(_raw('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                        '"z":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[8,11]}}',
                        b"\0" * 11))
    misaligned = tmp_path / "misaligned.safetensors"  # tensors are copied, not mapped
    h = '{"a":{"dtype":"F64","shape":[16],"data_offsets":[0,128]}}'
    h += " " * ((8 - (8 + len(h)) % 8) % 8 + 1)
    misaligned.write_bytes(_raw(h, bytes(range(128))))
    return {"good": good, "trailing": trailing, "notjson": notjson, "f6": f6,
            "misaligned": misaligned, "missing": tmp_path / "missing.safetensors"}


def _safe_open_get(p):
    with ts.safe_open(p, framework="pt") as f:
        return [f.get_tensor(k) for k in f.keys()] + [f.metadata()]


def _safe_open_slice(p):
    with ts.safe_open(p, framework="pt") as f:
        return f.get_slice("b")[1:, ::2]


def _reader_nommap(p):
    r = _C.Reader(str(p), mmap=False)
    try:
        return r.tensors()
    finally:
        r.close()


def _torch_load_fileobj(p):
    with open(p, "rb") as f:
        return torch.load(f)


def _unclosed_safe_open(p):
    f = ts.safe_open(p, framework="pt")  # never closed: freed by refcount
    return f.get_tensor("a")


OK_OPS = {
    "load_file": lambda p: ts.load_file(p),
    "load_file_meta": lambda p: ts.load_file(p, device="meta"),
    "safe_open_get_tensor": _safe_open_get,
    "safe_open_get_slice": _safe_open_slice,
    "safe_open_unclosed": _unclosed_safe_open,
    "torch_load": lambda p: torch.load(p),
    "torch_load_mmap_false": lambda p: torch.load(p, mmap=False),
    "torch_load_fileobj": _torch_load_fileobj,
    "torch_load_bytesio": lambda p: torch.load(io.BytesIO(p.read_bytes())),
    "load_bytes": lambda p: ts.load(p.read_bytes()),
    "reader_mmap_false": _reader_nommap,
}


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero_copy", "fallback"])
@pytest.mark.parametrize("op", sorted(OK_OPS))
def test_load_and_free_1000_times(files, op, zero_copy):
    fn = OK_OPS[op]
    p = files["good"]
    _core.set_zero_copy(zero_copy)
    try:
        got = fn(p)  # warm-up, and a check that the op works
        del got
        before = _counts(p)
        for _ in range(N):
            _touch(fn(p))
        after = _counts(p)
    finally:
        _core.set_zero_copy(True)
    assert after == before, (op, before, after)
    assert after[2] == (0,)  # nothing of the file stays mapped


def _touch(out) -> None:
    """Reads the data of what a load returned: mapped tensors read their pages."""
    tensors = out.values() if isinstance(out, dict) else out if isinstance(out, list) else [out]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel():
            float(t.float().sum())


def test_tensors_keep_the_mapping_until_freed(files):
    # the counters do move: they would catch a leak
    p = files["good"]
    fds, maps, named = _counts(p)
    held = [ts.load_file(p) for _ in range(10)]
    assert _C.live_mappings() == maps + 10
    assert _maps_naming(p) >= 10
    assert _fds() == fds  # the descriptor is closed once the file is mapped
    del held
    assert _counts(p) == (fds, maps, named)


ERROR_OPS = [
    ("load_file", "trailing", SafetensorError),
    ("load_file", "notjson", SafetensorError),
    ("load_file", "missing", FileNotFoundError),
    ("load_file", "f6", SafetensorError),
    ("safe_open", "trailing", SafetensorError),
    ("safe_open_missing_name", "good", SafetensorError),
    ("safe_open_get_f6", "f6", SafetensorError),
    ("torch_load", "trailing", SafetensorError),
    ("torch_load", "f6", SafetensorError),
    ("torch_load_mmap_false", "trailing", SafetensorError),
    ("torch_load_mmap_false", "f6", SafetensorError),
    ("torch_load_format", "notjson", SafetensorError),
    ("reader_mmap_false", "trailing", SafetensorError),
    ("reader_mmap_false", "f6", SafetensorError),
    ("load_bytes", "trailing", SafetensorError),
    ("load_bytes", "f6", SafetensorError),
    ("load_file_directory", "good", IsADirectoryError),
]


def _error_op(kind, p):
    if kind == "load_file":
        return ts.load_file(p)
    if kind == "safe_open":
        return ts.safe_open(p, framework="pt")
    if kind == "safe_open_missing_name":
        with ts.safe_open(p, framework="pt") as f:
            return f.get_tensor("nope")
    if kind == "safe_open_get_f6":
        with ts.safe_open(p, framework="pt") as f:
            f.get_tensor("a")
            return f.get_tensor("z")
    if kind == "torch_load":
        return torch.load(p)
    if kind == "torch_load_mmap_false":
        return torch.load(p, mmap=False)
    if kind == "torch_load_format":
        return torch.load(p, format="safetensors")
    if kind == "reader_mmap_false":
        return _reader_nommap(p)
    if kind == "load_bytes":
        return ts.load(p.read_bytes())
    if kind == "load_file_directory":
        return ts.load_file(p.parent)
    raise ValueError(kind)


@pytest.mark.parametrize("kind,which,exc", ERROR_OPS,
                         ids=[f"{k}-{w}" for k, w, _ in ERROR_OPS])
def test_error_paths_1000_times(files, kind, which, exc):
    p = files[which]
    with pytest.raises(exc):
        _error_op(kind, p)
    before = _counts(p)
    for _ in range(N):
        try:
            _error_op(kind, p)
        except exc:
            pass
        else:
            pytest.fail("no error")
    after = _counts(p)
    assert after == before, (kind, which, before, after)
    assert after[2] == (0,)


def test_misaligned_copies_are_freed(files):
    p = files["misaligned"]
    t = ts.load_file(p)["a"]
    assert torch.equal(t.view(torch.uint8), torch.arange(128, dtype=torch.uint8))
    del t
    before = _counts(p)
    for _ in range(N):
        ts.load_file(p)
        torch.load(p)
    assert _counts(p) == before


# ---- memory, made visible by size ----


def _under_asan() -> bool:
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


# ASan's quarantine keeps up to 256 MiB of freed blocks resident: RSS says nothing there
needs_plain_allocator = pytest.mark.skipif(
    _under_asan(), reason="ASan's quarantine holds freed memory; the ASan step checks "
    "memory errors, valgrind (.ci/valgrind.sh) checks leaks")


def _grows(fn, rounds: int, warmup: int = 5) -> int:
    """RSS growth over `rounds` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    gc.collect()
    start = _rss()
    for _ in range(rounds):
        fn()
    gc.collect()
    return _rss() - start


@pytest.fixture
def big_header(tmp_path):
    """A ~6.5 MB header of 100,000 entries, refused for one trailing byte at the end: the
    whole table is built, then thrown away."""
    body = ",".join(f'"t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
                    for i in range(100_000))
    p = tmp_path / "big_header.safetensors"
    p.write_bytes(_raw("{" + body + "}", b"x"))
    return p


@needs_plain_allocator
@pytest.mark.parametrize("how", ["load_file", "reader_mmap_false", "load_bytes", "torch_load"])
def test_big_header_tables_are_freed(big_header, how):
    data = big_header.read_bytes()

    def once():
        with pytest.raises(SafetensorError):
            if how == "load_file":
                ts.load_file(big_header)
            elif how == "reader_mmap_false":
                _C.Reader(str(big_header), mmap=False)
            elif how == "load_bytes":
                ts.load(data)
            else:
                torch.load(big_header)
    # the table of this header takes ~14 MB: a kept one would add 12 x 14 MB
    growth = _grows(once, 12, warmup=2)
    assert growth < 64 << 20, f"RSS grew {growth >> 20} MiB"


@pytest.fixture
def big_data(tmp_path):
    p = tmp_path / "big_data.safetensors"
    ts.save_file({"x": torch.ones(4 << 20)}, p, metadata={"m" * 100: "v" * 100_000})  # 16 MB
    return p


@needs_plain_allocator
@pytest.mark.parametrize("how", ["load_bytes", "torch_load_mmap_false", "reader_mmap_false",
                                 "load_file_touched", "safe_open_metadata", "save_bytes"])
def test_big_buffers_are_freed(big_data, how):
    data = big_data.read_bytes()

    def once():
        if how == "load_bytes":
            float(ts.load(data)["x"][-1])
        elif how == "torch_load_mmap_false":
            float(torch.load(big_data, mmap=False)["x"][-1])
        elif how == "reader_mmap_false":
            _reader_nommap(big_data)
        elif how == "load_file_touched":
            float(ts.load_file(big_data)["x"].sum())  # every page read in
        elif how == "safe_open_metadata":
            with ts.safe_open(big_data, framework="pt") as f:
                f.metadata()
        else:
            ts.save({"x": torch.ones(4 << 20)})
    growth = _grows(once, 60)  # a kept copy would be 60 x 16 MB
    assert growth < 64 << 20, f"RSS grew {growth >> 20} MiB"


# ---- saving ----


def test_save_file_1000_times_leaves_no_fd_or_temp(tmp_path):
    p = tmp_path / "s.safetensors"
    sd = {"a": torch.arange(10), "b": torch.ones(2, 2).t()}  # one staged (non-contiguous)
    ts.save_file(sd, p)
    fds = _counts()[0]
    for i in range(N):
        ts.save_file(sd, p, metadata={"i": str(i)})
    assert _counts()[0] == fds
    assert os.listdir(tmp_path) == ["s.safetensors"]
    with ts.safe_open(p, framework="pt") as f:
        assert f.metadata() == {"i": str(N - 1)}
    assert _counts()[0] == fds


def test_torch_save_1000_times_leaves_no_fd_or_temp(tmp_path):
    p = tmp_path / "t.pt"
    sd = {"model": {"w": torch.ones(4)}, "step": 1}
    fds = _counts()[0]
    for _ in range(N):
        torch.save(sd, p, format="safetensors")
    buf = io.BytesIO()
    for _ in range(N):
        buf.seek(0)
        torch.save(sd, buf, format="safetensors")
    assert _counts()[0] == fds
    assert os.listdir(tmp_path) == ["t.pt"]


@pytest.mark.parametrize("failure", ["missing_dir", "directory", "refused_object",
                                     "shared_memory"])
def test_failed_saves_1000_times_leave_nothing(tmp_path, failure):
    d = tmp_path / "d"
    d.mkdir()
    base = torch.ones(4)
    target, exc, sd = {
        "missing_dir": (tmp_path / "nope" / "x.safetensors", FileNotFoundError, {"a": base}),
        "directory": (d, IsADirectoryError, {"a": base}),
        "refused_object": (tmp_path / "x.safetensors", TypeError, {"a": base, "b": "str"}),
        "shared_memory": (tmp_path / "x.safetensors", RuntimeError, {"a": base, "b": base}),
    }[failure]
    fds = _counts()[0]
    for _ in range(N):
        with pytest.raises(exc):
            ts.save_file(sd, target)
    assert _counts()[0] == fds
    assert sorted(os.listdir(tmp_path)) == ["d"] and os.listdir(d) == []


def test_save_bytes_with_metadata_1000_times():
    sd = {"a": torch.ones(3)}
    meta = {"k" + str(i): json.dumps(list(range(i))) for i in range(20)}
    first = ts.save(sd, meta)
    for _ in range(N):
        assert ts.save(sd, meta) == first
