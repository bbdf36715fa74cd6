"""Pre-1.6 torch checkpoints, mapped instead of read, for ``convert``.

``torch.load`` reads a pre-1.6 file (magic number, protocol, system info, the object's
pickle, the list of storage keys, then each storage as an 8-byte element count and its
raw bytes) into memory, and refuses ``mmap=True`` for it. ``convert`` only needs to
write those bytes once, so here the storages are views of one private, read-only-in-
practice mapping of the file (``UntypedStorage.from_file(shared=False)``): memory stays
at what the writer touches, not the whole file.

The pickles go through torch's own weights_only unpickler, with the same allowlist as
``torch.load(weights_only=True)``: nothing read from the file decides what code runs.
Any file this module does not understand raises; the caller then uses
``torch.load(weights_only=True)``, which reads the file into memory (never an unsafe
path).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import _weights_only_unpickler as _wou

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
HEAD = b"\x80\x02\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little")

__all__ = ["HEAD", "NotMappable", "is_pre16", "load_pre16_mapped"]


class NotMappable(Exception):
    """The file is not a pre-1.6 checkpoint this module maps: use torch.load."""


def _storage_args(saved_id: Any) -> Tuple[torch.dtype, str, int, Optional[tuple]]:
    if not isinstance(saved_id, tuple) or len(saved_id) != 6:
        raise NotMappable(f"unexpected persistent id {type(saved_id).__name__}")
    typename, storage_type, root_key, _location, numel, view = saved_id
    if isinstance(typename, bytes):
        typename = typename.decode("ascii", "replace")
    if typename != "storage":
        raise NotMappable(f"persistent id {typename!r}")
    dtype = getattr(storage_type, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0:
        raise NotMappable("unexpected storage description")
    return dtype, str(root_key), numel, view


def _unpickle(f: Any, persistent_load: Any) -> Tuple[Any, list]:
    """Reads the header pickles, the object and the storage key list from f."""
    if _wou.load(f, encoding="utf-8") != MAGIC_NUMBER:
        raise NotMappable("no pre-1.6 magic number")
    if _wou.load(f, encoding="utf-8") != PROTOCOL_VERSION:
        raise NotMappable("unknown protocol version")
    sys_info = _wou.load(f, encoding="utf-8")
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise NotMappable("not a little-endian checkpoint")
    unpickler = _wou.Unpickler(f, encoding="utf-8")
    unpickler.persistent_load = persistent_load  # type: ignore[attr-defined]
    obj = unpickler.load()
    keys = _wou.load(f, encoding="utf-8")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise NotMappable("unexpected storage key list")
    return obj, keys


def load_pre16_mapped(path: str) -> Any:
    """Loads a pre-1.6 checkpoint with weights_only semantics, its storages mapped.

    Raises:
        pickle.UnpicklingError: the weights_only unpickler refused the file.
        NotMappable: anything else this loader does not handle (the caller falls back
            to torch.load(weights_only=True)).
        OSError: the file cannot be read.
    """
    sizes: Dict[str, Tuple[torch.dtype, int]] = {}

    def measure(saved_id: Any) -> Any:
        dtype, key, numel, _view = _storage_args(saved_id)
        nbytes = numel * torch._utils._element_size(dtype)
        if key in sizes and sizes[key][1] != nbytes:
            raise NotMappable(f"storage {key!r} described with two sizes")
        sizes[key] = (dtype, nbytes)
        meta = torch.UntypedStorage(nbytes, device="meta")
        return torch.storage.TypedStorage(wrap_storage=meta, dtype=dtype, _internal=True)

    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        _obj, keys = _unpickle(f, measure)
        pos = f.tell()
        offsets: Dict[str, int] = {}
        for key in keys:
            if key not in sizes or key in offsets:
                raise NotMappable(f"storage key {key!r} unknown or repeated")
            dtype, nbytes = sizes[key]
            count = f.read(8)
            if len(count) != 8:
                raise NotMappable("truncated storage record")
            elsize = torch._utils._element_size(dtype)
            if int.from_bytes(count, "little") * elsize != nbytes:
                raise NotMappable(f"storage {key!r}: its record holds another size")
            pos += 8
            if nbytes > file_size - pos:
                raise NotMappable(f"storage {key!r}: the file ends inside its data")
            offsets[key] = pos
            pos += nbytes
            f.seek(pos)
        if set(offsets) != set(sizes):
            raise NotMappable("a storage has no record")
        whole = torch.UntypedStorage.from_file(path, shared=False, nbytes=file_size)
        roots: Dict[str, torch.storage.TypedStorage] = {}

        def mapped(saved_id: Any) -> Any:
            dtype, key, _numel, view = _storage_args(saved_id)
            if key not in roots:
                begin = offsets[key]
                roots[key] = torch.storage.TypedStorage(
                    wrap_storage=whole[begin: begin + sizes[key][1]], dtype=dtype, _internal=True)
            root = roots[key]
            if view is None:
                return root
            _view_key, offset, view_size = view
            elsize = torch._utils._element_size(dtype)
            begin, end = offset * elsize, (offset + view_size) * elsize
            if not (0 <= begin <= end <= sizes[key][1]):
                raise NotMappable("a storage view outside its storage")
            return torch.storage.TypedStorage(wrap_storage=root._untyped_storage[begin:end], dtype=dtype,
                                              _internal=True)

        f.seek(0)
        obj, _keys = _unpickle(f, mapped)
    return obj


def is_pre16(head: bytes) -> bool:
    """Whether a file's first bytes are a pre-1.6 checkpoint's magic number."""
    return head.startswith(HEAD)

