"""Writing one safetensors file from any object the format can hold.

The save half of ``torch.save(..., format="safetensors")``, shared by every writer
(``_torch``, ``_sharded``, ``_async``, ``distributed`` and the CLI): the structure is
split by ``_checkpoint``, then the C core writes a path atomically, or ``_stream``
writes a file object after the whole file is planned.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch

from . import _C, _checkpoint, _stream

__all__ = ["base_metadata", "save_safetensors", "is_path"]


def is_path(f: Any) -> bool:
    """Whether f names a file (``str`` or ``os.PathLike``) rather than being a file object."""
    return isinstance(f, (str, os.PathLike))


def base_metadata(metadata: Optional[Dict[str, str]]) -> Dict[str, str]:
    """The header metadata every save writes: ``{"format": "pt"}`` plus the caller's.

    Raises:
        TypeError: metadata is not a dict.
        ValueError: metadata uses the reserved structure key.
    """
    base: Dict[str, str] = {"format": "pt"}
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict of str to str, not {type(metadata).__name__}")
        if _checkpoint.STRUCTURE_KEY in metadata:
            raise ValueError(f"metadata key {_checkpoint.STRUCTURE_KEY!r} is reserved")
        base.update(metadata)
    return base


def save_safetensors(
    obj: Any,
    f: Any,
    metadata: Optional[Dict[str, str]] = None,
    *,
    durable: bool = False,
    parts: Optional[Tuple[Dict[str, torch.Tensor], Dict[str, str], bool]] = None,
    checksums: bool = False,
) -> None:
    """Writes obj as a safetensors file to a path (atomically) or a writable binary file.

    Args:
        obj: a dict of tensors, or any nesting of dict/OrderedDict (str or int keys),
            list and tuple with tensors and None, bool, int, float, str leaves.
        f: a ``str``, an ``os.PathLike`` or a writable binary file object.
        metadata: extra ``str`` -> ``str`` metadata; ``{"format": "pt"}`` is always added.
        durable: flush the data and the directory entry to stable storage.
        parts: ``_checkpoint.split(obj)``, when the caller already has it.
        checksums: record each tensor's CRC32C in the header metadata, for
            ``torch-safetensors verify --data`` (other readers ignore it).

    Raises:
        TypeError: obj holds something that is not a tensor (named by its key), or f
            is not a path or writable file; nothing is written.
        OSError: the file cannot be written; a previous file is left untouched.

    Example:
        >>> save_safetensors({"w": torch.zeros(2)}, "w.safetensors")  # doctest: +SKIP
    """
    tensors, header_meta, plain = parts if parts is not None else _checkpoint.split(obj)
    base = base_metadata(metadata)
    if is_path(f):
        path: Optional[str] = os.fspath(f)
    else:
        path = None
        if getattr(f, "write", None) is None:
            raise TypeError(f"f must be a path or a writable binary file object, not {type(f).__name__}")

    def write(tensors: Dict[str, torch.Tensor], extra: Dict[str, str], check_shared: bool) -> Any:
        meta = dict(base)
        meta.update(extra)
        if checksums:
            from . import _checksums

            meta.update(_checksums.metadata_for(tensors))
        if path is not None:
            return _C.save(tensors, meta, path, durable=durable, check_shared=check_shared)
        # planned (and refused) before the first byte, then streamed from tensor memory
        return _stream.save(f, tensors, meta, check_shared=check_shared)

    try:
        write(tensors, header_meta, plain)
    except _C.SharedMemoryError:
        # tensors of the plain dict overlap: store ties once, other views as values
        tensors, header_meta = _checkpoint.flatten(obj)
        write(tensors, header_meta, False)
    except TypeError:
        if plain:
            _checkpoint.explain(obj)
        raise
    if path is None:
        if durable and hasattr(f, "flush") and hasattr(f, "fileno"):
            f.flush()
            os.fsync(f.fileno())
