"""The layers around the C core, tried as an attacker would (issue 11): special files,
bounded reads, interrupted re-saves of sharded checkpoints, /proc and pipe targets,
conjugate views, planted symlinks, inconsistent DCP indexes, misbehaving file objects,
and legacy zips that would be mapped. Each test failed before its fix."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _C, _cli, _save, _sharded
from torch_safetensors._core import SafetensorError

from test_sharded import INDEX, _equal, _files, _state  # the sharded tests' fixtures


def _same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def _deadline(seconds=10):
    """Turns a hang (a blocking open of a FIFO) into a test failure."""
    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---- 9: a failed re-save never destroys the previous checkpoint ----

# (old shard size, new shard size): same count, fewer, more, single -> sharded, sharded -> single
_RESAVES = {
    "same count": (10_000, 10_000),
    "fewer shards": (10_000, 20_000),
    "more shards": (20_000, 10_000),
    "single to sharded": (10**9, 10_000),
    "sharded to single": (10_000, 10**9),
}


class _Injected(OSError):
    pass


@pytest.mark.parametrize("case", sorted(_RESAVES))
def test_failure_at_every_step_leaves_a_complete_checkpoint(tmp_path, monkeypatch, case):
    old_size, new_size = _RESAVES[case]
    old, new = _state(6, 1000, seed=1), _state(6, 1000, seed=2)
    ts.save_sharded(old, tmp_path, max_shard_size=old_size)
    before = {f: (tmp_path / f).read_bytes() for f in _files(tmp_path)}

    # every file-system step of a save, failing at the k-th one for k = 1, 2, ...
    steps = []
    fail_at = [0]

    def failing(real):
        def step(*args, **kwargs):
            steps.append(real.__name__)
            if len(steps) == fail_at[0]:
                raise _Injected(28, "No space left on device (injected)")
            return real(*args, **kwargs)
        return step

    monkeypatch.setattr(_save, "save_safetensors", failing(_save.save_safetensors))
    monkeypatch.setattr(_C, "write_atomic", failing(_C.write_atomic))
    monkeypatch.setattr(_sharded, "_fsync_dir", failing(_sharded._fsync_dir))
    monkeypatch.setattr(os, "replace", failing(os.replace))
    for k in range(1, 40):
        steps.clear()
        fail_at[0] = k
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ts.save_sharded(new, tmp_path, max_shard_size=new_size)
        except _Injected:
            got = torch.load(tmp_path)
            # before the new set is in place: the old one, byte for byte
            assert _same(got, old) or _same(got, new), (case, k, steps)
            if _same(got, old):  # and the old files are untouched
                assert {f: (tmp_path / f).read_bytes() for f in before} == before, (k, steps)
            assert not [f for f in _files(tmp_path) if f.startswith(".")], (k, steps)
            continue
        break
    else:
        pytest.fail("the save never completed")
    assert k > 2, steps  # failures were injected at several steps
    _equal(torch.load(tmp_path), new)
    assert not [f for f in _files(tmp_path) if f.startswith(".")]


_FSIZE_CHILD = textwrap.dedent(r"""
    import resource, sys, torch, torch_safetensors as ts
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    sd = {f"w{i}": torch.full((50_000,), float(i)) for i in range(4)}  # 200 kB each
    try:
        ts.save_sharded(sd, sys.argv[1], max_shard_size=int(sys.argv[3]))
    except OSError as e:
        print("errno", e.errno)
    else:
        print("saved")
""")


@pytest.mark.parametrize("new_shard", [200_000, 400_000])
def test_rlimit_fsize_resave_keeps_the_old_checkpoint(tmp_path, new_shard):
    # the old checkpoint: 4 shards of 4 kB; the new one would write 200/400 kB shards
    old = {f"w{i}": torch.full((1000,), -float(i)) for i in range(4)}
    ts.save_sharded(old, tmp_path, max_shard_size=4000)
    before = {f: (tmp_path / f).read_bytes() for f in _files(tmp_path)}
    r = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(tmp_path), "100000", str(new_shard)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[:1] == ["errno"], r.stdout
    assert {f: (tmp_path / f).read_bytes() for f in _files(tmp_path)} == before
    _equal(torch.load(tmp_path), old)


_RESAVER = textwrap.dedent(r"""
    import sys, torch, torch_safetensors as ts
    a = {f"w{i}": torch.full((60_000,), float(i)) for i in range(6)}
    b = {f"w{i}": torch.full((60_000,), float(-i)) for i in range(6)}
    print("ready", flush=True)
    n = 0
    while True:  # alternate two checkpoints with the same shard names
        ts.save_sharded(a if n % 2 else b, sys.argv[1], max_shard_size=480_000)
        n += 1
        if n == 2:
            print("looping", flush=True)
""")


def test_sigkill_at_random_moments_of_resaves(tmp_path):
    a = {f"w{i}": torch.full((60_000,), float(i)) for i in range(6)}
    b = {f"w{i}": torch.full((60_000,), float(-i)) for i in range(6)}
    rng = random.Random(11)
    for trial in range(8):
        child = subprocess.Popen([sys.executable, "-c", _RESAVER, str(tmp_path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            assert child.stdout.readline().strip() == "looping", child.stderr.read()
            time.sleep(rng.uniform(0.0, 0.3))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
            child.stderr.close()
        got = torch.load(tmp_path)
        assert _same(got, a) or _same(got, b), (trial, _files(tmp_path))
    # a later save clears what the killed ones left
    ts.save_sharded(a, tmp_path, max_shard_size=480_000)
    assert _files(tmp_path) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [INDEX] \
        or len([f for f in _files(tmp_path) if f.endswith(".safetensors")]) == 3, _files(tmp_path)
    assert not [f for f in _files(tmp_path) if f.startswith(".")]
    _equal(torch.load(tmp_path), a)


def test_resave_with_the_same_count_alternates_names(tmp_path):
    old, new = _state(seed=1), _state(seed=2)
    ts.save_sharded(old, tmp_path, max_shard_size=10_000)
    first = _files(tmp_path)
    ts.save_sharded(new, tmp_path, max_shard_size=10_000)
    second = _files(tmp_path)
    assert set(first) & set(second) == {INDEX}  # no shard was written over
    assert all(n.startswith("model-") and n.endswith("-of-00003.safetensors") for n in second if n != INDEX)
    ts.save_sharded(old, tmp_path, max_shard_size=10_000)
    assert _files(tmp_path) == first  # the standard names again
    _equal(torch.load(tmp_path), old)


def test_convert_shard_size_failure_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    src = tmp_path / "src.pt"
    torch.save(_state(seed=2), src, format="pickle")
    out = tmp_path / "out"
    old = _state(seed=1)
    ts.save_sharded(old, out, max_shard_size=10_000)
    real = _save.save_safetensors
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(_save, "save_safetensors", failing)
    assert _cli.main(["convert", str(src), str(out), "--shard-size", "10000", "--no-progress", "--force"]) == 3
    monkeypatch.undo()
    _equal(torch.load(out), old)


# ---- 12: special targets ----


def test_save_to_dev_stdout_pipe():
    code = ("import torch, torch_safetensors\n"
            "torch.save({'a': torch.arange(5.0)}, '/dev/stdout', format='safetensors')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    _equal(ts.load(r.stdout), {"a": torch.arange(5.0)})


def test_save_to_proc_self_fd_of_an_unlinked_file(tmp_path):
    p = tmp_path / "gone.safetensors"
    with open(p, "w+b") as f:
        os.unlink(p)
        torch.save({"a": torch.arange(3.0)}, f"/proc/self/fd/{f.fileno()}", format="safetensors")
        assert os.listdir(tmp_path) == []  # never a file named "gone.safetensors (deleted)"
        f.seek(0)
        _equal(torch.load(f), {"a": torch.arange(3.0)})


def test_save_to_proc_self_fd_of_a_renamed_file(tmp_path):
    p, q = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    with open(p, "w+b") as f:
        os.rename(p, q)
        ts.save_file({"a": torch.ones(2)}, f"/dev/fd/{f.fileno()}")
        assert _files(tmp_path) == ["b.safetensors"]
        _equal(ts.load_file(q), {"a": torch.ones(2)})
        f.seek(0)  # the very file the descriptor refers to, as open(path, "wb") writes it
        _equal(torch.load(f), {"a": torch.ones(2)})


# ---- 13: t and t.conj() are different values ----


@pytest.mark.parametrize("view", ["conj", "neg"])
def test_conjugate_and_negative_views_are_not_ties(tmp_path, view):
    t = torch.randn(4, dtype=torch.complex64)
    v = t.conj() if view == "conj" else torch._neg_view(t)
    want = v.resolve_conj().resolve_neg()
    torch.save({"x": {"t": t, "v": v}}, tmp_path / "n.st", format="safetensors")
    got = torch.load(tmp_path / "n.st")
    assert torch.equal(got["x"]["t"], t) and torch.equal(got["x"]["v"], want)
    ts.save_sharded({"t": t, "v": v}, tmp_path / "sh")
    got = torch.load(tmp_path / "sh")
    assert torch.equal(got["t"], t) and torch.equal(got["v"], want)
    ts.save_sharded({"t": t, "v": v, "z": torch.zeros(4, dtype=torch.complex64)}, tmp_path / "sh2",
                    max_shard_size=32)
    got = torch.load(tmp_path / "sh2")
    assert torch.equal(got["t"], t) and torch.equal(got["v"], want)


# ---- 14: planted symlinks are replaced, never written through ----


@pytest.mark.parametrize("name", ["model-00001-of-00003.safetensors", INDEX, "model.safetensors"])
def test_save_sharded_never_writes_through_a_planted_symlink(tmp_path, name):
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    d = tmp_path / "ckpt"
    d.mkdir()
    os.symlink(outside, d / name)
    sd = _state(6, 1000)
    limit = 10**9 if name == "model.safetensors" else 10_000
    ts.save_sharded(sd, d, max_shard_size=limit)
    assert outside.read_bytes() == b"precious"
    _equal(torch.load(d), sd)
    if os.path.lexists(d / name):
        assert not os.path.islink(d / name)


def test_reading_through_symlinks_stays_allowed(tmp_path):
    # Hugging Face's cache: snapshot files are symlinks into blobs/
    sd = _state(6, 1000)
    ts.save_sharded(sd, tmp_path / "real", max_shard_size=10_000)
    snap = tmp_path / "snap"
    snap.mkdir()
    for f in _files(tmp_path / "real"):
        os.symlink(tmp_path / "real" / f, snap / f)
    _equal(torch.load(snap), sd)


# ---- 15: cleaning up after a complete save never raises ----


def test_directory_named_like_a_stale_shard_is_left_with_a_warning(tmp_path):
    (tmp_path / "model-00001-of-00009.safetensors").mkdir()
    sd = _state(6, 1000)
    with pytest.warns(RuntimeWarning, match="model-00001-of-00009"):
        ts.save_sharded(sd, tmp_path, max_shard_size=10_000)
    assert (tmp_path / "model-00001-of-00009.safetensors").is_dir()
    _equal(torch.load(tmp_path), sd)


# ---- 16: sizes too large to represent ----


@pytest.mark.parametrize("size", ["9" * 400 + "GB", 2**64, "1" + "0" * 30 + "TB"])
def test_huge_shard_size_is_a_value_error(size):
    with pytest.raises(ValueError, match="too large"):
        _sharded.parse_size(size)


def test_cli_huge_shard_size_exits_2(tmp_path, capsys):
    src = tmp_path / "src.pt"
    torch.save(_state(2, 10), src, format="pickle")
    assert _cli.main(["convert", str(src), str(tmp_path / "o"), "--shard-size", "9" * 400 + "GB"]) == 2
    assert "too large" in capsys.readouterr().err


# ---- 1: no hang on special files ----


def _sharded_dir(d):
    ts.save_sharded(_state(6, 1000), d, max_shard_size=10_000)
    return d


def _fifo_at(path):
    if os.path.lexists(path):
        os.unlink(path)
    os.mkfifo(path)


@pytest.mark.parametrize("where", ["model.safetensors", "shard", "index", "only"])
def test_fifo_in_a_checkpoint_directory_is_refused_at_once(tmp_path, where):
    d = tmp_path / "d"
    d.mkdir()
    if where == "model.safetensors":
        _fifo_at(d / "model.safetensors")
    elif where == "only":
        _fifo_at(d / "weights.safetensors")
    else:
        _sharded_dir(d)
        _fifo_at(d / (INDEX if where == "index" else "model-00002-of-00003.safetensors"))
    with _deadline():
        for load in (lambda: torch.load(d), lambda: ts.load_sharded(d)):
            with pytest.raises(SafetensorError, match="not a regular file .a FIFO."):
                load()
        if where in ("shard", "index"):
            with pytest.raises(SafetensorError, match="FIFO"):
                torch.load(d / INDEX)


def test_explicit_fifo_path_is_refused_at_once(tmp_path):
    _fifo_at(tmp_path / "x.pt")
    with _deadline():
        with pytest.raises(SafetensorError, match="FIFO"):
            torch.load(tmp_path / "x.pt")
        for load in (ts.load_file, lambda p: ts.safe_open(p, "pt"), lambda p: _C.Reader(str(p))):
            with pytest.raises(OSError, match="not a regular file") as info:  # the C reader
                load(tmp_path / "x.pt")
            assert info.value.errno == errno.EINVAL and info.value.filename == str(tmp_path / "x.pt")


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_cli_refuses_special_files(tmp_path, command, capsys):
    _fifo_at(tmp_path / "f.safetensors")
    d = _sharded_dir(tmp_path / "d")
    _fifo_at(d / "model-00001-of-00003.safetensors")
    with _deadline():
        for target in (tmp_path / "f.safetensors", d, d / INDEX):
            assert _cli.main([command, str(target)]) != 0
            out = capsys.readouterr()
            assert "FIFO" in out.err + out.out, target


def test_dcp_index_fifo_is_refused_at_once(tmp_path):
    from torch_safetensors.distributed import SafetensorsReader

    _fifo_at(tmp_path / "dcp-index.json")
    with _deadline():
        with pytest.raises(SafetensorError, match="FIFO"):
            SafetensorsReader(tmp_path).read_metadata()


def test_device_path_torch_accepts_still_reaches_torch():
    # torch reads /dev/null (and fails in its own way): the wrapper does not refuse it
    with _deadline():
        with pytest.raises(Exception) as info:
            torch.load("/dev/null")
        assert "regular file" not in str(info.value)


# ---- 2: bounded reads ----


def test_huge_sparse_index_fails_fast(tmp_path):
    d = _sharded_dir(tmp_path / "d")
    with open(d / INDEX, "r+b") as f:
        f.truncate(4 << 30)
    t0 = time.monotonic()
    with pytest.raises(SafetensorError, match="larger than the limit"):
        torch.load(d)
    assert time.monotonic() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 << 20  # KiB: well under 4 GiB


def test_index_linked_to_dev_zero_fails_fast(tmp_path):
    d = _sharded_dir(tmp_path / "d")
    os.unlink(d / INDEX)
    os.symlink("/dev/zero", d / INDEX)
    with _deadline():
        with pytest.raises(SafetensorError, match="character device"):
            torch.load(d)


def _dcp_checkpoint(d):
    import torch.distributed.checkpoint as dcp
    from torch_safetensors.distributed import SafetensorsWriter

    sd = {"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, storage_writer=SafetensorsWriter(d))
    return sd


def test_dcp_index_is_bounded(tmp_path):
    from torch_safetensors.distributed import SafetensorsReader

    _dcp_checkpoint(tmp_path)
    with open(tmp_path / "dcp-index.json", "r+b") as f:
        f.truncate(4 << 30)
    with pytest.raises(SafetensorError, match="larger than the limit"):
        SafetensorsReader(tmp_path).read_metadata()
    os.unlink(tmp_path / "dcp-index.json")
    os.symlink("/dev/zero", tmp_path / "dcp-index.json")
    with _deadline():
        with pytest.raises(SafetensorError, match="character device"):
            SafetensorsReader(tmp_path).read_metadata()


# ---- 4: the DCP index must be consistent ----


def _edit_chunks(d, fqn, chunks):
    p = d / "dcp-index.json"
    doc = json.loads(p.read_text())
    doc["tensors"][fqn]["chunks"] = chunks(doc["tensors"][fqn]["chunks"])
    p.write_text(json.dumps(doc))


@pytest.mark.parametrize("how,message", [
    ("empty", "no chunks"),
    ("gap", "cover 8 of the tensor's 12"),
    ("overlap", "overlap"),
    ("duplicate", "overlap"),
])
def test_dcp_chunks_must_tile_the_tensor(tmp_path, how, message):
    from torch_safetensors.distributed import SafetensorsReader

    _dcp_checkpoint(tmp_path)

    def edit(chunks):
        (c,) = chunks
        if how == "empty":
            return []
        if how == "gap":
            return [dict(c, sizes=[2, 4])]
        if how == "overlap":
            return [dict(c, sizes=[2, 4]), dict(c, offsets=[1, 0], sizes=[2, 4])]
        return [c, dict(c)]

    _edit_chunks(tmp_path, "a", edit)
    with pytest.raises(SafetensorError, match=message):
        SafetensorsReader(tmp_path).read_metadata()


def test_dcp_split_chunks_that_tile_are_accepted(tmp_path):
    from torch_safetensors.distributed import SafetensorsReader

    _dcp_checkpoint(tmp_path)
    # split "a" (3 x 4) into columns: the same bytes are not there, but the index is valid
    _edit_chunks(tmp_path, "a", lambda cs: [dict(cs[0], offsets=[0, 0], sizes=[3, 2]),
                                             dict(cs[0], offsets=[0, 2], sizes=[3, 2])])
    md = SafetensorsReader(tmp_path).read_metadata()
    assert len(md.state_dict_metadata["a"].chunks) == 2


# ---- 5: no signal while parsing ----

_TRUNCATE_WHILE_PARSING = textwrap.dedent(r"""
    import json, os, random, struct, sys, threading, time
    import torch_safetensors as ts
    from torch_safetensors import _C
    p = sys.argv[1]
    header = json.dumps({"__metadata__": {"k": "x" * 40_000_000},
                         "t": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    blob = struct.pack("<Q", len(header)) + header + bytes(8)
    rng = random.Random(5)
    outcomes = set()
    for trial in range(12):
        with open(p, "wb") as f:
            f.write(blob)
        delay = rng.uniform(0, 0.03)
        cut = threading.Thread(target=lambda: (time.sleep(delay), os.truncate(p, 4096)))
        cut.start()
        try:
            _C.Reader(p, mmap=True).close()
            outcomes.add("ok")
        except ts.SafetensorError as e:
            outcomes.add("error")
        cut.join()
    print("survived", sorted(outcomes))
""")


def test_truncation_while_parsing_raises_no_sigbus(tmp_path):
    asan = os.environ.get("ASAN_OPTIONS", "")
    env = dict(os.environ, ASAN_OPTIONS=(asan + ":" if asan else "") + "handle_sigbus=0")
    r = subprocess.run([sys.executable, "-c", _TRUNCATE_WHILE_PARSING, str(tmp_path / "t.safetensors")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "survived" in r.stdout


# ---- 6: file objects whose seek() returns None ----


class _SeekReturnsNone(io.RawIOBase):
    """A wrapper like some streaming libraries': seek() returns None, tell() works."""

    def __init__(self, data: bytes):
        self._f = io.BytesIO(data)

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, b):
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, pos, whence=0):
        self._f.seek(pos, whence)

    def tell(self):
        return self._f.tell()


def test_fileobj_whose_seek_returns_none(tmp_path):
    sd = _state(3, 10)
    data = ts.save(sd)
    _equal(torch.load(_SeekReturnsNone(data)), sd)
    _equal(torch.load(_SeekReturnsNone(data), mmap=False), sd)
    buf = io.BytesIO()
    torch.save(sd, buf, format="pickle")
    _equal(torch.load(_SeekReturnsNone(buf.getvalue())), sd)


# ---- 7: too many shards to map ----

_MAP_EXHAUSTION = textwrap.dedent(r"""
    import ctypes, mmap, os, sys, torch, torch_safetensors as ts
    d = sys.argv[1]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    maps = []
    while True:  # alternating protections: neighbouring mappings never merge
        prot = mmap.PROT_READ if len(maps) % 2 else mmap.PROT_READ | mmap.PROT_WRITE
        p = libc.mmap(None, 4096, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if p in (None, ctypes.c_void_p(-1).value):
            break
        maps.append(p)
    for p in maps[-40:]:  # room for Python itself, not for 60 mappings more
        libc.munmap(p, 4096)
    del maps[-40:]
    try:
        torch.load(os.path.join(d, "ckpt"))
    except MemoryError as e:
        print("MemoryError:", e)
    else:
        print("loaded")
    for p in maps:
        libc.munmap(p, 4096)
    sd = torch.load(os.path.join(d, "ckpt"), mmap=False)
    print("mmap=False", len(sd))
""")


def test_too_many_shards_to_map_names_the_limit(tmp_path):
    ts.save_sharded({f"w{i}": torch.full((16,), float(i)) for i in range(60)}, tmp_path / "ckpt",
                    max_shard_size=64)
    r = subprocess.run([sys.executable, "-c", _MAP_EXHAUSTION, str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("MemoryError:"), lines
    assert "vm.max_map_count" in lines[0] and "mmap=False" in lines[0]
    assert lines[1] == "mmap=False 60"


# ---- 8: the short-record guard of legacy zips cannot be bypassed ----


def _short_record_zip(tmp_path, extra=()):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(100, dtype=torch.float32)}, good, format="pickle")
    with zipfile.ZipFile(good) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    record = next(n for n, _ in members if n.endswith("/data/0"))
    dst = tmp_path / "short.pt"
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as out:
        for name, data in members + list(extra):
            out.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)),
                         data[:8] if name == record else data)
    return dst


# a callable map_location: our C legacy reader leaves the file to torch, and the guard
# in front of torch's loader must hold on its own
_BY_TORCH = {"reader": None, "torch": lambda storage, location: storage}


@pytest.mark.parametrize("who", sorted(_BY_TORCH))
def test_short_record_guard_under_torchs_global_mmap(tmp_path, who):
    from torch.utils.serialization import config

    path = _short_record_zip(tmp_path)
    # plain assignment, not monkeypatch: pytest 9.2's undo deletes a config attribute
    old = config.load.mmap
    config.load.mmap = True
    try:
        with pytest.raises(RuntimeError, match="refusing to map"):
            torch.load(path, map_location=_BY_TORCH[who])
    finally:
        config.load.mmap = old


@pytest.mark.parametrize("who", sorted(_BY_TORCH))
@pytest.mark.parametrize("extra", ["other/data.pkl", "short/extra/data.pkl", "zzz/data.pkl"])
def test_extra_data_pkl_members_do_not_switch_the_guard_off(tmp_path, extra, who):
    path = _short_record_zip(tmp_path, extra=[(extra, b"\x80\x02}q\x00.")])
    # a member outside the archive folder makes torch refuse the file itself: its error
    # stands (a refusal either way, never the bytes after the record)
    with pytest.raises(RuntimeError, match="refusing to map|not in a subdirectory"):
        torch.load(path, mmap=True, map_location=_BY_TORCH[who])


@pytest.mark.parametrize("who", sorted(_BY_TORCH))
def test_data_pkl_differing_in_case_is_checked_too(tmp_path, who):
    # miniz (torch's zip reader) matches names without regard to case: an empty pickle
    # named DATA.PKL beside the real one must not hide the real one's claims
    # named DATA.PKL beside the real one: the one torch's lookup finds is the one checked
    from torch_safetensors import _torch

    for extra, torch_reads_extra in (("good/DATA.PKL", True), ("good/DATA.PKL", False)):
        members = [(extra, b"\x80\x02}q\x00.")]
        path = _short_record_zip(tmp_path, extra=members if torch_reads_extra else [])
        if not torch_reads_extra:
            # the real pickle under both names: whichever torch finds claims the short record
            with zipfile.ZipFile(path) as z:
                real = z.read("good/data.pkl")
            path = _short_record_zip(tmp_path, extra=[(extra, real)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = _torch._orig_load(path, mmap=True, weights_only=True)
        if want == {}:
            assert torch.load(path, mmap=True, map_location=_BY_TORCH[who]) == {}
        else:
            with pytest.raises(RuntimeError, match="refusing to map"):
                torch.load(path, mmap=True, map_location=_BY_TORCH[who])


# ---- issue 15, point 6: Hugging Face's legacy sharded checkpoints ----


def _legacy_shards(d, sd, per=2, prefix="pytorch_model"):
    os.makedirs(d, exist_ok=True)
    names = list(sd)
    groups = [names[i:i + per] for i in range(0, len(names), per)]
    weight_map = {}
    for k, group in enumerate(groups, 1):
        file = f"{prefix}-{k:05d}-of-{len(groups):05d}.bin"
        torch.save({n: sd[n] for n in group}, os.path.join(d, file), format="pickle")
        weight_map.update({n: file for n in group})
    with open(os.path.join(d, f"{prefix}.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("mmap", [None, True, False])
def test_legacy_sharded_directory_and_index_load_as_one_dict(tmp_path, mmap):
    sd = _state(5, 100)
    _legacy_shards(tmp_path, sd)
    _equal(torch.load(tmp_path, mmap=mmap), sd)
    got = torch.load(tmp_path / "pytorch_model.bin.index.json", mmap=mmap)
    assert list(got) == list(sd)
    _equal(got, sd)
    _equal(ts.load_sharded(tmp_path), sd)


def test_legacy_single_pytorch_model_bin_in_a_directory(tmp_path):
    sd = _state(3, 10)
    torch.save(sd, tmp_path / "pytorch_model.bin", format="pickle")
    _equal(torch.load(tmp_path), sd)


def test_directory_with_both_kinds_prefers_safetensors(tmp_path):
    old, new = _state(5, 100, seed=1), _state(5, 100, seed=2)
    _legacy_shards(tmp_path, old)
    ts.save_sharded(new, tmp_path, max_shard_size=1000)
    _equal(torch.load(tmp_path), new)
    _equal(torch.load(tmp_path / "pytorch_model.bin.index.json"), old)


def test_legacy_shards_keep_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    sd = _state(2, 10)
    _legacy_shards(tmp_path, sd)
    torch.save({"layer.0.weight": Evil(), "layer.1.weight": sd["layer.1.weight"]},
               tmp_path / "pytorch_model-00001-of-00001.bin", format="pickle")
    import pickle

    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path)


def test_legacy_shard_disagreeing_with_index_is_refused(tmp_path):
    sd = _state(4, 10)
    _legacy_shards(tmp_path, sd)
    torch.save({"other": torch.ones(1)}, tmp_path / "pytorch_model-00002-of-00002.bin", format="pickle")
    with pytest.raises(SafetensorError, match="does not hold it"):
        torch.load(tmp_path)


def test_legacy_shard_that_is_an_index_is_refused(tmp_path):
    sd = _state(2, 10)
    _legacy_shards(tmp_path, sd)
    # a shard that is the index itself: no recursion
    idx = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    idx["weight_map"] = {k: "pytorch_model.bin.index.json" for k in idx["weight_map"]}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(idx))
    with pytest.raises(SafetensorError, match="itself an index"):
        torch.load(tmp_path)


# ---- attacks: racing savers and loaders ----

_LOOPING_SAVER = textwrap.dedent(r"""
    import sys, time, torch, torch_safetensors as ts
    sign = float(sys.argv[2])
    a = {f"w{i}": torch.full((20_000,), sign * i) for i in range(6)}
    b = {f"w{i}": torch.full((20_000,), sign * i + 0.5) for i in range(6)}
    sizes = [160_000, 160_000, 240_000, 10**9]  # same count, another count, one file
    print("ready", flush=True)
    end = time.monotonic() + float(sys.argv[3])
    n = 0
    while time.monotonic() < end:
        ts.save_sharded(a if n % 2 else b, sys.argv[1], max_shard_size=sizes[n % len(sizes)])
        n += 1
    print("saves", n, flush=True)
""")


def _expected(sign):
    a = {f"w{i}": torch.full((20_000,), sign * i) for i in range(6)}
    b = {f"w{i}": torch.full((20_000,), sign * i + 0.5) for i in range(6)}
    return a, b


@pytest.mark.parametrize("savers", [1, 2])
def test_loaders_racing_savers_always_get_a_complete_checkpoint(tmp_path, savers):
    ts.save_sharded(_expected(1.0)[0], tmp_path, max_shard_size=160_000)
    signs = [1.0, -1.0][:savers]
    children = [subprocess.Popen([sys.executable, "-c", _LOOPING_SAVER, str(tmp_path), str(s), "4"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for s in signs]
    valid = [sd for s in signs for sd in _expected(s)]
    loads = 0
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
        while any(c.poll() is None for c in children):
            for mmap in (None, False):
                got = torch.load(tmp_path, mmap=mmap)
                assert any(_same(got, sd) for sd in valid), sorted(got)
                loads += 1
        for child in children:
            assert child.returncode == 0, child.stderr.read()[-2000:]
            assert int(child.stdout.read().split()[-1]) > 2
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
            child.stderr.close()
    assert loads > 5
    got = torch.load(tmp_path)
    assert any(_same(got, sd) for sd in valid)
    assert not [f for f in _files(tmp_path) if f.startswith(".")]


def test_shard_names_reused_while_loading_never_mix_two_saves(tmp_path, monkeypatch):
    # the race the looping savers hit by chance, made certain: after the loader has
    # read save 1's index and opened its first shard, save 2 completes (unique names,
    # removing save 1's standard-named shards) and save 3 writes the standard names
    # again; the loader's next shard open would read save 3's bytes under save 1's index
    a, b = _expected(1.0)
    c = {k: -v for k, v in a.items()}
    ts.save_sharded(a, tmp_path, max_shard_size=160_000)
    real = _sharded._load_shard
    saves = iter([b, c])

    def racing(*args, **kwargs):
        part = real(*args, **kwargs)
        nxt = next(saves, None)
        if nxt is not None and nxt is b:
            ts.save_sharded(b, tmp_path, max_shard_size=160_000)
            ts.save_sharded(next(saves), tmp_path, max_shard_size=160_000)
        return part

    monkeypatch.setattr(_sharded, "_load_shard", racing)
    got = torch.load(tmp_path)
    assert any(_same(got, sd) for sd in (a, b, c)), {k: float(v[0]) for k, v in got.items()}
    assert _same(got, c)  # the retry reads the checkpoint now in place


def test_a_checkpoint_replaced_at_every_attempt_is_refused_not_mixed(tmp_path, monkeypatch):
    a, b = _expected(1.0)
    ts.save_sharded(a, tmp_path, max_shard_size=160_000)
    real = _sharded._load_shard
    turn = [0]

    def always_racing(*args, **kwargs):
        part = real(*args, **kwargs)
        turn[0] += 1
        ts.save_sharded(a if turn[0] % 2 else b, tmp_path, max_shard_size=160_000)
        return part

    monkeypatch.setattr(_sharded, "_load_shard", always_racing)
    with pytest.raises(SafetensorError, match="another save replaced the checkpoint") as e:
        torch.load(tmp_path)
    assert e.value.code == "checkpoint_changed"


# ---- attacks: misbehaving file objects ----


def test_fileobj_exposing_another_files_descriptor_is_read_through_read(tmp_path):
    # a wrapper (decrypting, say) whose fileno() is its underlying file: same size,
    # other bytes; the values are what read() gives, never the descriptor's bytes
    a, b = {"x": torch.zeros(16)}, {"x": torch.ones(16)}
    ts.save_file(b, tmp_path / "b.safetensors")
    data = ts.save(a)
    assert len(data) == os.path.getsize(tmp_path / "b.safetensors")
    with open(tmp_path / "b.safetensors", "rb") as under:
        class Wrapper(io.BytesIO):
            def fileno(self):
                return under.fileno()

        _equal(torch.load(Wrapper(data)), a)


def test_ctrl_c_at_a_shard_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = _state(seed=1)
    ts.save_sharded(old, tmp_path, max_shard_size=10_000)
    before = {f: (tmp_path / f).read_bytes() for f in _files(tmp_path)}
    real = _save.save_safetensors
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(_save, "save_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ts.save_sharded(_state(seed=2), tmp_path, max_shard_size=10_000)
    assert {f: (tmp_path / f).read_bytes() for f in _files(tmp_path)} == before
    _equal(torch.load(tmp_path), old)


def test_dcp_shard_that_is_a_fifo_is_refused_at_once(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch_safetensors.distributed import SafetensorsReader

    sd = _dcp_checkpoint(tmp_path)
    (shard,) = os.listdir(tmp_path / "dcp-shards")
    _fifo_at(tmp_path / "dcp-shards" / shard)
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    with _deadline():
        with pytest.raises(BaseException) as info:  # DCP wraps it: CheckpointException
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(target, storage_reader=SafetensorsReader(tmp_path))
    text = str(info.value) + repr(getattr(info.value, "failures", ""))
    assert "not a regular file (a FIFO)" in text, text[-2000:]


def test_longest_prefix_resaves(tmp_path):
    prefix = "p" * (255 - len("-00001-of-00003.safetensors"))
    sd = _state(6, 1000)
    for seed in (1, 2):
        sd = _state(6, 1000, seed=seed)
        ts.save_sharded(sd, tmp_path, max_shard_size=10**9, prefix=prefix)
        _equal(torch.load(tmp_path / (prefix + ".safetensors")), sd)
    assert _files(tmp_path) == [prefix + ".safetensors"]
