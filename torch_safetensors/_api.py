"""The public API, with the names, signatures and semantics of ``safetensors.torch``."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from . import _C, _core
from ._core import SafetensorError

FILE_PATH = Union[str, "os.PathLike[str]"]
DEVICE = Union[str, int, torch.device]

__all__ = ["save_file", "save", "load_file", "load", "safe_open", "SafetensorError"]


def _as_dict(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if isinstance(tensors, dict):
        return tensors
    if isinstance(tensors, Mapping):
        return dict(tensors)
    raise TypeError(f"expected a dict of str to Tensor, got {type(tensors).__name__}")


# ---- saving ----


def save_file(
    tensors: Dict[str, torch.Tensor],
    filename: FILE_PATH,
    metadata: Optional[Dict[str, str]] = None,
    *,
    durable: bool = False,
) -> None:
    """Saves a dict of tensors to a safetensors file, atomically.

    The file is written to a temporary file beside ``filename`` straight from tensor
    memory, then renamed over it: ``filename`` is never left partial. Non-contiguous
    tensors are saved as their values.

    Args:
        tensors: names to dense tensors. Tensors that share memory are refused.
        filename: where to write (``str`` or ``os.PathLike``).
        metadata: optional text metadata (``str`` -> ``str``) for the header.
        durable: flush the file's data and its directory entry to stable storage
            before returning (``fdatasync`` + directory ``fsync``), so the new file
            survives a power loss. Off by default, as with ``torch.save``: it costs
            the time to write the whole file to the device.

    Returns:
        None

    Raises:
        TypeError: a name is not a ``str``, a value is not a tensor, or its dtype,
            layout or device cannot be stored.
        RuntimeError: two tensors share memory.
        OSError: the file cannot be written; the previous file, if any, is untouched.

    Example:
        >>> import torch
        >>> from torch_safetensors import save_file
        >>> save_file({"weight": torch.zeros(2, 3)}, "model.safetensors")
    """
    _C.save(_as_dict(tensors), metadata, os.fspath(filename), durable=durable)


def save(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """Serializes a dict of tensors to safetensors bytes.

    Args:
        tensors: names to dense tensors.
        metadata: optional text metadata (``str`` -> ``str``).

    Returns:
        The bytes of a safetensors file.

    Raises:
        TypeError: as for :func:`save_file`.

    Example:
        >>> data = save({"bias": torch.ones(4)})
        >>> load(data)["bias"].sum().item()
        4.0
    """
    return _C.save(_as_dict(tensors), metadata)


# ---- loading ----


def load_file(filename: FILE_PATH, device: DEVICE = "cpu") -> Dict[str, torch.Tensor]:
    """Loads every tensor of a safetensors file, zero-copy over a private mapping.

    Nothing is read until a tensor is touched. Tensors are writable; edits stay in
    this process and never reach the file. The mapping is released when the last
    tensor is freed.

    Args:
        filename: the file (``str`` or ``os.PathLike``).
        device: ``"cpu"`` (zero-copy), ``"meta"`` (shapes only, no data read), or
            another torch device (copied through the CPU).

    Returns:
        Names to tensors, in the file's order.

    Raises:
        SafetensorError: the file is malformed; the message names the rule and tensor.
        FileNotFoundError, OSError: the file cannot be opened or read.

    Example:
        >>> tensors = load_file("model.safetensors")
    """
    build, dev = _core.resolve_device(device)
    reader = _C.Reader(os.fspath(filename))
    try:
        return _core.move(_core.build(reader, None, build), dev)
    finally:
        reader.close()


def load(data: bytes) -> Dict[str, torch.Tensor]:
    """Loads tensors from safetensors bytes into memory of their own.

    Args:
        data: the bytes of a safetensors file (any buffer object).

    Returns:
        Names to CPU tensors, in the file's order.

    Raises:
        SafetensorError: the bytes are malformed.

    Example:
        >>> load(save({"a": torch.arange(3)}))
        {'a': tensor([0, 1, 2])}
    """
    reader = _C.Reader(data=data)
    try:
        if _core.FEATURES["aten"]:
            return reader.tensors()
        return _core.build(reader, None, "cpu")
    finally:
        reader.close()


class _Slice:
    """A lazily sliced tensor of an open file: only the indexed bytes are read."""

    def __init__(self, reader: "_C.Reader", name: str, build: str, dev: Optional[torch.device]):
        self._reader = reader
        self._name = name
        self._build = build
        self._dev = dev
        self._dtype, self._shape, _, _ = reader.info(name)

    def get_shape(self) -> List[int]:
        """The shape as the header holds it."""
        return list(self._shape)

    def get_dtype(self) -> str:
        """The dtype as the header names it ("F32", "BF16", ...)."""
        return self._dtype

    def __len__(self) -> int:
        if not self._shape:
            raise TypeError("len() of a 0-d tensor")
        return self._shape[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        full = _core.build(self._reader, [self._name], self._build)[self._name]
        part = full[index]
        if self._build == "cpu":
            # a copy of just the selected bytes: the result does not pin the file
            part = part.clone(memory_format=torch.contiguous_format)
        return part.to(self._dev) if self._dev is not None else part


class safe_open:
    """Opens a safetensors file for lazy access, as ``safetensors.safe_open``.

    Args:
        filename: the file (``str`` or ``os.PathLike``).
        framework: ``"pt"`` (also ``"torch"``, ``"pytorch"``); other frameworks are
            not supported.
        device: where tensors go, as in :func:`load_file`.

    Raises:
        SafetensorError: the file is malformed.
        FileNotFoundError, OSError: the file cannot be opened.

    Example:
        >>> with safe_open("model.safetensors", framework="pt") as f:
        ...     names = f.keys()
        ...     w = f.get_tensor(names[0])
        ...     rows = f.get_slice(names[0])[0:2]
    """

    def __init__(self, filename: FILE_PATH, framework: str = "pt", device: DEVICE = "cpu"):
        if framework not in ("pt", "torch", "pytorch"):
            raise ValueError(
                f"framework {framework!r} is not supported: torch_safetensors builds torch "
                "tensors (use framework='pt')"
            )
        self._build, self._dev = _core.resolve_device(device)
        self._reader = _C.Reader(os.fspath(filename))

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Releases the file; tensors already returned stay valid."""
        self._reader.close()

    def keys(self) -> List[str]:
        """Tensor names, sorted."""
        return self._reader.keys()

    def offset_keys(self) -> List[str]:
        """Tensor names in the order of their data in the file."""
        return self._reader.offset_keys()

    def metadata(self) -> Optional[Dict[str, str]]:
        """The header's ``__metadata__`` (``str`` -> ``str``), or None."""
        return self._reader.metadata()

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor, zero-copy on the CPU; raises SafetensorError for an unknown name."""
        t = _core.build(self._reader, [name], self._build)[name]
        return t.to(self._dev) if self._dev is not None else t

    def get_tensors(self) -> Dict[str, torch.Tensor]:
        """Every tensor, in file order."""
        return _core.move(_core.build(self._reader, None, self._build), self._dev)

    def get_slice(self, name: str) -> _Slice:
        """A lazy slice object: ``get_shape()``, ``get_dtype()`` and ``[...]`` indexing."""
        return _Slice(self._reader, name, self._build, self._dev)
