"""One loader per kind of source (``_source.resolve``), shared by torch.load, the
sharded loader and the CLI.

Each loader takes the resolved :class:`~torch_safetensors._source.Source` and torch.load's
bound arguments (:class:`Args`). Safetensors bytes go through our reader (zero-copy from
a mapping where there is a descriptor, ``readinto`` each tensor's storage otherwise);
everything else goes through ``_legacy``, the one place that decides when torch's own
``weights_only`` loader reads a file.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch

from . import _C, _checkpoint, _core, _legacy, _source, _stream
from ._core import SafetensorError

__all__ = ["Args", "finish", "read_tensors", "location_target"]


class Args:
    """torch.load's arguments, and what the loaders ask of them.

    Binding them to torch.load's signature (``inspect.Signature.bind``) costs about as
    much as loading a small safetensors file, and only torch's own loader needs the bound
    form: a call with keyword arguments only (every keyword is valid: the unknown ones
    are torch's ``pickle_load_args``) is bound when ``bound`` is first asked for; any
    other call is bound at once, so a wrong one raises torch's TypeError before a load.
    """

    __slots__ = ("_sig", "_f", "_kwargs", "_bound", "format")

    def __init__(self, sig: inspect.Signature, f: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                 format: Optional[str] = None) -> None:
        self._sig = sig
        self._f = f
        self._kwargs = kwargs
        self._bound: Optional[inspect.BoundArguments] = None
        self.format = format
        if args or "f" in kwargs:
            self._bound = sig.bind(f, *args, **kwargs)

    @property
    def bound(self) -> inspect.BoundArguments:
        """The arguments bound to torch.load's signature (bound once, then shared)."""
        if self._bound is None:
            self._bound = self._sig.bind(self._f, **self._kwargs)
        return self._bound

    def _get(self, name: str) -> Any:
        if self._bound is None:
            return self._kwargs.get(name)
        return self._bound.arguments.get(name)

    @property
    def map_location(self) -> Any:
        return self._get("map_location")

    @property
    def mmap(self) -> Optional[bool]:
        return self._get("mmap")

    @property
    def weights_only(self) -> Optional[bool]:
        return self._get("weights_only")

    @property
    def trusted(self) -> bool:
        """The caller passed weights_only=False: classes a checkpoint names are rebuilt
        without the allowlist, as with pickle."""
        return self._get("weights_only") is False


def bind(f: Any, **kwargs: Any) -> Args:
    """Args for an internal load (a legacy shard) with torch.load's signature."""
    return Args(inspect.signature(_legacy._torch_loader()), f, (), kwargs)


# ---- map_location ----


def location_target(map_location: Any) -> Tuple[Optional[str], Optional[Callable[..., Any]]]:
    """Reduces torch's four map_location forms to a device string or a callable.

    Safetensors data carries no device: every tensor's location tag is "cpu".
    """
    if map_location is None:
        return "cpu", None
    if isinstance(map_location, bytes):
        map_location = map_location.decode()
    if isinstance(map_location, (str, torch.device)):
        return str(map_location), None
    if isinstance(map_location, dict):
        target = map_location.get("cpu", "cpu")
        if isinstance(target, bytes):
            target = target.decode()
        return str(target), None
    if callable(map_location):
        return None, map_location
    raise TypeError(
        "map_location must be a str, bytes, torch.device, dict or callable, "
        f"not {type(map_location).__name__}"
    )


def apply_callable(fn: Callable[..., Any], tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Calls fn(storage, "cpu") per tensor, as torch does for its own files."""
    out = {}
    for name, t in tensors.items():
        storage = t.untyped_storage()
        result = fn(storage, "cpu")
        if result is None or result is storage:
            out[name] = t
            continue
        if isinstance(result, torch.storage.TypedStorage):
            result = result._untyped_storage
        moved = torch.empty((0,), dtype=t.dtype, device=result.device)
        moved.set_(result, 0, t.shape, t.stride())
        out[name] = moved
    return out


def read_tensors(reader: "_C.Reader", map_location: Any) -> Dict[str, torch.Tensor]:
    """Every tensor of a validated reader, placed as map_location says."""
    device, fn = location_target(map_location)
    if fn is not None:
        return apply_callable(fn, _core.build(reader, None, "cpu"))
    where, dev = _core.resolve_device(device)
    return _core.move(_core.build(reader, None, where), dev)


def finish(reader: "_C.Reader", map_location: Any, trusted: bool = False) -> Any:
    """The object a validated reader holds (a state dict, or a whole checkpoint rebuilt
    from its structure); closes the reader.

    Args:
        trusted: the caller passed weights_only=False, so the classes a checkpoint
            names are rebuilt without the allowlist.
    """
    try:
        return _checkpoint.unflatten(read_tensors(reader, map_location), reader.metadata(), trusted=trusted,
                                     source=lambda name: _core.build(reader, [name], "cpu")[name])
    finally:
        reader.close()


# ---- safetensors ----


def _reader(src: _source.Source, fd: int, mmap: Optional[bool]) -> "_C.Reader":
    """Our reader over a descriptor; a refusal names the file, and says what it is when
    it is one of torch's formats."""
    try:
        return _C.Reader(fd=fd, mmap=mmap is not False)
    except SafetensorError as e:
        err = _source.not_safetensors(src.name, src.head, e, path=src.is_path)
        raise (err if err is not e else _source.named(src.name, e)) from None


def load_safetensors(src: _source.Source, a: Args) -> Any:
    """A path whose bytes are safetensors: validated, then zero-copy from a private mapping."""
    assert src.fd is not None
    reader = _reader(src, src.fd, a.mmap)
    try:
        return finish(reader, a.map_location, a.trusted)
    except SafetensorError as e:
        raise _source.named(src.name, e) from None


def _data_names(metadata: Optional[Dict[str, str]], entries: List[Any]) -> Set[str]:
    """The stored tensors a structure reads as data (bytes, numpy values), which are
    read on the CPU wherever map_location puts the tensors."""
    text = (metadata or {}).get(_checkpoint.STRUCTURE_KEY)
    if text is None:
        return set()
    held = {name: (dtype, shape, end - begin) for name, dtype, shape, begin, end in entries}
    return set(_checkpoint.validate(text, held)["data"])


def _from_stream(f: Any, size: Optional[int], a: Args) -> Any:
    data: Set[str] = set()

    def on_cpu(metadata: Optional[Dict[str, str]], entries: List[Any]) -> Set[str]:
        data.update(_data_names(metadata, entries))
        return data

    device, fn = location_target(a.map_location)
    if fn is not None:
        tensors, metadata = _stream.load(f, size=size, on_cpu=on_cpu)
        cpu = {n: tensors[n] for n in data}
        tensors = apply_callable(fn, tensors)
    else:
        where, dev = _core.resolve_device(device)
        tensors, metadata = _stream.load(f, size=size, device=where, on_cpu=on_cpu)
        cpu = {n: tensors[n] for n in data}
        tensors = _core.move(tensors, dev)
        if where == "meta":
            tensors = {n: t.to("meta") for n, t in tensors.items()}
    return _checkpoint.unflatten(tensors, metadata, trusted=a.trusted, source=cpu.__getitem__)


def load_fileobj_safetensors(src: _source.Source, a: Args) -> Any:
    """A seekable file object holding safetensors at its position.

    One whose descriptor holds exactly its bytes is mapped like a path; any other is
    read once: the header, then each tensor's own storage filled with readinto. The
    object is left after the file's last byte, as torch leaves it."""
    f = src.f
    if src.map_fd is not None:
        reader = _reader(src, src.map_fd, a.mmap)
        f.seek(src.pos + (src.size or 0))
        return finish(reader, a.map_location, a.trusted)
    return _from_stream(f, src.size, a)


class _HeadRecorder:
    """Reads through to a stream and keeps its first bytes: after a refusal they tell a
    damaged safetensors stream (our error) from bytes that never were one (torch's)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.head = bytearray()
        if callable(getattr(f, "readinto", None)):
            self.readinto = self._readinto

    def _keep(self, data: Any) -> None:
        room = _source.SNIFF_BYTES - len(self.head)
        if room > 0:
            self.head += bytes(data[:room])

    def read(self, n: int = -1) -> Any:
        data = self._f.read(n)
        if isinstance(data, (bytes, bytearray)):
            self._keep(data)
        return data

    def _readinto(self, view: Any) -> Any:
        n = self._f.readinto(view)
        if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= len(view):
            self._keep(memoryview(view)[:n])
        return n


def load_stream(src: _source.Source, a: Args) -> Any:
    """A file object torch cannot seek: it must hold safetensors (torch's own formats
    need seeking). Bytes that never were safetensors get torch's own error for such an
    object (unless the caller asked for format='safetensors'); a damaged safetensors
    stream gets ours."""
    stream = _HeadRecorder(src.f)
    try:
        return _from_stream(stream, None, a)
    except SafetensorError as e:
        if a.format == "safetensors" or _source.looks_like_safetensors(bytes(stream.head)):
            raise
        note = (f"torch_safetensors: {e} (a file object that cannot seek can only hold "
                "safetensors: torch's own formats need seeking; read it into io.BytesIO first)")
        try:
            torch.serialization._check_seekable(src.f)  # raises torch's exception, in its words
        except Exception as torch_err:  # noqa: BLE001 - re-raised as torch raised it
            if hasattr(torch_err, "add_note"):
                torch_err.add_note(note)
            raise torch_err from None
        raise _core.error(note[len("torch_safetensors: "):], e.code, e.tensor) from None


# ---- everything else: torch's formats, through _legacy ----


def load_legacy(src: _source.Source, a: Args) -> Any:
    """A path that is not safetensors: our C legacy reader first, torch's weights_only
    loader for the rest (``_legacy.load_path``)."""
    if a.format == "safetensors":
        return _strict(src, a)
    if src.fd is None or src.size is None:  # a device: torch reads it by path, as before
        return _legacy.torch_load(src.f, a.bound)
    # torch would hand any "*.safetensors" path to another reader by its name: give
    # torch the same open file under a neutral name instead
    target = f"/proc/self/fd/{src.fd}" if src.name.lower().endswith(".safetensors") else src.f
    return _legacy.load_path(src.fd, a.bound, lambda: _legacy.torch_load(target, a.bound, src.head))


def load_fileobj(src: _source.Source, a: Args) -> Any:
    """A seekable file object that is not safetensors: our C legacy reader first, reading
    through seek/readinto (``_legacy.load_fileobj``), torch's weights_only loader for the
    rest. An object whose first bytes could not be read goes to torch, which says why."""
    if a.format == "safetensors":
        return _strict(src, a)
    fallback = lambda: _legacy.torch_load(src.f, a.bound, src.head or None)  # noqa: E731
    if not src.head:  # its first bytes could not be read: torch says why
        return fallback()
    return _legacy.load_fileobj(src.f, a.bound, fallback)


def _strict(src: _source.Source, a: Args) -> Any:
    """format='safetensors' on bytes that do not claim to be safetensors: the strict
    reader decides, and its refusal names the rule and what the bytes are."""
    try:
        if src.fd is not None:
            return finish(_C.Reader(fd=src.fd, mmap=a.mmap is not False), a.map_location, a.trusted)
        return _from_stream(src.f, src.size, a)
    except SafetensorError as e:
        err = _source.not_safetensors(src.name, src.head, e, path=src.is_path)
        raise (err if err is not e else _source.named(src.name, e)) from None


def start_of(f: Any) -> Optional[int]:
    """A file object's position before torch reads it (None for paths or when unknown)."""
    if isinstance(f, (str, os.PathLike)):
        return None
    try:
        pos = f.tell()
    except Exception:  # noqa: BLE001 - only a better message was at stake
        return None
    return pos if isinstance(pos, int) and not isinstance(pos, bool) else None


def safetensors_named(f: Any, start: Optional[int]) -> Optional[str]:
    """For torch.load(format='pickle') failures: the name of f when its bytes (from
    ``start`` for a file object) are safetensors, so the error can say so; else None."""
    try:
        if isinstance(f, (str, os.PathLike)):
            fd, st = _source.open_path(f)
            try:
                head, size = os.pread(fd, _source.SNIFF_BYTES, 0), st.st_size
            finally:
                os.close(fd)
            name = _source.fspath(f)
        elif start is not None:
            f.seek(start)
            head = f.read(_source.SNIFF_BYTES)
            f.seek(start)
            size, name = 2**63, _source._object_name(f)
        else:
            return None
        if isinstance(head, (bytes, bytearray)) and _C.sniff(bytes(head), size):
            return name
    except Exception:  # noqa: BLE001 - only a better message was at stake
        pass
    return None


LOADERS: Dict[str, Callable[[_source.Source, Args], Any]] = {
    _source.SAFETENSORS: load_safetensors,
    _source.LEGACY: load_legacy,
    _source.FILEOBJ_SAFETENSORS: load_fileobj_safetensors,
    _source.FILEOBJ: load_fileobj,
    _source.STREAM: load_stream,
}
