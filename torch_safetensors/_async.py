"""async_save: a checkpoint that does not stall training.

The call plans the file (every refusal is raised here, before anything is copied),
copies the tensors' bytes into one snapshot buffer and returns a Future. A single
background thread then writes the snapshot with the same writer as a synchronous save
(atomic rename for paths, the GIL released around I/O), so the caller may change every
tensor in place as soon as the call returns.

- Ordering: one writer thread runs saves in call order; two saves to the same path
  land in call order.
- Memory: at most one snapshot exists. A call made while the previous save is still
  writing first waits for it, so the extra memory stays one model's size. The pool
  keeps at most one idle snapshot buffer, a little larger than the save that used it
  (``_SLACK``: a header that grows by a few bytes still fits); the next save reuses it
  if it fits, else it is freed before a new one is allocated. So the pool never holds
  more than about 1.0x the largest recent save. It is freed after ``IDLE_SECONDS``
  without a save, or at once by ``release_async_buffers()``.
- Interpreter exit: saves in flight or queued are completed before the interpreter
  exits (the writer thread is joined at exit, as ``concurrent.futures`` does). A
  process killed mid-write leaves the previous file intact: paths are written to a
  temporary file and renamed over the target only when complete.
- Accelerators: tensors on an accelerator are copied into a pinned host buffer with
  non-blocking copies on the current stream; the call returns once an event is
  recorded after them, and the writer waits for that event before writing.
"""
from __future__ import annotations

import concurrent.futures
import errno
import os
import stat
import threading
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _C, _checkpoint, _checksums, _save, _stream

__all__ = ["IDLE_SECONDS", "async_save", "release_async_buffers"]

# a pooled snapshot buffer unused for this long is freed
IDLE_SECONDS = 30.0


# ---- snapshot buffers ----


def _capacity(nbytes: int) -> int:
    """A new buffer's size: the save's, plus a little room (at most 1/64, 64 MiB) for the
    next save's header to grow, rounded up to a page."""
    room = min(nbytes // 64, 64 << 20)
    return -(-(nbytes + room) // 4096) * 4096


class _Pool:
    """At most one idle snapshot buffer (a uint8 tensor at least as large as a save)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: Dict[Tuple[int, bool], List[torch.Tensor]] = {}  # at most one entry
        self._timer: Optional[threading.Timer] = None
        self._generation = 0

    def take(self, nbytes: int, pinned: bool) -> torch.Tensor:
        """A buffer of at least nbytes: the idle one if it fits (larger is fine), else a
        new one, allocated after the idle one is freed."""
        with self._lock:
            self._generation += 1
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            key, bufs = next(iter(self._free.items()), ((0, pinned), []))
            self._free.clear()  # a buffer too small is freed before the new allocation
            if bufs and key[0] >= nbytes and key[1] == pinned:
                return bufs[0]
            del bufs
        return torch.empty(_capacity(nbytes), dtype=torch.uint8, pin_memory=pinned)

    def give(self, buf: torch.Tensor, pinned: bool) -> None:
        with self._lock:
            # one idle buffer in all: saves run one at a time; keep the larger one
            idle = [b for bufs in self._free.values() for b in bufs]
            if idle and idle[0].numel() > buf.numel():
                buf = idle[0]
            self._free = {(buf.numel(), pinned): [buf]}
            gen = self._generation
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(IDLE_SECONDS, self._expire, (gen,))
            self._timer.daemon = True
            self._timer.start()

    def _expire(self, gen: int) -> None:
        with self._lock:
            if gen == self._generation:
                self._free.clear()
                self._timer = None

    def release(self) -> int:
        with self._lock:
            freed = sum(b.numel() for bufs in self._free.values() for b in bufs)
            self._free.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return freed

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for bufs in self._free.values() for b in bufs)


_pool = _Pool()
_lock = threading.Lock()  # serializes snapshots and the hand-over to the writer
_executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
_last: Optional["concurrent.futures.Future[None]"] = None


def _after_fork_in_child() -> None:
    """A forked child has no writer thread: start afresh (the parent's saves are its own)."""
    global _pool, _lock, _executor, _last
    _pool = _Pool()
    _lock = threading.Lock()
    _executor = None
    _last = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def release_async_buffers() -> int:
    """Frees the idle snapshot buffers kept for the next ``async_save``.

    A buffer still used by a save in flight is freed when that save ends.

    Returns:
        The bytes freed.

    Example:
        >>> torch_safetensors.async_save(sd, "ckpt.safetensors").result()
        >>> torch_safetensors.release_async_buffers()
    """
    return _pool.release()


def _writer() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="torch_safetensors-async-save"
        )
    return _executor


# ---- planning and copying ----


def _plan(obj: Any, metadata: Optional[Dict[str, str]], checksums: bool = False) -> Tuple[bytes, List[Any]]:
    """Everything a synchronous save checks: (header bytes, [(name, tensor, nbytes)] in
    file order). Raises the same refusals, before anything is copied. With checksums,
    each tensor's CRC32C goes into the header, computed here, at the call (the values
    the snapshot copies)."""
    base = _save.base_metadata(metadata)
    tensors, header_meta, plain = _checkpoint.split(obj)

    def plan(tensors: Dict[str, torch.Tensor], extra: Dict[str, str], check: bool) -> Tuple[bytes, List[Any]]:
        meta = dict(base)
        meta.update(extra)
        if checksums:
            meta.update(_checksums.metadata_for(tensors))
        return _C.save(tensors, meta, check_shared=check, plan_only=True)

    try:
        return plan(tensors, header_meta, plain)
    except _C.SharedMemoryError:
        tensors, header_meta = _checkpoint.flatten(obj)
        return plan(tensors, header_meta, False)
    except TypeError:
        if plain:
            _checkpoint.explain(obj)
        raise


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view."""
    return t.reshape(-1).view(torch.uint8)


def _snapshot(header: bytes, order: List[Any], buf: torch.Tensor, non_blocking: bool) -> None:
    """Fills buf with the whole file: the header, then each tensor's bytes in file order.

    Contiguous CPU tensors are copied by the C core without the GIL; the others (strided,
    on an accelerator) with torch's copy_, non-blocking into pinned memory."""
    hl = len(header)
    memoryview(_C.tensor_memory(buf, writable=True))[:hl] = header
    items = []
    off = hl
    for name, t, nbytes in order:
        if t.numel() * t.element_size() != nbytes:
            raise RuntimeError(f"tensor {name!r} changed size while it was being saved")
        items.append((t, off, nbytes))
        off += nbytes
    if off != buf.numel():
        raise RuntimeError("the snapshot buffer does not match the planned file")
    rest = _C.snapshot(items, _C.tensor_memory(buf, writable=True))
    with torch.no_grad():
        for i in rest:
            t, off, nbytes = items[i]
            if type(t) is not torch.Tensor:
                t = t.as_subclass(torch.Tensor)
            dst_bytes = buf[off : off + nbytes]
            if t.is_contiguous():
                dst_bytes.copy_(_as_bytes(t), non_blocking=non_blocking)
                continue
            try:
                dst_bytes.view(t.dtype).view(t.shape).copy_(t, non_blocking=non_blocking)
            except (RuntimeError, NotImplementedError):  # dtypes without a strided copy kernel
                dst_bytes.copy_(_as_bytes(t.contiguous()), non_blocking=non_blocking)


def _record_events(order: List[Any]) -> List[Any]:
    """An event after the copies on each accelerator's current stream."""
    events = []
    for dev in sorted({str(t.device) for _, t, _ in order if t.device.type not in ("cpu", "meta")}):
        ev = torch.Event(device=torch.device(dev))
        ev.record()
        events.append(ev)
    return events


# ---- the call ----


def _refuse_blocking_target(path: Any) -> None:
    """A FIFO or a socket would hold the writer thread (and interpreter exit, which
    completes saves in flight) until some other process reads: refused at the call."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # absent (created by the write) or unreadable: the write reports it
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket"
        raise OSError(
            errno.EINVAL,
            f"async_save writes files in the background, and {os.fsdecode(path)!r} is {kind}, "
            "whose writer would wait for a reader (also at interpreter exit); use torch.save "
            "for pipes",
            path,
        )


def async_save(obj: Any, f: Any, *, metadata: Optional[Dict[str, str]] = None,
               durable: bool = False, checksums: bool = False) -> "concurrent.futures.Future[None]":
    """Saves obj as safetensors in the background; returns once its values are copied.

    Takes everything ``torch.save(obj, f, format="safetensors")`` takes. When it
    returns, every tensor may be changed in place: the file holds the values as they
    were at the call. The write runs on one background thread, without the GIL around
    I/O, with the same atomic rename and ``durable`` flush as a synchronous save.

    Args:
        obj: a dict of tensors or any nesting that ``torch.save(format="safetensors")``
            stores.
        f: a path (written atomically) or a writable binary file object (written from
            the background thread; do not use it until the future is done).
        metadata: extra ``str`` -> ``str`` header metadata.
        durable: flush the data and the directory entry to stable storage.
        checksums: record each tensor's CRC32C in the header, for
            ``torch-safetensors verify --data`` (computed before this returns).

    Returns:
        A ``concurrent.futures.Future`` whose ``result()`` is None once the file is
        complete, or raises the error of the write (``OSError`` and the like).

    Raises:
        TypeError: obj holds something that cannot be saved, or f is neither a path
            nor a writable file; raised here, before anything is copied or written.
        OSError: f names a FIFO or a socket (a background writer would wait for a
            reader); raised here too.
        ValueError: metadata uses a reserved key.

    Example:
        >>> fut = torch_safetensors.async_save(model.state_dict(), "step100.safetensors")
        >>> optimizer.step()          # changes the parameters in place: safe
        >>> fut.result()              # the file is complete
    """
    global _last
    if not isinstance(f, (str, os.PathLike)) and getattr(f, "write", None) is None:
        raise TypeError(f"f must be a path or a writable binary file object, not {type(f).__name__}")
    path = os.fspath(f) if isinstance(f, (str, os.PathLike)) else None
    if path is not None:
        _refuse_blocking_target(path)
    header, order = _plan(obj, metadata, checksums)
    with _lock:
        prev = _last
        if prev is not None:
            concurrent.futures.wait([prev])  # bounded memory: one snapshot at a time
        total = len(header) + sum(nbytes for _, _, nbytes in order)
        pinned = any(t.device.type not in ("cpu", "meta") for _, t, _ in order)
        pooled = _pool.take(total, pinned)
        buf = pooled[:total]  # the pooled buffer may be larger than this save
        try:
            _snapshot(header, order, buf, non_blocking=pinned)
            events = _record_events(order) if pinned else []
        except BaseException:
            _pool.give(pooled, pinned)
            raise
        del order  # the caller's tensors are not kept alive by the save

        def job() -> None:
            try:
                for ev in events:
                    ev.synchronize()
                data = _C.tensor_memory(buf)
                if path is not None:
                    _C.write_atomic(path, data, durable=durable)
                else:
                    _stream.write_all(f, data)
                    if durable and hasattr(f, "flush") and hasattr(f, "fileno"):
                        f.flush()
                        os.fsync(f.fileno())
            finally:
                _pool.give(pooled, pinned)

        fut = _writer().submit(job)
        _last = fut
    return fut
