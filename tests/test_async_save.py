"""async_save: values snapshotted at the call, written in the background in call order,
refusals at once, errors through the future, pooled buffers, exit behaviour, and
torch.distributed.checkpoint.async_save with our DCP writer (issue 13 point 3)."""
from __future__ import annotations

import concurrent.futures
import io
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _async

def _under_asan() -> bool:
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


# ASan's shadow memory and quarantine make RSS say nothing about our allocations
needs_plain_allocator = pytest.mark.skipif(_under_asan(), reason="RSS is not meaningful under ASan")


def model(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(128, 64, generator=g),
        "t": torch.randn(32, 16, generator=g).t(),
        "h": torch.randn(9, generator=g).to(torch.bfloat16),
        "i": torch.arange(10, dtype=torch.int64),
        "s": torch.tensor(3.0),
        "z": torch.zeros(0),
        "c": torch.complex(torch.randn(4, generator=g), torch.randn(4, generator=g)).conj(),
        "f4": torch.zeros(3, 2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
    }


def clone(sd: dict) -> dict:
    return {k: v.resolve_conj().clone() for k, v in sd.items()}


def equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        x, y = a[k].resolve_conj(), b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x.view(torch.uint8) if x.dtype == torch.float4_e2m1fn_x2 else x,
                           y.view(torch.uint8) if y.dtype == torch.float4_e2m1fn_x2 else y), k


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_same_bytes_as_a_synchronous_save(tmp_path):
    sd = model()
    torch.save(sd, tmp_path / "sync.safetensors", format="safetensors", metadata={"a": "b"})
    fut = ts.async_save(sd, tmp_path / "async.safetensors", metadata={"a": "b"})
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(timeout=60) is None
    assert file_bytes(tmp_path / "async.safetensors") == file_bytes(tmp_path / "sync.safetensors")


def test_nested_objects_and_ties(tmp_path):
    w = torch.randn(4, 4)
    obj = {"model": {"a": w, "b": w, "v": w[1]}, "step": 7, "lr": [0.1, None]}
    ts.async_save(obj, tmp_path / "n.safetensors").result(timeout=60)
    out = torch.load(tmp_path / "n.safetensors")
    assert out["step"] == 7 and out["lr"] == [0.1, None]
    assert out["model"]["a"].data_ptr() == out["model"]["b"].data_ptr()
    assert torch.equal(out["model"]["v"], w[1])


class Gate(io.RawIOBase):
    """A file object whose first write waits until the test opens the gate."""

    def __init__(self):
        self.gate = threading.Event()
        self.buf = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.gate.wait(30)
        self.buf += bytes(b)
        return len(b)


def test_values_may_change_the_moment_it_returns(tmp_path):
    sd = model()
    before = clone(sd)
    gate = Gate()
    fut = ts.async_save(sd, gate)
    with torch.no_grad():
        for k, v in sd.items():
            if v.is_floating_point() and v.dtype != torch.float4_e2m1fn_x2:
                v.add_(100)
            elif v.dtype == torch.int64:
                v.add_(5)
    assert not fut.done()
    gate.gate.set()
    fut.result(timeout=60)
    equal(before, torch.load(io.BytesIO(bytes(gate.buf))))


def test_path_save_holds_values_from_the_call(tmp_path):
    sd = {"a": torch.zeros(1 << 20)}
    fut = ts.async_save(sd, tmp_path / "v.safetensors")
    sd["a"].fill_(7)
    fut.result(timeout=60)
    assert torch.count_nonzero(torch.load(tmp_path / "v.safetensors")["a"]) == 0


def test_two_saves_to_one_path_land_in_call_order(tmp_path):
    p = tmp_path / "o.safetensors"
    futs = [ts.async_save({"x": torch.full((1000,), float(i))}, p) for i in range(5)]
    for f in futs:
        f.result(timeout=60)
    assert torch.equal(torch.load(p)["x"], torch.full((1000,), 4.0))


@pytest.mark.parametrize(
    "bad",
    [
        {"a": torch.ones(2), "b": lambda: 0},
        {"a": torch.ones(2), "b": threading.Lock()},
        {"a": torch.ones(3), "b": (i for i in range(3))},
    ],
)
def test_refusals_are_raised_at_once_before_copying(tmp_path, bad):
    ts.release_async_buffers()
    p = tmp_path / "r.safetensors"
    with pytest.raises(TypeError):
        ts.async_save(bad, p)
    assert not p.exists()
    assert _async._pool.idle_bytes() == 0  # no snapshot buffer was made


def test_refusal_names_the_path(tmp_path):
    with pytest.raises(TypeError, match=r"opt\.hook"):
        ts.async_save({"w": torch.empty(3), "opt": {"hook": lambda: 0}}, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_bad_target_and_metadata_refused_at_once(tmp_path):
    with pytest.raises(TypeError):
        ts.async_save({"a": torch.ones(1)}, 42)
    with pytest.raises(TypeError):
        ts.async_save({"a": torch.ones(1)}, tmp_path / "x", metadata={"k": 1})


def test_write_errors_come_through_the_future(tmp_path):
    fut = ts.async_save({"a": torch.ones(3)}, tmp_path / "missing-dir" / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        fut.result(timeout=60)

    class Broken(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raise OSError(28, "No space left on device")

    fut = ts.async_save({"a": torch.ones(3)}, Broken())
    with pytest.raises(OSError, match="No space"):
        fut.result(timeout=60)


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    p = tmp_path / "k.safetensors"
    torch.save({"a": torch.ones(3)}, p, format="safetensors")
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("running as root: the directory stays writable")
        fut = ts.async_save({"a": torch.zeros(3)}, p)
        with pytest.raises(PermissionError):
            fut.result(timeout=60)
    finally:
        os.chmod(tmp_path, 0o700)
    assert torch.equal(torch.load(p)["a"], torch.ones(3))


def test_buffers_are_pooled_and_released(tmp_path):
    ts.release_async_buffers()
    sd = {"a": torch.ones(1000)}
    ts.async_save(sd, tmp_path / "1.safetensors").result(timeout=60)
    size1 = os.path.getsize(tmp_path / "1.safetensors")  # the buffer holds the whole file, and a little room
    assert _async._pool.idle_bytes() == _async._capacity(size1)
    ts.async_save(sd, tmp_path / "2.safetensors").result(timeout=60)
    assert _async._pool.idle_bytes() == _async._capacity(size1)
    ts.async_save({"b": torch.ones(10)}, tmp_path / "3.safetensors").result(timeout=60)
    assert _async._pool.idle_bytes() == _async._capacity(size1)  # the larger buffer, reused (issue 22)
    assert ts.release_async_buffers() == _async._capacity(size1)
    assert _async._pool.idle_bytes() == 0


def test_snapshot_copies_only_contiguous_cpu_tensors():
    from torch_safetensors import _C

    buf = torch.zeros(64, dtype=torch.uint8)
    a, b = torch.arange(4, dtype=torch.int32), torch.arange(6.0).reshape(2, 3).t()
    rest = _C.snapshot([(a, 8, 16), (b, 24, 24)], _C.tensor_memory(buf, writable=True))
    assert rest == [1]
    assert bytes(buf[8:24].numpy()) == a.numpy().tobytes() and not buf[24:].any()
    with pytest.raises(ValueError):
        _C.snapshot([(a, 56, 16)], _C.tensor_memory(buf, writable=True))
    with pytest.raises(TypeError):
        _C.snapshot([(a, 0)], _C.tensor_memory(buf, writable=True))
    with pytest.raises(TypeError):  # the destination must be writable
        _C.snapshot([(a, 0, 16)], _C.tensor_memory(buf))
    assert _C.snapshot([(a, 0, 12)], _C.tensor_memory(buf, writable=True)) == [0]  # size mismatch


def test_large_snapshot_split_over_threads_is_exact():
    from torch_safetensors import _C

    # over the parallel threshold, odd sizes so the shares split inside tensors
    g = torch.Generator().manual_seed(1)
    ts_ = [torch.randint(0, 255, (n,), dtype=torch.uint8, generator=g)
           for n in (33_554_467, 7, 0, 25_165_843, 12_582_917)]
    skip = torch.arange(1000.0)[::2]  # strided: skipped, its bytes left as they were
    items, off = [], 5
    for t in ts_[:2] + [skip] + ts_[2:]:
        n = t.numel() * t.element_size()
        items.append((t, off, n))
        off += n
    buf = torch.full((off + 3,), 0xAB, dtype=torch.uint8)
    rest = _C.snapshot(items, _C.tensor_memory(buf, writable=True))
    assert rest == [2]
    for t, o, n in items:
        if t is skip:
            assert bool((buf[o : o + n] == 0xAB).all())
        else:
            assert torch.equal(buf[o : o + n], t)
    assert bool((buf[:5] == 0xAB).all()) and bool((buf[off:] == 0xAB).all())


def test_pooled_buffer_is_reused(tmp_path):
    ts.release_async_buffers()
    sd = {"a": torch.ones(1000)}
    ts.async_save(sd, tmp_path / "1.safetensors").result(timeout=60)
    (buf,) = [b for bufs in _async._pool._free.values() for b in bufs]
    ptr = buf.data_ptr()
    del buf
    ts.async_save(sd, tmp_path / "2.safetensors").result(timeout=60)
    (buf,) = [b for bufs in _async._pool._free.values() for b in bufs]
    assert buf.data_ptr() == ptr


def test_idle_buffers_are_freed(tmp_path, monkeypatch):
    monkeypatch.setattr(_async, "IDLE_SECONDS", 0.2)
    ts.release_async_buffers()
    ts.async_save({"a": torch.ones(100)}, tmp_path / "i.safetensors").result(timeout=60)
    deadline = __import__("time").monotonic() + 20
    while _async._pool.idle_bytes() and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.05)
    assert _async._pool.idle_bytes() == 0


def test_durable_to_a_file_object(tmp_path):
    p = tmp_path / "d.safetensors"
    with open(p, "wb") as f:
        ts.async_save(model(), f, durable=True).result(timeout=60)
    equal(clone(model()), torch.load(p))


EXIT_SCRIPT = textwrap.dedent(
    r"""
    import os, sys, torch, torch_safetensors as ts
    path, how = sys.argv[1], sys.argv[2]
    sd = {f"t{i}": torch.full((1 << 20,), float(i)) for i in range(32)}  # 128 MiB
    ts.async_save(sd, path)
    if how == "kill":
        os.kill(os.getpid(), 9)
    # "exit": return at once; the interpreter completes the save before exiting
    """
)


def test_a_save_in_flight_at_exit_is_completed(tmp_path):
    p = tmp_path / "e.safetensors"
    r = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(p), "exit"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = torch.load(p)
    assert len(out) == 32 and torch.equal(out["t31"], torch.full((1 << 20,), 31.0))


def test_a_killed_save_leaves_the_previous_file(tmp_path):
    p = tmp_path / "k.safetensors"
    torch.save({"old": torch.ones(4)}, p, format="safetensors")
    r = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(p), "kill"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9
    out = torch.load(p)
    assert list(out) == ["old"] or len(out) == 32  # the old file, or the complete new one


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_async_save_works_in_a_forked_child(tmp_path):
    ts.async_save({"a": torch.ones(3)}, tmp_path / "parent.safetensors").result(timeout=60)
    pid = os.fork()
    if pid == 0:  # the child: the parent's writer thread does not exist here
        code = 1
        try:
            ts.async_save({"a": torch.full((3,), 2.0)}, tmp_path / "child.safetensors").result(timeout=30)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert torch.equal(torch.load(tmp_path / "child.safetensors")["a"], torch.full((3,), 2.0))


MEM_SCRIPT = textwrap.dedent(
    r"""
    import sys, torch, torch_safetensors as ts
    path = sys.argv[1]
    n = 64 << 20
    sd = {f"t{i}": torch.ones(n // 16 // 4) for i in range(16)}
    def field(name):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = field("VmRSS")
    for _ in range(3):
        ts.async_save(sd, path).result()
    print((field("VmHWM") - base) / n)
    """
)


@needs_plain_allocator
def test_extra_memory_is_one_snapshot(tmp_path):
    r = subprocess.run([sys.executable, "-c", MEM_SCRIPT, str(tmp_path / "m.safetensors")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) <= 1.1, r.stdout


def test_dcp_async_save_with_our_writer(tmp_path):
    import torch.distributed.checkpoint as dcp

    from torch_safetensors.distributed import SafetensorsReader, SafetensorsWriter

    sd = {"w": torch.zeros(1 << 20), "b": torch.arange(4.0)}
    fut = dcp.async_save(sd, storage_writer=SafetensorsWriter(str(tmp_path / "ckpt")), no_dist=True)
    sd["w"].fill_(1)  # DCP stages a copy before returning
    fut.result(timeout=120)
    out = {"w": torch.full((1 << 20,), 5.0), "b": torch.zeros(4)}
    dcp.load(out, storage_reader=SafetensorsReader(str(tmp_path / "ckpt")), no_dist=True)
    assert torch.count_nonzero(out["w"]) == 0 and torch.equal(out["b"], sd["b"])


def test_a_fifo_target_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="FIFO"):
        ts.async_save({"w": torch.ones(2)}, fifo)
    with pytest.raises(OSError, match="FIFO"):  # also through a symlink to it
        os.symlink(fifo, tmp_path / "link")
        ts.async_save({"w": torch.ones(2)}, tmp_path / "link")
    # the writer was never held: a normal save right after completes
    ts.async_save({"w": torch.ones(2)}, tmp_path / "ok.safetensors").result(timeout=60)
