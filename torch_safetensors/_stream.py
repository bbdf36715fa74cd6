"""Safetensors through file objects, without a copy of the whole file.

Saving writes the header, then each tensor's bytes straight from its memory through
``write(memoryview)``, looping on short writes; tensors that are not contiguous CPU
memory go through a bounded staging block. Loading reads the header, then
``readinto`` each tensor's own storage: seekable or not, nothing is read twice.
"""
from __future__ import annotations

import errno
import io
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch

from . import _C, _core

# bytes per write()/readinto() call: some wrappers (TLS, 32-bit sizes) take less
IO_CHUNK = 256 << 20
# staging block for tensors that are not contiguous CPU memory
STAGE_BYTES = 16 << 20
MAX_HEADER_LEN = int(_C.MAX_HEADER_LEN)


# ---- writing ----


def write_all(f: Any, data: Any) -> None:
    """Writes every byte of the buffer ``data`` to ``f``, resuming after short writes.

    Raises:
        BlockingIOError: a non-blocking raw stream took nothing (``write`` returned None).
        OSError: ``write`` returned 0 or a count outside the bytes offered.
        TypeError: ``write`` returned something that is not a count.
    """
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    total = view.nbytes
    raw = isinstance(f, io.RawIOBase)
    pos = 0
    while pos < total:
        chunk = view[pos : pos + IO_CHUNK]
        n = f.write(chunk)
        if n is None:
            if raw:
                raise BlockingIOError(
                    errno.EAGAIN,
                    f"the non-blocking stream took none of {len(chunk)} bytes "
                    f"({pos} of {total} written); the file is incomplete",
                )
            n = len(chunk)  # a file-like whose write() returns nothing wrote it all
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"write() returned {type(n).__name__}, not the number of bytes written")
        if n <= 0 or n > len(chunk):
            raise OSError(
                errno.EIO,
                f"write() returned {n} for {len(chunk)} bytes ({pos} of {total} written); "
                "the file is incomplete",
            )
        pos += n


def _stage_blocks(t: torch.Tensor, nbytes: int) -> Any:
    """Yields a tensor's bytes in row blocks of at most STAGE_BYTES (or one row)."""
    src = t.reshape(1) if t.dim() == 0 else t
    rows = src.shape[0]
    if rows == 0 or nbytes == 0:
        return
    row_bytes = nbytes // rows
    per = max(1, min(rows, STAGE_BYTES // row_bytes if row_bytes else rows))
    stage = torch.empty((per,) + tuple(src.shape[1:]), dtype=src.dtype, device="cpu")
    with torch.no_grad():
        for r in range(0, rows, per):
            n = min(per, rows - r)
            block = stage[:n]
            block.copy_(src[r : r + n])
            yield _C.tensor_memory(block)


def save(f: Any, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str], *,
         check_shared: bool) -> None:
    """Writes a safetensors file to the writable binary file object f.

    Everything is checked (and the header planned) before the first byte is written.

    Raises:
        TypeError, ValueError, SharedMemoryError: as _C.save; nothing is written.
        RuntimeError: a tensor changed size while the file was written (Python code
            called by write() or by a tensor subclass changed it).
        OSError: the stream failed; the stream then holds an incomplete file.
    """
    header, order = _C.save(tensors, metadata, check_shared=check_shared, plan_only=True)
    write_all(f, header)
    for name, t, nbytes in order:
        if nbytes == 0:
            continue
        if t.numel() * t.element_size() != nbytes:
            raise RuntimeError(f"tensor {name!r} changed size while it was being saved")
        if t.device.type == "cpu" and t.is_contiguous():
            span = _C.tensor_memory(t)
            if len(span) != nbytes:
                raise RuntimeError(f"tensor {name!r} changed size while it was being saved")
            write_all(f, span)
            continue
        written = 0
        for span in _stage_blocks(t, nbytes):
            written += len(span)
            if written > nbytes:
                break
            write_all(f, span)
        if written != nbytes:
            raise RuntimeError(f"tensor {name!r} changed size while it was being saved")


# ---- reading ----


def _fill(f: Any, view: memoryview, what: str, name: Optional[str] = None) -> None:
    """Reads exactly len(view) bytes from f into view; SafetensorError at end of stream."""
    total = view.nbytes
    pos = 0
    readinto = getattr(f, "readinto", None)
    while pos < total:
        want = min(IO_CHUNK, total - pos)
        if readinto is not None:
            n = readinto(view[pos : pos + want])
            if n is None:
                raise BlockingIOError(errno.EAGAIN, "the non-blocking stream has no data to read")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n > want:
                raise OSError(errno.EIO, f"readinto() returned {n!r} for {want} bytes")
        else:
            chunk = f.read(want)
            if chunk is None:
                raise BlockingIOError(errno.EAGAIN, "the non-blocking stream has no data to read")
            n = len(chunk)
            if n > want:
                raise OSError(errno.EIO, f"read({want}) returned {n} bytes")
            view[pos : pos + n] = chunk
        if n == 0:
            raise _core.error(
                f"the stream ended inside {what}: {pos} of {total} bytes", "truncated", name
            )
        pos += n


def _read_exact(f: Any, n: int, what: str) -> bytes:
    buf = bytearray(n)
    _fill(f, memoryview(buf), what)
    return bytes(buf)


def _header(f: Any, size: Optional[int]) -> Tuple[int, List[Any], Optional[Dict[str, str]], int]:
    """Reads and validates the prefix and header: (data_len, entries, metadata, header bytes)."""
    prefix = bytearray()
    while len(prefix) < 8:
        want = 8 - len(prefix)
        chunk = f.read(want)
        if chunk is None:
            raise BlockingIOError(errno.EAGAIN, "the non-blocking stream has no data to read")
        if not chunk:
            break
        if len(chunk) > want:
            raise OSError(errno.EIO, f"read({want}) returned {len(chunk)} bytes")
        prefix += chunk
    if len(prefix) < 8:
        _C.parse_header(bytes(prefix), len(prefix))  # raises: too small
    n = int.from_bytes(prefix, "little")
    if n > MAX_HEADER_LEN or (size is not None and n > size - 8):
        _C.parse_header(bytes(prefix), size if size is not None else 2**64 - 1)  # raises
    head = bytes(prefix) + _read_exact(f, n, "the header")
    data_len, entries, metadata = _C.parse_header(head, size)
    return data_len, entries, metadata, len(head)


def _skip(f: Any, n: int) -> None:
    try:
        if f.seekable():
            f.seek(n, io.SEEK_CUR)
            return
    except (AttributeError, OSError, ValueError):
        pass
    scratch = memoryview(bytearray(min(n, STAGE_BYTES)))
    while n:
        k = min(n, len(scratch))
        _fill(f, scratch[:k], "the data")
        n -= k


_INT64_MAX = (1 << 63) - 1


def _shape(dtype_name: str, shape: Tuple[int, ...], name: str) -> List[int]:
    """The torch shape of an entry, refused as the C reader refuses it when torch
    cannot hold it (a dimension or stride past int64)."""
    for v in shape:
        if v > _INT64_MAX:
            raise _core.error(f"tensor {name!r}: dimension {v} is too large for torch", "shape", name)
    tshape = _core._torch_shape(dtype_name, shape, name)
    stride = 1
    for v in reversed(tshape):
        if v > 1:
            stride *= v
            if stride > _INT64_MAX:
                raise _core.error(f"tensor {name!r}: the shape is too large for torch", "shape", name)
    return tshape


def load(f: Any, *, size: Optional[int] = None, device: str = "cpu",
         on_cpu: Optional[Callable[[Optional[Dict[str, str]], List[Any]], Set[str]]] = None,
         ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, str]]]:
    """Reads one safetensors file from a binary stream positioned at its start.

    Each tensor is allocated once and filled with ``readinto``; nothing else of the
    data's size is held. The stream is left just after the file's last byte.

    Args:
        f: a readable binary file object (``readinto`` is used when it has one).
        size: the bytes from the position to the end, when known (a seekable stream):
            the header is then checked against it before anything is allocated.
        device: ``"cpu"``, or ``"meta"`` to skip the data.
        on_cpu: called with the metadata and the header's entries before any data is
            read; the names it returns are read on the CPU even when device is
            ``"meta"`` (values that are data, not tensors).

    Returns:
        (tensors in file order, header metadata or None).

    Raises:
        SafetensorError: the bytes are not a valid safetensors file, or the stream ends
            early.
        OSError: the stream fails.
    """
    data_len, entries, metadata, _ = _header(f, size)
    keep = on_cpu(metadata, entries) if on_cpu is not None else set()
    tensors: Dict[str, torch.Tensor] = {}
    expect = 0
    at = 0  # meta: the data bytes read or skipped so far
    for name, dtype_name, shape, begin, end in entries:
        dtype = _core.DTYPES.get(dtype_name)
        if dtype is None:
            raise _core.error(
                f"tensor {name!r}: dtype {dtype_name} has no torch equivalent in this version of torch",
                "dtype",
                name,
            )
        assert begin == expect  # the engine checked: in file order, no holes
        expect = end
        tshape = _shape(dtype_name, shape, name)
        if device == "meta" and name not in keep:
            tensors[name] = torch.empty(tshape, dtype=dtype, device="meta")
            continue
        if device == "meta":
            _skip(f, begin - at)
            at = end
        try:
            t = torch.empty(tshape, dtype=dtype)
        except (RuntimeError, MemoryError) as e:  # the allocator refused a claimed size
            raise _core.error(f"tensor {name!r}: cannot allocate {end - begin} bytes: {e}",
                              "too_large", name) from None
        span = _C.tensor_memory(t, writable=True)
        if len(span) != end - begin:
            raise _core.error(f"tensor {name!r}: size does not match its offsets", "size_mismatch", name)
        if len(span):
            _fill(f, memoryview(span), f"tensor {name!r}", name)
        tensors[name] = t
    if device == "meta":
        _skip(f, data_len - at)
    return tensors, metadata


__all__: List[str] = []
