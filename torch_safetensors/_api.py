"""The public API, with the names, signatures and semantics of ``safetensors.torch``
(and the top-level ``safetensors`` functions ``serialize``, ``serialize_file``,
``deserialize``)."""
from __future__ import annotations

import ctypes
import operator
import os
import warnings
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple, Union

import torch

from . import _C, _checksums, _core, _source
from ._core import SafetensorError

FILE_PATH = Union[str, "os.PathLike[str]"]
DEVICE = Union[str, int, torch.device]
BACKENDS = ("mmap", "pread")

__all__ = [
    "SafetensorError",
    "SliceIndexError",
    "TensorSpec",
    "UnsupportedTensorError",
    "deserialize",
    "load",
    "load_file",
    "load_model",
    "safe_open",
    "save",
    "save_file",
    "save_model",
    "serialize",
    "serialize_file",
    "storage_ptr",
    "storage_size",
]


class UnsupportedTensorError(TypeError, ValueError, RuntimeError):  # noqa: N818
    """An object that safetensors cannot store: not a dict, not a tensor, or a tensor
    that is sparse, quantized, nested, on the meta device or of an unstorable dtype.

    It is a ``TypeError`` (what torch_safetensors reports) and also a ``ValueError``
    and a ``RuntimeError`` (what the ``safetensors`` package raises for the same
    inputs), so ``except`` clauses written for either library keep working.
    """


UnsupportedTensorError.__module__ = "torch_safetensors"


def _as_dict(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if isinstance(tensors, dict):
        return tensors
    if isinstance(tensors, Mapping):
        return dict(tensors)
    raise UnsupportedTensorError(f"Expected a dict of [str, torch.Tensor] but received {type(tensors)}")


def _package_refusal(tensors: Dict[str, torch.Tensor]) -> Optional[UnsupportedTensorError]:
    """The ``safetensors`` package's error for what it refuses before writing (code and
    tests match on its text): a value that is not a tensor, sparse (non-strided)
    tensors, a meta tensor (our advice after its text). Only looked for once the C
    writer has refused: a save that succeeds pays nothing."""
    sparse = []
    meta = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return UnsupportedTensorError(f"Key `{name}` is invalid, expected torch.Tensor but received {type(t)}")
        if t.layout != torch.strided:
            sparse.append(name)
        elif t.is_meta:
            meta.append(name)
    if sparse:
        return UnsupportedTensorError(
            f"You are trying to save a sparse tensors: `{sparse}` which this library does not support."
            " You can make it a dense tensor before saving with `.to_dense()` but be aware this might"
            " make a much larger file than needed."
        )
    if meta:
        return UnsupportedTensorError(
            f"Cannot copy out of meta tensor; no data! Tensor {meta[0]!r} is on the meta device and "
            "has no data to save; materialize it first (for example with .to_empty(device='cpu') "
            "and an initializer)"
        )
    return None


def _c_save(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]], *path: str,
            durable: bool = False) -> Any:
    """_C.save, with its plain TypeErrors for unstorable objects raised as
    UnsupportedTensorError (a TypeError, ValueError and RuntimeError), in the package's
    words where it has some."""
    try:
        if path:
            return _C.save(tensors, metadata, path[0], durable=durable)
        return _C.save(tensors, metadata)
    except TypeError as e:
        if type(e) is not TypeError:
            raise
        refusal = _package_refusal(tensors)
        raise (refusal if refusal is not None else UnsupportedTensorError(str(e))) from None


def _reader(filename: FILE_PATH, use_mmap: bool) -> "_C.Reader":
    """Opens a file for reading; a missing file raises ``FileNotFoundError`` with the
    ``safetensors`` package's message ("No such file or directory: NAME")."""
    path = os.fspath(filename)
    try:
        return _C.Reader(path, mmap=use_mmap)
    except FileNotFoundError as e:
        err = FileNotFoundError(f"No such file or directory: {os.fsdecode(path)}")
        err.errno = e.errno  # str() stays the message: OSError formats only with strerror set
        raise err from None
    except SafetensorError as e:
        # one of torch's own files: say what it is and how to load or convert it
        try:
            head = _source.read_head(path, 512)
        except (OSError, SafetensorError):
            raise e from None
        raise _source.not_safetensors(os.fsdecode(path), head, e) from None


def _check_backend(backend: str) -> bool:
    """Whether to map the file (backend "mmap") or read it with pread ("pread")."""
    if backend not in BACKENDS:
        raise SafetensorError(f"backend {backend!r} is invalid (expected one of: \"mmap\", \"pread\")")
    return backend == "mmap"


# ---- saving ----


def save_file(
    tensors: Dict[str, torch.Tensor],
    filename: FILE_PATH,
    metadata: Optional[Dict[str, str]] = None,
    *,
    durable: bool = False,
    checksums: bool = False,
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
        checksums: record each tensor's CRC32C in the header metadata (key
            ``torch_safetensors.checksums``, ignored by other readers), so that
            ``torch-safetensors verify --data`` can tell a corrupted file from a good one.

    Returns:
        None

    Raises:
        UnsupportedTensorError: (a TypeError, ValueError and RuntimeError) a value is
            not a tensor, or its dtype, layout or device cannot be stored.
        TypeError: a name or a metadata value is not a ``str``.
        RuntimeError: two tensors share memory (see :func:`save_model`).
        OSError: the file cannot be written; the previous file, if any, is untouched.

    Example:
        >>> import torch
        >>> from torch_safetensors import save_file
        >>> save_file({"weight": torch.zeros(2, 3)}, "model.safetensors")
    """
    tensors = _as_dict(tensors)
    _c_save(tensors, _with_checksums(tensors, metadata, checksums), os.fspath(filename), durable=durable)


def save(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None, *,
         checksums: bool = False) -> bytes:
    """Serializes a dict of tensors to safetensors bytes.

    Args:
        tensors: names to dense tensors.
        metadata: optional text metadata (``str`` -> ``str``).
        checksums: record each tensor's CRC32C in the metadata (see :func:`save_file`).

    Returns:
        The bytes of a safetensors file.

    Raises:
        TypeError: as for :func:`save_file`.

    Example:
        >>> data = save({"bias": torch.ones(4)})
        >>> load(data)["bias"].sum().item()
        4.0
    """
    tensors = _as_dict(tensors)
    return _c_save(tensors, _with_checksums(tensors, metadata, checksums))


def _with_checksums(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]],
                    checksums: bool) -> Optional[Dict[str, str]]:
    if not checksums:
        return metadata
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict of str to str, not {type(metadata).__name__}")
    meta = dict(metadata or {})
    meta.update(_checksums.metadata_for(tensors))
    return meta


# ---- loading ----


def load_file(filename: FILE_PATH, device: DEVICE = "cpu", *, backend: str = "mmap") -> Dict[str, torch.Tensor]:
    """Loads every tensor of a safetensors file, zero-copy over a private mapping.

    Nothing is read until a tensor is touched. Tensors are writable; edits stay in
    this process and never reach the file. The mapping is released when the last
    tensor is freed.

    Args:
        filename: the file (``str`` or ``os.PathLike``).
        device: ``"cpu"`` (zero-copy), ``"meta"`` (shapes only, no data read), or
            another torch device (copied through the CPU).
        backend: ``"mmap"`` (default: a private mapping, zero-copy) or ``"pread"``
            (the tensors' bytes are read into memory of their own).

    Returns:
        Names to tensors, in the file's order.

    Raises:
        SafetensorError: the file is malformed (the message names the rule and
            tensor), or ``backend`` is unknown.
        FileNotFoundError, OSError: the file cannot be opened or read.

    Example:
        >>> tensors = load_file("model.safetensors")
    """
    use_mmap = _check_backend(backend)
    build, dev = _core.resolve_device(device)
    reader = _reader(filename, use_mmap)
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
    try:
        reader = _C.Reader(data=data)
    except SafetensorError as e:
        head = bytes(memoryview(data)[:512]) if isinstance(data, (bytes, bytearray, memoryview)) else b""
        raise _source.not_safetensors("the bytes", head, e, path=False) from None
    try:
        if _core.FEATURES["aten"]:
            return reader.tensors()
        return _core.build(reader, None, "cpu")
    finally:
        reader.close()


_FRAMEWORKS = {"pt": "pt", "torch": "pt", "pytorch": "pt", "np": "np", "numpy": "np"}


def _to_framework(t: torch.Tensor, framework: str) -> Any:
    if framework == "np":
        return t.numpy()  # zero-copy over the same memory; raises for dtypes numpy lacks
    return t


class SliceIndexError(SafetensorError, IndexError):
    """An integer index out of range in ``get_slice(...)[...]``: a ``SafetensorError``
    with the ``safetensors`` package's message, and an ``IndexError`` as torch raises."""


SliceIndexError.__module__ = "torch_safetensors"


def _index_text(part: Any) -> str:
    """One index as the package's messages print it ("2:", ":20", "3")."""
    if isinstance(part, slice):
        text = ("" if part.start is None else str(part.start)) + ":" + ("" if part.stop is None else str(part.stop))
        return text if part.step is None else f"{text}:{part.step}"
    return "..." if part is Ellipsis else str(part)


def _check_indices(index: Any, shape: Tuple[int, ...]) -> None:
    """Refuses an integer index outside its dimension as the ``safetensors`` package
    does (``SliceIndexError``), before any byte is read; torch checks the rest."""
    parts = index if isinstance(index, tuple) else (index,)
    placed = [p for p in parts if p is not None]  # None adds a dimension and takes none
    cut = next((i for i, p in enumerate(placed) if p is Ellipsis), None)
    if cut is None:
        dims = list(enumerate(placed))
    else:
        after = placed[cut + 1:]
        dims = list(enumerate(placed[:cut])) + [(len(shape) - len(after) + i, p) for i, p in enumerate(after)]
    if len(dims) > len(shape):
        return  # too many indices: torch's own error
    for dim, part in dims:
        if isinstance(part, (bool, torch.Tensor)):
            continue
        try:
            i = operator.index(part)  # ints and numpy integers; not slices, lists, arrays
        except TypeError:
            continue
        size = shape[dim]
        if i < -size:
            raise SliceIndexError(f"Invalid index {i} for dimension {dim} of size {size}")
        if i >= size:
            shown = ", ".join(_index_text(p) for p in parts)
            raise SliceIndexError(
                f"Error during slicing [{shown}] with shape {list(shape)}: index {i} out of bounds "
                f"for tensor dimension #{dim} of size {size}"
            )


class _Slice:
    """A lazily sliced tensor of an open file: only the indexed bytes are read."""

    def __init__(self, owner: "safe_open", name: str):
        self._owner = owner
        self._name = name
        self._dtype, self._shape, _, _ = owner._open().info(name)

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

    def __getitem__(self, index: Any) -> Any:
        _check_indices(index, self._shape)
        owner = self._owner
        full = _core.build(owner._open(), [self._name], owner._build)[self._name]
        part = full[index]
        if owner._build == "cpu":
            # a copy of just the selected bytes: the result does not pin the file
            part = part.clone(memory_format=torch.contiguous_format)
        part = part.to(owner._dev) if owner._dev is not None else part
        return _to_framework(part, owner._framework)


class safe_open:
    """Opens a safetensors file for lazy access, as ``safetensors.safe_open``.

    Args:
        filename: the file (``str`` or ``os.PathLike``).
        framework: ``"pt"`` (also ``"torch"``, ``"pytorch"``) for torch tensors, or
            ``"np"`` (also ``"numpy"``) for numpy arrays (CPU only; dtypes numpy
            lacks, such as bfloat16, raise ``TypeError``). Others are refused.
        device: where tensors go, as in :func:`load_file`.
        backend: ``"mmap"`` (default) or ``"pread"``, as in :func:`load_file`.

    Raises:
        SafetensorError: the file is malformed, ``backend`` is unknown, or the handle
            is used after it was closed.
        ValueError: ``framework`` is not supported.
        FileNotFoundError, OSError: the file cannot be opened.

    Example:
        >>> with safe_open("model.safetensors", framework="pt") as f:
        ...     names = f.keys()
        ...     w = f.get_tensor(names[0])
        ...     rows = f.get_slice(names[0])[0:2]
    """

    def __init__(self, filename: FILE_PATH, framework: str = "pt", device: DEVICE = "cpu", *,
                 backend: str = "mmap"):
        fw = _FRAMEWORKS.get(framework) if isinstance(framework, str) else None
        if fw is None:
            raise ValueError(
                f"framework {framework!r} is not supported: torch_safetensors builds torch "
                "tensors (framework='pt') or numpy arrays (framework='np')"
            )
        use_mmap = _check_backend(backend)
        self._framework = fw
        self._build, self._dev = _core.resolve_device(device)
        if fw == "np" and (self._dev is not None or self._build != "cpu"):
            raise ValueError(f"framework {framework!r} gives CPU arrays; device {device!r} is not available")
        self._reader = _reader(filename, use_mmap)

    def _open(self) -> "_C.Reader":
        if self._reader.closed:
            raise SafetensorError("the file is closed")
        return self._reader

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Releases the file; tensors already returned stay valid."""
        self._reader.close()

    def keys(self) -> List[str]:
        """Tensor names, sorted."""
        return self._open().keys()

    def offset_keys(self) -> List[str]:
        """Tensor names in the order of their data in the file."""
        return self._open().offset_keys()

    def metadata(self) -> Optional[Dict[str, str]]:
        """The header's ``__metadata__`` (``str`` -> ``str``), or None."""
        return self._open().metadata()

    def get_tensor(self, name: str) -> Any:
        """One tensor, zero-copy on the CPU; raises SafetensorError for an unknown name."""
        t = _core.build(self._open(), [name], self._build)[name]
        t = t.to(self._dev) if self._dev is not None else t
        return _to_framework(t, self._framework)

    def get_tensors(self) -> Dict[str, Any]:
        """Every tensor, in file order."""
        out = _core.move(_core.build(self._open(), None, self._build), self._dev)
        if self._framework != "pt":
            for name in out:
                out[name] = _to_framework(out[name], self._framework)
        return out

    def get_slice(self, name: str) -> _Slice:
        """A lazy slice object: ``get_shape()``, ``get_dtype()`` and ``[...]`` indexing.

        An integer index outside its dimension raises :class:`SliceIndexError` (a
        ``SafetensorError`` and an ``IndexError``) with the ``safetensors`` package's
        message, such as ``"Invalid index -6 for dimension 1 of size 5"``.
        """
        return _Slice(self, name)


# ---- shared and tied tensors (the safetensors.torch helpers) ----


def storage_ptr(tensor: torch.Tensor) -> int:
    """The address of a tensor's storage (0 for storages without data, such as meta).

    Args:
        tensor: any tensor.

    Returns:
        The storage's data pointer, or 0.

    Example:
        >>> w = torch.zeros(4)
        >>> storage_ptr(w[2:]) == storage_ptr(w)
        True
    """
    try:
        return tensor.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - storages that cannot say (meta, some subclasses)
        return 0


def storage_size(tensor: torch.Tensor) -> int:
    """The size of a tensor's whole storage, in bytes.

    Args:
        tensor: any tensor.

    Returns:
        The storage's size in bytes (the tensor's own size when it has no storage).

    Example:
        >>> storage_size(torch.zeros(4)[:1])
        16
    """
    try:
        return tensor.untyped_storage().nbytes()
    except Exception:  # noqa: BLE001
        return tensor.numel() * tensor.element_size()


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """[start, stop) of the bytes a tensor's elements touch."""
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    high = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
    low = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s < 0)
    return start + low * t.element_size(), start + (high + 1) * t.element_size()


def _end_ptr(tensor: torch.Tensor) -> int:
    """The address just past the last byte a tensor's elements touch."""
    return _span(tensor)[1]


def _find_shared_tensors(state_dict: Mapping[str, torch.Tensor]) -> List[Set[str]]:
    """Groups the names whose tensors overlap in memory.

    Tensors are grouped by storage (device, address, size), and each storage's group
    is split into runs whose byte ranges overlap. Meta tensors and empty storages share
    nothing.

    Args:
        state_dict: names to tensors.

    Returns:
        A list of sets of names, in the order the storages first appear; a set of one
        name is a tensor sharing nothing. Overlap is transitive within a storage (the
        package compares each range only with the one before it).

    Example:
        >>> w = torch.zeros(4)
        >>> _find_shared_tensors({"a": w, "b": w, "c": torch.ones(1)})
        [{'a', 'b'}, {'c'}]
    """
    by_storage: Dict[Any, Set[str]] = defaultdict(set)
    for name, t in state_dict.items():
        if t.device.type != "meta" and storage_ptr(t) != 0 and storage_size(t) != 0:
            by_storage[(t.device, storage_ptr(t), storage_size(t))].add(name)
    groups: List[Set[str]] = []
    for names in by_storage.values():  # in order of first appearance, as the package
        spans = sorted((*_span(state_dict[n]), n) for n in names)
        stop = None
        for begin, end, name in spans:
            if stop is None or begin >= stop:
                groups.append({name})
                stop = end
            else:
                groups[-1].add(name)
                stop = max(stop, end)
    return groups


def _is_complete(t: torch.Tensor) -> bool:
    """Whether a tensor covers its whole storage, from its first byte."""
    return t.data_ptr() == storage_ptr(t) and t.numel() * t.element_size() == storage_size(t)


def _remove_duplicate_names(
    state_dict: Mapping[str, torch.Tensor],
    *,
    preferred_names: Optional[Iterable[str]] = None,
    discard_names: Optional[Iterable[str]] = None,
) -> Dict[str, List[str]]:
    """For each group of tensors sharing memory, the one name to keep and the others.

    The name kept covers the whole storage: the first in sorted order, preferring names
    not in ``discard_names``, and above all names in ``preferred_names``.

    Args:
        state_dict: names to tensors.
        preferred_names: names to keep when they can be (for example a file's names).
        discard_names: names to drop when another can be kept.

    Returns:
        Kept name -> the sorted names that alias it.

    Raises:
        RuntimeError: in some group no tensor covers its whole storage.

    Example:
        >>> w = torch.zeros(4)
        >>> dict(_remove_duplicate_names({"b": w, "a": w}))
        {'a': ['b']}
    """
    preferred = set(preferred_names or ())
    discard = set(discard_names or ())
    removals: Dict[str, List[str]] = defaultdict(list)
    for shared in _find_shared_tensors(state_dict):
        complete = {n for n in shared if _is_complete(state_dict[n])}
        if not complete:
            raise RuntimeError(
                f"cannot choose a name to keep among {sorted(shared)}: none of these tensors "
                "covers its whole storage, so saving one would store more memory than it "
                "shows (clone the tensors, or save them with torch.save(..., "
                "format='safetensors'), which stores each view as its value)"
            )
        keep = min(complete)
        if complete - discard:
            keep = min(complete - discard)
        if preferred & complete:
            keep = min(preferred & complete)
        for name in sorted(shared):
            if name != keep:
                removals[keep].append(name)
    return removals


def save_model(
    model: torch.nn.Module,
    filename: FILE_PATH,
    metadata: Optional[Dict[str, str]] = None,
    force_contiguous: bool = True,
    *,
    checksums: bool = False,
) -> None:
    """Saves a model's state dict, storing tied (shared) tensors once.

    As ``safetensors.torch.save_model``: of each group of names sharing memory, one name
    is kept (see :func:`_remove_duplicate_names`) and every other name is recorded in
    the metadata as ``{removed_name: kept_name}`` (an entry the caller already set is
    not overridden). :func:`load_model` restores the aliases.

    Args:
        model: the module to save.
        filename: where to write (atomically).
        metadata: extra ``str`` -> ``str`` metadata (not modified).
        force_contiguous: accepted for compatibility. Non-contiguous tensors are saved
            as their values either way.
        checksums: record each tensor's CRC32C in the header (see :func:`save_file`).

    Raises:
        RuntimeError: tensors share memory and none of them covers it whole.
        UnsupportedTensorError, OSError: as for :func:`save_file`.

    Example:
        >>> save_model(torch.nn.Linear(2, 2), "model.safetensors")
    """
    state_dict = model.state_dict()
    meta = dict(metadata) if metadata is not None else None
    for kept, removed in _remove_duplicate_names(state_dict).items():
        for name in removed:
            if meta is None:
                meta = {}
            meta.setdefault(name, kept)
            del state_dict[name]
    if force_contiguous:
        state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    save_file(state_dict, filename, metadata=meta, checksums=checksums)


def load_model(
    model: torch.nn.Module,
    filename: FILE_PATH,
    strict: bool = True,
    device: DEVICE = "cpu",
    *,
    backend: str = "mmap",
) -> Tuple[List[str], List[str]]:
    """Loads a file written by :func:`save_model` (or any safetensors file) into a model.

    Names the file stores once for a group of tied tensors fill the whole group: a
    tied name missing from the file is not reported missing when its kept name was
    loaded (the model's tie shares the memory); a name of a tie that the file stores
    in addition is reported unexpected.

    Args:
        model: the module to load into.
        filename: the file.
        strict: raise when names are missing or unexpected (else only return them).
        device: where the tensors are loaded before copying, as in :func:`load_file`.
        backend: ``"mmap"`` or ``"pread"``, as in :func:`load_file`.

    Returns:
        ``(missing, unexpected)``: names of the model the file did not fill, and names
        of the file the model did not use.

    Raises:
        RuntimeError: ``strict`` and some names are missing or unexpected, or the
            model's tensors cannot be matched (as ``load_state_dict``).
        SafetensorError, OSError: as for :func:`load_file`.

    Example:
        >>> missing, unexpected = load_model(torch.nn.Linear(2, 2), "model.safetensors")
    """
    state_dict = load_file(filename, device=device, backend=backend)
    removals = _remove_duplicate_names(model.state_dict(), preferred_names=state_dict.keys())
    missing_keys, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = set(missing_keys)
    for names in removals.values():
        for name in names:
            if name in missing:
                missing.remove(name)
            else:
                unexpected.append(name)
    if strict and (missing or unexpected):
        parts = [f"Error(s) in loading state_dict for {type(model).__name__}:"]
        if missing:
            parts.append("    Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(missing)))
        if unexpected:
            parts.append("    Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(unexpected)))
        raise RuntimeError("\n".join(parts))
    return missing, unexpected


# ---- raw serialization (the top-level safetensors functions) ----

_CODE_OF = {str(dt).rsplit(".", 1)[-1]: code for code, dt in _core.DTYPES.items() if dt is not None}


class TensorSpec:
    """One tensor for :func:`serialize` / :func:`serialize_file`, as in safetensors 0.8.

    Args:
        dtype: torch's name for the dtype (``"float32"``, ``"bfloat16"``, ...).
        shape: the shape. For ``float4_e2m1fn_x2`` (two values per byte) torch's shape
            is accepted and its last dimension doubled, as the format counts values.
        data_ptr: the address of the contiguous bytes (the caller keeps them alive).
        data_len: their length in bytes.

    Raises:
        SafetensorError: an unknown dtype.

    Example:
        >>> t = torch.ones(2)
        >>> spec = TensorSpec(dtype="float32", shape=[2], data_ptr=t.data_ptr(), data_len=8)
        >>> spec.dtype
        'F32'
    """

    def __init__(self, *, dtype: str, shape: Iterable[int], data_ptr: int, data_len: int) -> None:
        code = _CODE_OF.get(dtype) if isinstance(dtype, str) else None
        if code is None:
            raise SafetensorError(f"unknown dtype {dtype!r} (expected one of: {', '.join(_CODE_OF)})")
        dims = [int(d) for d in shape]
        if code == "F4" and dims:
            dims[-1] *= 2
        self._dtype = code
        self._shape = dims
        self._ptr = int(data_ptr)
        self._len = int(data_len)

    @property
    def dtype(self) -> str:
        """The format's code for the dtype (``"F32"``, ``"BF16"``, ...)."""
        return self._dtype

    @property
    def shape(self) -> List[int]:
        """The shape the header records (values, not bytes)."""
        return list(self._shape)

    @property
    def data_ptr(self) -> int:
        """The address of the bytes."""
        return self._ptr

    @property
    def data_len(self) -> int:
        """The length of the bytes."""
        return self._len

    def __repr__(self) -> str:
        return f"TensorSpec(dtype={self._dtype!r}, shape={self._shape}, data_len={self._len})"


class _SpecError(SafetensorError, UnsupportedTensorError):
    """A value of serialize's dict that is not a tensor spec: the package raised
    SafetensorError before 0.8 and TypeError since; this is both."""



def _spec_tensor(name: str, spec: Any, keep: List[Any]) -> torch.Tensor:
    """A CPU tensor over the bytes a spec describes (zero-copy)."""
    if isinstance(spec, TensorSpec):
        code, shape, nbytes = spec.dtype, spec.shape, spec.data_len
        raw: Any = (ctypes.c_ubyte * nbytes).from_address(spec.data_ptr) if nbytes else b""
    elif isinstance(spec, Mapping) and {"dtype", "shape", "data"} <= set(spec):
        code = spec["dtype"] if spec["dtype"] in _core.DTYPES else _CODE_OF.get(spec["dtype"])
        if code is None:
            raise SafetensorError(f"tensor {name!r}: unknown dtype {spec['dtype']!r}")
        shape = [int(d) for d in spec["shape"]]
        raw = memoryview(spec["data"]).cast("B")
        nbytes = raw.nbytes
    else:
        raise _SpecError(
            f"tensor {name!r}: expected a TensorSpec or a dict with dtype, shape and data, "
            f"got {type(spec).__name__}"
            + (f" without {sorted({'dtype', 'shape', 'data'} - set(spec))}" if isinstance(spec, Mapping) else "")
        )
    dtype = _core.DTYPES.get(code)
    if dtype is None:
        raise SafetensorError(f"tensor {name!r}: dtype {code} has no torch equivalent here")
    tshape = _core._torch_shape(code, tuple(shape), name)
    numel = 1
    for d in tshape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != nbytes:
        raise SafetensorError(
            f"tensor {name!r}: {nbytes} bytes of data for shape {shape} of {code}, which needs "
            f"{numel * itemsize}"
        )
    keep.append(raw)
    if nbytes == 0:
        return torch.empty(tshape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only bytes: we only read them
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(tshape)


def _spec_tensors(tensor_dict: Mapping[str, Any], keep: List[Any]) -> Dict[str, torch.Tensor]:
    if not isinstance(tensor_dict, Mapping):
        raise UnsupportedTensorError(f"expected a dict of str to TensorSpec, got {type(tensor_dict).__name__}")
    out = {}
    for name, spec in tensor_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names are str, not {type(name).__name__}")
        out[name] = _spec_tensor(name, spec, keep)
    return out


def serialize(tensor_dict: Mapping[str, Any], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """Serializes raw tensors to safetensors bytes, as ``safetensors.serialize``.

    Args:
        tensor_dict: names to :class:`TensorSpec` (safetensors 0.8), or to dicts
            ``{"dtype", "shape", "data"}`` with the bytes in ``data`` (earlier versions;
            ``dtype`` as the format's code or torch's name).
        metadata: optional ``str`` -> ``str`` metadata.

    Returns:
        The bytes of a safetensors file.

    Raises:
        SafetensorError: an unknown dtype, or a data length that does not match the shape.
        TypeError: a name is not a ``str``, or a value is neither form.

    Example:
        >>> serialize({"a": {"dtype": "F32", "shape": [1], "data": b"\\x00\\x00\\x80?"}})[:8]
        b'H\\x00\\x00\\x00\\x00\\x00\\x00\\x00'
    """
    keep: List[Any] = []
    return _c_save(_spec_tensors(tensor_dict, keep), metadata)


def serialize_file(
    tensor_dict: Mapping[str, Any], filename: FILE_PATH, metadata: Optional[Dict[str, str]] = None
) -> None:
    """Serializes raw tensors into a file (atomically), as ``safetensors.serialize_file``.

    Args:
        tensor_dict: as for :func:`serialize`.
        filename: where to write.
        metadata: optional ``str`` -> ``str`` metadata.

    Raises:
        SafetensorError, TypeError: as for :func:`serialize`.
        OSError: the file cannot be written; a previous file is untouched.

    Example:
        >>> serialize_file({"a": {"dtype": "U8", "shape": [2], "data": b"ab"}}, "a.safetensors")
    """
    keep: List[Any] = []
    _c_save(_spec_tensors(tensor_dict, keep), metadata, os.fspath(filename))


def deserialize(data: Any) -> List[Tuple[str, Dict[str, Any]]]:
    """Parses safetensors bytes into raw tensors, as ``safetensors.deserialize``.

    Args:
        data: the bytes of a safetensors file (any buffer).

    Returns:
        ``[(name, {"shape": [...], "dtype": "F32", "data": bytearray}), ...]`` in the
        order of the data in the file.

    Raises:
        SafetensorError: the bytes are malformed.

    Example:
        >>> deserialize(serialize({"a": {"dtype": "U8", "shape": [2], "data": b"ab"}}))
        [('a', {'shape': [2], 'dtype': 'U8', 'data': bytearray(b'ab')})]
    """
    reader = _C.Reader(data=data)
    try:
        view = memoryview(reader.buffer()).cast("B")
        out = []
        for name in reader.offset_keys():
            dtype, shape, begin, end = reader.info(name)  # offsets from the start of the bytes
            out.append((name, {"shape": list(shape), "dtype": dtype, "data": bytearray(view[begin:end])}))
        return out
    finally:
        reader.close()
