"""Saves to and loads from file objects: streamed from and into tensor memory, every byte
written or an error, refusals before the first byte, bounded memory, and C loops that
survive Python code changing their input (issue 13 points 1-2, issue 11 points 10-11)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _C, _stream

SafetensorError = ts.SafetensorError

def _under_asan() -> bool:
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


# ASan's shadow memory and quarantine make RSS say nothing about our allocations
needs_plain_allocator = pytest.mark.skipif(_under_asan(), reason="RSS is not meaningful under ASan")


def sample() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(64, 33, generator=g),
        "t": torch.randn(40, 24, generator=g).t(),  # not contiguous: staged
        "h": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "s": torch.tensor(2.5),
        "z": torch.zeros(0, 3),
        "c": torch.complex(torch.randn(6, generator=g), torch.randn(6, generator=g)).conj(),
        "i": torch.arange(17, dtype=torch.int64)[::2],
    }


def _path_bytes(sd: dict) -> bytes:
    """The bytes a path save writes, read back from the file."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "ref.safetensors")
        torch.save(sd, p, format="safetensors")
        with open(p, "rb") as f:
            return f.read()


def same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        x, y = a[k], b[k]
        if x.is_conj():
            x = x.resolve_conj()
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x, y), k


class ShortRaw(io.RawIOBase):
    """A raw stream that takes at most `step` bytes per write (as the kernel does past
    2 GiB), with no fileno()."""

    def __init__(self, step: int):
        self.buf = bytearray()
        self.step = step
        self.calls = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.calls += 1
        n = min(self.step, len(b))
        self.buf += bytes(memoryview(b)[:n])
        return n


# ---- saving to file objects ----


def test_short_writes_are_resumed_and_every_byte_lands():
    sd = sample()
    raw = ShortRaw(4093)
    torch.save(sd, raw, format="safetensors")
    assert bytes(raw.buf) == _path_bytes(sd)
    assert raw.calls > len(raw.buf) // 4093
    same(sd, torch.load(io.BytesIO(bytes(raw.buf))))


def test_unbuffered_open_file_gets_the_same_bytes(tmp_path):
    sd = sample()
    p = tmp_path / "f.safetensors"
    with open(p, "wb", buffering=0) as f:
        torch.save(sd, f, format="safetensors")
    assert p.read_bytes() == _path_bytes(sd)
    with open(p, "wb") as f:  # BufferedWriter
        f.write(b"")
        torch.save(sd, f, format="safetensors")
    assert p.read_bytes() == _path_bytes(sd)


def test_buffered_writer_over_a_raw_stream_without_fileno():
    sd = sample()
    raw = ShortRaw(1 << 20)
    with io.BufferedWriter(raw, buffer_size=4096) as f:
        torch.save(sd, f, format="safetensors")
        f.flush()
        assert bytes(raw.buf) == _path_bytes(sd)


def test_staging_in_several_blocks(monkeypatch):
    monkeypatch.setattr(_stream, "STAGE_BYTES", 256)
    big = torch.randn(300, 50).t()  # 50 rows of 1200 bytes: one row per block
    wide = torch.randn(7, 1000)[:, ::3]  # rows over the block size
    sd = {"a": big, "b": wide, "c": torch.randn(1000)[::2], "s": torch.tensor(1.0)[()]}
    out = io.BytesIO()
    torch.save(sd, out, format="safetensors")
    assert out.getvalue() == _path_bytes(sd)


class NonBlockingRaw(io.RawIOBase):
    def __init__(self, accept: int):
        self.accept = accept
        self.got = 0

    def writable(self) -> bool:
        return True

    def write(self, b):
        if self.got >= self.accept:
            return None  # would block
        n = min(len(b), self.accept - self.got, 100)
        self.got += n
        return n


def test_none_from_a_non_blocking_raw_stream_raises():
    raw = NonBlockingRaw(accept=250)
    with pytest.raises(BlockingIOError, match="incomplete"):
        torch.save(sample(), raw, format="safetensors")
    assert raw.got == 250


class Returns:
    def __init__(self, value):
        self.value = value
        self.got = bytearray()

    def write(self, b):
        self.got += bytes(b)
        return self.value(b) if callable(self.value) else self.value


@pytest.mark.parametrize(
    "value, exc",
    [(0, OSError), (-1, OSError), (lambda b: len(b) + 1, OSError), ("x", TypeError), (1.0, TypeError)],
)
def test_a_write_that_returns_nonsense_raises(value, exc):
    with pytest.raises(exc):
        torch.save({"a": torch.ones(3)}, Returns(value), format="safetensors")


def test_a_file_like_whose_write_returns_none_wrote_everything():
    f = Returns(None)
    sd = sample()
    torch.save(sd, f, format="safetensors")
    assert bytes(f.got) == _path_bytes(sd)


class Recorder(io.RawIOBase):
    def __init__(self):
        self.calls = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.calls += 1
        return len(b)


@pytest.mark.parametrize(
    "bad",
    [
        {"a": torch.ones(2), "b": lambda: 0},
        {"a": torch.ones(2), "b": threading.Lock()},
        {"a": torch.ones(2), "b": (i for i in range(3))},
        {"a": torch.ones(2), "b": torch.ones(2, dtype=torch.float8_e4m3fn).view(torch.bits8)},
    ],
)
def test_refusals_come_before_the_first_byte(bad):
    f = Recorder()
    with pytest.raises(TypeError):
        torch.save(bad, f, format="safetensors")
    assert f.calls == 0


def test_metadata_refused_before_the_first_byte():
    f = Recorder()
    with pytest.raises(TypeError):
        torch.save({"a": torch.ones(2)}, f, format="safetensors", metadata={"k": 1})
    assert f.calls == 0


def test_write_sees_tensor_memory_not_a_copy():
    t = torch.arange(1 << 16, dtype=torch.float32)
    seen = []

    class Spy(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            m = memoryview(b)
            seen.append((m.nbytes, m.readonly))
            return m.nbytes

    torch.save({"t": t}, Spy(), format="safetensors")
    assert (t.numel() * 4, True) in seen


def test_a_writer_that_keeps_the_buffer_reads_valid_memory():
    kept = []

    class Keeper(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            kept.append(b)  # breaks the io contract: must stay memory-safe
            return len(b)

    sd = {"t": torch.arange(1000.0), "u": torch.arange(64.0).reshape(8, 8).t()}
    torch.save(sd, Keeper(), format="safetensors")
    del sd
    import gc

    gc.collect()
    assert sum(memoryview(b).nbytes for b in kept) > 4000
    assert bytes(kept[1])[:8] == bytes(torch.arange(2.0).numpy().tobytes())


def test_tensor_memory_refuses_what_is_not_contiguous_cpu():
    with pytest.raises(ValueError):
        _C.tensor_memory(torch.ones(3, 3).t())
    with pytest.raises(ValueError):
        _C.tensor_memory(torch.ones(3, device="meta"))
    with pytest.raises(TypeError):
        _C.tensor_memory(b"abc")
    span = _C.tensor_memory(torch.ones(3))
    assert memoryview(span).readonly
    t = torch.zeros(4, dtype=torch.int16)
    memoryview(_C.tensor_memory(t, writable=True))[:2] = b"\x05\x00"
    assert t[0] == 5


# ---- loading from streams ----


class NoFileno(io.RawIOBase):
    """A seekable raw stream over bytes, without fileno()."""

    def __init__(self, data: bytes, step: int = 1 << 30):
        self.data = data
        self.pos = 0
        self.step = step

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, off, whence=0):
        self.pos = [off, self.pos + off, len(self.data) + off][whence]
        return self.pos

    def readinto(self, b):
        m = memoryview(b)
        n = min(len(m), self.step, len(self.data) - self.pos)
        m[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


class Pipe(io.RawIOBase):
    """A non-seekable stream with only read(), handing out small pieces."""

    def __init__(self, data: bytes, step: int = 977):
        self.data = data
        self.pos = 0
        self.step = step

    def readable(self):
        return True

    def seekable(self):
        return False

    def read(self, n=-1):
        n = self.step if n < 0 else min(n, self.step)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    readinto = None  # type: ignore[assignment]


@pytest.mark.parametrize("kind", ["bytesio", "nofileno", "short-reads", "buffered", "pipe", "os-pipe"])
def test_load_from_streams(kind):
    sd = sample()
    data = _path_bytes(sd)
    if kind == "bytesio":
        f = io.BytesIO(data)
    elif kind == "nofileno":
        f = NoFileno(data)
    elif kind == "short-reads":
        f = NoFileno(data, step=333)
    elif kind == "buffered":
        f = io.BufferedReader(NoFileno(data), buffer_size=512)
    elif kind == "pipe":
        f = Pipe(data)
    else:
        r, w = os.pipe()

        def feed():
            with os.fdopen(w, "wb") as g:
                g.write(data)

        threading.Thread(target=feed, daemon=True).start()
        f = os.fdopen(r, "rb")
    out = torch.load(f)
    same(sd, out)
    if kind in ("bytesio", "nofileno"):
        assert f.tell() == len(data)


def test_stream_after_other_bytes_and_followed_by_more():
    data = _path_bytes({"a": torch.arange(5.0)})
    f = Pipe(b"junk" + data + b"next")
    assert f.read(4) == b"junk"
    assert torch.equal(torch.load(f)["a"], torch.arange(5.0))
    assert f.read(10) == b"next"  # a non-seekable stream is read exactly to the file's end


def test_bytesio_load_owns_its_tensors():
    data = _path_bytes({"a": torch.arange(5.0)})
    buf = io.BytesIO(data)
    out = torch.load(buf)
    buf.seek(0)
    buf.truncate()  # the tensors do not pin the BytesIO's buffer
    buf.write(b"x" * 100)
    assert torch.equal(out["a"], torch.arange(5.0))
    out["a"] += 1  # writable, and independent of the stream
    assert torch.equal(out["a"], torch.arange(5.0) + 1)


def test_nested_checkpoint_and_map_location_from_a_stream():
    obj = {"model": {"w": torch.ones(2, 2)}, "step": 3, "names": ["a", "b"]}
    data = io.BytesIO()
    torch.save(obj, data, format="safetensors")
    raw = data.getvalue()
    got = torch.load(Pipe(raw))
    assert got["step"] == 3 and got["names"] == ["a", "b"]
    assert torch.equal(got["model"]["w"], torch.ones(2, 2))
    meta = torch.load(Pipe(raw), map_location="meta")
    assert meta["model"]["w"].device.type == "meta"
    calls = []
    got = torch.load(NoFileno(raw), map_location=lambda s, loc: calls.append(loc))
    assert calls == ["cpu"] and torch.equal(got["model"]["w"], torch.ones(2, 2))


def _file(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


@pytest.mark.parametrize("kind", ["pipe", "nofileno"])
@pytest.mark.parametrize(
    "data, code",
    [
        (b"\x01\x00", "too_small"),
        ((200_000_000).to_bytes(8, "little") + b"{}", "header_too_large"),
        ((50).to_bytes(8, "little") + b'{"a":', "truncated"),
        (_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "truncated"),
        (_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 12), "size_mismatch"),
        (_file({"a": {"dtype": "X9", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16), "dtype"),
    ],
)
def test_malformed_streams_raise_safetensor_error(kind, data, code):
    f = Pipe(data) if kind == "pipe" else NoFileno(data)
    with pytest.raises(SafetensorError) as e:
        torch.load(f, format="safetensors")
    if kind == "pipe" or code not in ("truncated", "header_too_large"):
        assert e.value.code == code, e.value
    else:  # a seekable stream's size is known: the header is checked against it first
        assert e.value.code in ("header_past_end", "file_length", code), e.value


def test_seekable_stream_with_trailing_bytes_is_refused():
    data = _file({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"ab") + b"xx"
    with pytest.raises(SafetensorError) as e:
        torch.load(NoFileno(data), format="safetensors")
    assert e.value.code == "file_length"


def test_a_huge_claim_on_a_short_stream_allocates_nothing_large():
    claim = 1 << 40  # 1 TiB claimed, 16 bytes present
    data = _file({"a": {"dtype": "U8", "shape": [claim], "data_offsets": [0, claim]}}, b"x" * 16)
    with pytest.raises(SafetensorError) as e:
        torch.load(Pipe(data))
    assert e.value.code in ("truncated", "too_large")
    with pytest.raises(SafetensorError):  # seekable: refused against the size, before allocating
        torch.load(NoFileno(data))


def test_non_seekable_stream_that_is_not_safetensors_says_why():
    """torch's own exception for a file object it cannot seek (code catches it by class),
    with a note that such a stream can only hold safetensors here."""
    from torch_safetensors import _torch

    buf = io.BytesIO()
    torch.save({"a": torch.ones(2)}, buf)  # torch's zip
    with pytest.raises(Exception) as theirs:
        _torch._orig_load(Pipe(buf.getvalue()))
    with pytest.raises(type(theirs.value), match="seekable") as ours:
        torch.load(Pipe(buf.getvalue()))
    assert str(ours.value) == str(theirs.value)
    assert any("can only hold safetensors" in n for n in getattr(ours.value, "__notes__", [""]))


def test_non_seekable_stream_of_damaged_safetensors_is_our_error():
    buf = io.BytesIO()
    torch.save({"a": torch.ones(2)}, buf, format="safetensors")
    with pytest.raises(SafetensorError, match="ended inside"):
        torch.load(Pipe(buf.getvalue()[:-3]))


class NonBlockingReader(io.RawIOBase):
    def readable(self):
        return True

    def seekable(self):
        return False

    def readinto(self, b):
        return None


def test_non_blocking_reader_raises():
    with pytest.raises(BlockingIOError):
        torch.load(NonBlockingReader(), format="safetensors")


class Overreader:
    """A stream whose read() hands back more bytes than it was asked for."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def read(self, n=-1):
        chunk = self.data[self.pos : self.pos + n + 5]
        self.pos += len(chunk)
        return chunk


@pytest.mark.parametrize("fmt", [None, "safetensors"])
def test_a_stream_that_reads_more_than_asked_is_an_io_error(fmt):
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf, format="safetensors")
    with pytest.raises(OSError, match=r"read\(8\) returned 13 bytes"):
        torch.load(Overreader(buf.getvalue()), format=fmt)


# ---- memory: extra peak RSS over the model, each in a fresh process ----

MEM_SCRIPT = textwrap.dedent(
    r"""
    import io, os, resource, sys, torch, torch_safetensors as ts
    kind, path, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
    n = mib << 20
    def rss():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) * 1024
    def peak():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
    class Raw(io.RawIOBase):
        def __init__(self): self.n = 0
        def writable(self): return True
        def write(self, b):
            self.n += memoryview(b).nbytes
            return memoryview(b).nbytes
    class NoFd(io.RawIOBase):
        def __init__(self, f): self.f = f
        def readable(self): return True
        def seekable(self): return self.f.seekable()
        def seek(self, *a): return self.f.seek(*a)
        def tell(self): return self.f.tell()
        def readinto(self, b): return self.f.readinto(b)
    if kind.startswith("save"):
        sd = {f"t{i}": torch.ones(n // 16 // 4) for i in range(16)}
        if kind == "save-bytesio":
            out = io.BytesIO()
            out.write(b"\0" * (n + 4096)); out.seek(0)  # the BytesIO's own memory, up front
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = rss()
        if kind == "save-file":
            with open(path, "wb") as f:
                torch.save(sd, f, format="safetensors")
        elif kind == "save-raw":
            with io.BufferedWriter(Raw()) as f:
                torch.save(sd, f, format="safetensors")
        else:
            torch.save(sd, out, format="safetensors")
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = rss()
        if kind == "load-bytesio":
            with open(path, "rb") as f:
                data = io.BytesIO(f.read())
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = rss()
            sd = torch.load(data)
        elif kind == "load-pipe":
            r, w = os.pipe()
            import threading
            def feed():
                with open(path, "rb") as src, os.fdopen(w, "wb") as dst:
                    while True:
                        b = src.read(1 << 20)
                        if not b: break
                        dst.write(b)
            threading.Thread(target=feed).start()
            with os.fdopen(r, "rb") as f:
                sd = torch.load(f)
        else:
            with open(path, "rb", buffering=0) as raw:
                sd = torch.load(io.BufferedReader(NoFd(raw)))
        assert sum(t.numel() * t.element_size() for t in sd.values()) == n
    print((peak() - base) / n)
    """
)


def _extra(kind: str, path: str, mib: int = 64) -> float:
    r = subprocess.run([sys.executable, "-c", MEM_SCRIPT, kind, str(path), str(mib)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.strip())


@needs_plain_allocator
@pytest.mark.parametrize("kind", ["save-file", "save-raw", "save-bytesio"])
def test_save_to_file_objects_adds_at_most_a_tenth(tmp_path, kind):
    extra = _extra(kind, tmp_path / "m.safetensors")
    assert extra <= 0.1, extra


@needs_plain_allocator
@pytest.mark.parametrize("kind", ["load-bytesio", "load-pipe", "load-nofileno"])
def test_load_from_streams_adds_at_most_1_1x(tmp_path, kind):
    p = tmp_path / "m.safetensors"
    torch.save({f"t{i}": torch.ones((64 << 20) // 16 // 4) for i in range(16)}, p, format="safetensors")
    extra = _extra(kind, p)
    assert extra <= 1.1, extra


# ---- the C save loop against Python code that changes its input (issue 11.11) ----


class Meddler(torch.Tensor):
    """A tensor subclass whose torch functions change a dict while save reads it."""

    target: dict = {}
    action = "add"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        d = Meddler.target
        if Meddler.action == "add":
            for i in range(50):
                d[f"extra{i}_{len(d)}"] = torch.ones(1)
        elif Meddler.action == "remove":
            for k in list(d)[:3]:
                d.pop(k, None)
        elif Meddler.action == "clear":
            d.clear()
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("action", ["add", "remove", "clear"])
def test_subclass_changing_the_dict_raises_runtime_error(tmp_path, action):
    d = {f"t{i}": torch.ones(3) for i in range(5)}
    d["m"] = torch.ones(2).as_subclass(Meddler)
    d.update({f"u{i}": torch.ones(3) for i in range(5)})
    Meddler.target, Meddler.action = d, action
    for target in (tmp_path / "x.safetensors", None):
        with pytest.raises(RuntimeError, match="changed size"):
            if target is None:
                _C.save(d, None)
            else:
                _C.save(d, None, str(target))
        d.clear() if action != "clear" else None
        d.update({f"t{i}": torch.ones(3) for i in range(5)})
        d["m"] = torch.ones(2).as_subclass(Meddler)
    assert not (tmp_path / "x.safetensors").exists()


def test_subclass_clearing_the_metadata_raises_runtime_error():
    meta = {f"k{i}": f"v{i}" * 10 for i in range(20)}
    d = {"m": torch.ones(2).as_subclass(Meddler), "a": torch.ones(3)}
    Meddler.target, Meddler.action = meta, "clear"
    with pytest.raises(RuntimeError, match="changed size"):
        _C.save(d, meta)


def test_torch_function_mode_changing_the_dict_raises():
    from torch.overrides import TorchFunctionMode

    d = {f"t{i}": torch.ones(3) for i in range(10)}

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if d:
                d.pop(next(iter(d)))
            return func(*args, **(kwargs or {}))

    with Mode():
        with pytest.raises(RuntimeError, match="changed size"):
            _C.save(d, None)
        d2 = {f"t{i}": torch.ones(3) for i in range(10)}
        d = d2
        with pytest.raises(RuntimeError, match="changed size"):
            _C.plain_flat(d2)


class EvilName(str):
    """A str whose hash changes the list of names it came from."""

    victim: list = []

    def __hash__(self):
        EvilName.victim.clear()
        return str.__hash__(self)


def test_reader_tensors_survive_a_names_list_that_shrinks():
    data = _path_bytes({f"t{i}": torch.full((2,), float(i)) for i in range(8)})
    r = _C.Reader(data=data)
    names = [EvilName(f"t{i}") for i in range(8)]
    EvilName.victim = names
    out = r.tensors(names)
    assert len(out) == 8 and torch.equal(out["t7"], torch.full((2,), 7.0))
