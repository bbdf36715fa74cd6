"""Per-tensor checksums recorded at save time (``checksums=True``) and checked by
``torch-safetensors verify --data``.

The checksums live in the header's ``__metadata__`` under one key, as compact JSON
``{"algorithm": "crc32c", "tensors": {name: "8 hex digits"}}``: other readers see one
more metadata string and ignore it. Each checksum covers the tensor's bytes exactly as
the file stores them. CRC32C runs in C (``csrc/st_hash.c``; the SSE4.2 instruction when
the processor has it), without the GIL.
"""
from __future__ import annotations

import ctypes
import json
import os
from typing import Dict, Optional

import torch

from . import _C, _core

CHECKSUM_KEY = "torch_safetensors.checksums"
CHECKSUM_ALGORITHM = "crc32c"
_CHUNK = 8 << 20  # bytes per pread when checking a file

__all__ = ["CHECKSUM_KEY", "CHECKSUM_ALGORITHM", "tensor_crc", "metadata_for", "read_checksums", "file_crc"]


def tensor_crc(t: torch.Tensor) -> Optional[int]:
    """CRC32C of the bytes a tensor is stored as (its values, contiguous, little-endian);
    None for a tensor without plain dense data (the writer refuses it, naming it)."""
    if (not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta"
            or t.is_quantized or t.is_nested):
        return None
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()  # the values the writer stores, not the memory under the bits
    if not t.is_contiguous():
        t = t.contiguous()  # one tensor at a time: bounded by the largest tensor
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return _C.crc32c(b"")
    buf = (ctypes.c_ubyte * nbytes).from_address(t.data_ptr())  # zero-copy; t stays alive
    return _C.crc32c(buf)


def metadata_for(tensors: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """The ``__metadata__`` entry that records every tensor's checksum."""
    sums = {}
    for name, t in tensors.items():
        crc = tensor_crc(t)
        if crc is not None:
            sums[name] = f"{crc:08x}"
    doc = {"algorithm": CHECKSUM_ALGORITHM, "tensors": dict(sorted(sums.items()))}
    return {CHECKSUM_KEY: json.dumps(doc, separators=(",", ":"), ensure_ascii=False)}


def read_checksums(metadata: Dict[str, str], path: str) -> Optional[Dict[str, int]]:
    """The recorded checksums by tensor name, or None when the file has none.

    Raises:
        SafetensorError: the entry is there but malformed (naming the file).
    """
    text = metadata.get(CHECKSUM_KEY)
    if text is None:
        return None

    def bad(why: str) -> Exception:
        return _core.error(f"{path}: metadata {CHECKSUM_KEY!r} is malformed: {why}", "checksum")

    try:
        doc = json.loads(text)
    except ValueError:
        raise bad("not JSON") from None
    except RecursionError:
        raise bad("nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), dict):
        raise bad("expected {\"algorithm\": ..., \"tensors\": {...}}")
    if doc.get("algorithm") != CHECKSUM_ALGORITHM:
        raise bad(f"unknown algorithm {doc.get('algorithm')!r} (this version knows {CHECKSUM_ALGORITHM})")
    out: Dict[str, int] = {}
    for name, value in doc["tensors"].items():
        if not (isinstance(value, str) and len(value) == 8 and all(c in "0123456789abcdef" for c in value)):
            raise bad(f"checksum of {name!r} is not 8 lowercase hex digits")
        out[name] = int(value, 16)
    return out


def file_crc(fd: int, begin: int, end: int, path: str) -> int:
    """CRC32C of bytes [begin, end) of an open file, read in bounded chunks.

    Raises:
        SafetensorError: the file ends early (truncated while being read).
        OSError: the read fails.
    """
    crc = 0
    pos = begin
    while pos < end:
        chunk = os.pread(fd, min(_CHUNK, end - pos), pos)
        if not chunk:
            raise _core.error(f"{path}: the file ended at byte {pos} while reading tensor data", "truncated")
        crc = _C.crc32c(chunk, crc)
        pos += len(chunk)
    return crc
