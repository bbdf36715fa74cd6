"""torch.save / torch.load speak safetensors.

On import, ``torch.save``, ``torch.load``, ``torch.serialization.save`` and
``torch.serialization.load`` are replaced by wrappers that keep torch's signatures and
add keyword-only ``format`` (and ``metadata`` on save). ``torch.load`` recognises
safetensors by its bytes; everything else goes to torch's own loader with
``weights_only=True`` unless the caller explicitly passes ``weights_only=False``.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import io
import os
import pickle
import stat
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.serialization as _ser

from . import _C, _checkpoint, _core, _default, _source, _stream
from . import _legacy as _legacy_reader
from ._core import SafetensorError

FORMATS = ("safetensors", "pickle")
_SNIFF_BYTES = 4096

# torch's functions as they were before install(); set once, never overwritten
_orig_save: Optional[Callable[..., Any]] = None
_orig_load: Optional[Callable[..., Any]] = None
_MARK = "__torch_safetensors_original__"


def _check_format(fmt: Optional[str]) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))} or None, not {fmt!r}")


# ---- saving ----


def _is_path(f: Any) -> bool:
    return isinstance(f, (str, os.PathLike))


def _has_safetensors_suffix(f: Any) -> bool:
    if not _is_path(f):
        return False
    path = os.fspath(f)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return path.lower().endswith(".safetensors")


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
    """
    tensors, header_meta, plain = parts if parts is not None else _checkpoint.split(obj)
    base = base_metadata(metadata)
    if _is_path(f):
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


# ---- loading ----


def _location_target(map_location: Any) -> Tuple[Optional[str], Optional[Callable[..., Any]]]:
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


def _apply_callable(fn: Callable[..., Any], tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
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


def _read_tensors(reader: "_C.Reader", map_location: Any) -> Dict[str, torch.Tensor]:
    device, fn = _location_target(map_location)
    if fn is not None:
        tensors = _core.build(reader, None, "cpu")
        return _apply_callable(fn, tensors)
    where, dev = _core.resolve_device(device)
    return _core.move(_core.build(reader, None, where), dev)


def _finish(reader: "_C.Reader", map_location: Any, trusted: bool = False) -> Any:
    """trusted: the caller passed weights_only=False, so the classes a checkpoint names
    are rebuilt without the allowlist."""
    try:
        tensors = _read_tensors(reader, map_location)
        return _checkpoint.unflatten(tensors, reader.metadata(), trusted=trusted,
                                     source=lambda name: _core.build(reader, [name], "cpu")[name])
    finally:
        reader.close()


def _open_path(f: Any) -> Tuple[int, bool]:
    """Opens a path once and says whether its bytes are safetensors.

    A FIFO or a socket is refused at once (torch cannot load one either: it would wait
    for a writer, then fail to seek); a device is left to torch, as before."""
    fd, st = _source.open_path(f)
    try:
        if not stat.S_ISREG(st.st_mode):
            return fd, False
        head = os.pread(fd, _SNIFF_BYTES, 0)
        return fd, _C.sniff(head, st.st_size)
    except BaseException:
        os.close(fd)
        raise


def _fileobj_source(f: Any) -> Optional[Tuple[int, int, Any]]:
    """For a seekable binary file object holding safetensors at its position:
    (position, size, fd or None). None when it is not safetensors.

    Positions come from ``tell()``: some wrappers' ``seek()`` returns None."""
    try:
        if not f.seekable():
            return None
    except (AttributeError, ValueError, OSError):
        return None
    pos = f.tell()
    if not isinstance(pos, int) or isinstance(pos, bool):
        return None  # a tell() that returns no position: leave the object to torch
    head = f.read(_SNIFF_BYTES)
    f.seek(0, io.SEEK_END)
    end = f.tell()
    f.seek(pos)
    if not isinstance(end, int) or end < pos:
        return None
    if not isinstance(head, (bytes, bytearray)) or not _C.sniff(bytes(head[:_SNIFF_BYTES]), end - pos):
        return None
    fd = None
    try:
        fd = f.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        fd = None
    if not isinstance(fd, int) or isinstance(fd, bool):
        fd = None
    else:
        # a wrapper (decrypting, decompressing) may expose its underlying file's
        # descriptor: read through the descriptor only if it holds the same bytes
        try:
            if os.pread(fd, len(head), pos) != bytes(head):
                fd = None
        except OSError:
            fd = None
    return pos, end - pos, fd


def load_safetensors_fileobj(f: Any, map_location: Any, mmap: Optional[bool],
                             src: Optional[Tuple[int, int, Any]], trusted: bool = False) -> Any:
    """Loads safetensors from a file object at its position.

    A file with a descriptor, holding exactly the file, is mapped like a path. Any other
    stream (seekable with its size in src, or non-seekable with src None) is read once:
    the header, then each tensor's own storage filled with readinto.
    """
    if src is not None:
        pos, size, fd = src
        if fd is not None and pos == 0 and os.fstat(fd).st_size == size:
            reader = _C.Reader(fd=fd, mmap=mmap is not False)
            f.seek(pos + size)
            return _finish(reader, map_location, trusted)
        size_arg: Optional[int] = size
    else:
        size_arg = None
    device, fn = _location_target(map_location)
    if fn is not None:
        tensors, metadata = _stream.load(f, size=size_arg)
        tensors = _apply_callable(fn, tensors)
    else:
        where, dev = _core.resolve_device(device)
        tensors, metadata = _stream.load(f, size=size_arg, device=where)
        tensors = _core.move(tensors, dev)
    return _checkpoint.unflatten(tensors, metadata, trusted=trusted)


def _load_nonseekable(f: Any, map_location: Any, format: Optional[str], trusted: bool = False) -> Any:
    """A stream that cannot seek: torch's own formats need seeking, so it must be safetensors."""
    try:
        return load_safetensors_fileobj(f, map_location, None, None, trusted)
    except SafetensorError as e:
        if format == "safetensors":
            raise
        err = _core.error(
            f"{e} (a stream that cannot seek can only hold safetensors here: torch's own "
            "formats need a seekable file; read it into io.BytesIO first)",
            e.code,
            e.tensor,
        )
        raise err from None


def _weights_only_hint(err: BaseException) -> str:
    return (
        f"{err}\n\n"
        "torch_safetensors loaded this legacy (pickle) checkpoint with weights_only=True, "
        "because pickle can run code from the file; it was not retried unsafely. To move on:\n"
        "  (1) convert it once, in an environment you trust, to safetensors: "
        "torch.save(torch.load(path, weights_only=False), new_path, format=\"safetensors\");\n"
        "  (2) or, if you trust the file, allowlist the classes it needs with "
        "torch.serialization.add_safe_globals([...]) (see the message above for their names);\n"
        "  (3) or pass weights_only=False explicitly, only for a file from a trusted source."
        + _FORCE_NO_WEIGHTS_ONLY_NOTE * _force_no_weights_only_set()
    )


_FORCE_NO_WEIGHTS_ONLY_NOTE = (
    "\nTORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set in this environment: torch_safetensors "
    "deliberately does not honour it, because a variable set once for one trusted file would "
    "let every later file run code. Pass weights_only=False in the call instead."
)


def _force_no_weights_only_set() -> bool:
    """Whether torch's TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set (we never honour it)."""
    return os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true")


# ---- the wrappers ----


def load(f: Any, *args: Any, format: Optional[str] = None, **kwargs: Any) -> Any:
    _check_format(format)
    bound = _LOAD_SIG.bind(f, *args, **kwargs)
    a = bound.arguments
    map_location = a.get("map_location")
    mmap = a.get("mmap")
    trusted = a.get("weights_only") is False  # the caller trusts the file, as with pickle

    if format != "pickle":
        if _is_path(f):
            if os.path.isdir(f):
                return _load_sharded(f, map_location, mmap, a.get("weights_only"))
            fd, is_st = _open_path(f)
            try:
                if is_st:
                    reader = _C.Reader(fd=fd, mmap=mmap is not False)
                    return _finish(reader, map_location, trusted)
                if _is_sharded_index(f, fd):
                    return _load_sharded(f, map_location, mmap, a.get("weights_only"))
                if format == "safetensors":
                    # the strict reader says which rule the file breaks
                    return _finish(_C.Reader(fd=fd, mmap=mmap is not False), map_location, trusted)
                # torch would hand any "*.safetensors" path to another reader by its
                # name: give torch the same open file under a neutral name instead
                target = f"/proc/self/fd/{fd}" if _has_safetensors_suffix(f) else f
                try:
                    return _legacy_reader.load_path(fd, bound, lambda: _legacy(target, bound))
                except Exception as e:
                    if not _neither(os.pread(fd, 512, 0), e):
                        raise
                    # neither a torch checkpoint nor (by its first bytes) safetensors:
                    # the strict reader explains it (or reads it, if the sniff missed it)
                    with _explained(e):
                        reader = _C.Reader(fd=fd, mmap=mmap is not False)
                    return _finish(reader, map_location, trusted)
            finally:
                os.close(fd)
        elif hasattr(f, "read"):
            src = _fileobj_source(f)
            if src is not None:
                return load_safetensors_fileobj(f, map_location, mmap, src, trusted)
            pos = _tell(f)
            if pos is None:
                return _load_nonseekable(f, map_location, format, trusted)
            if format == "safetensors":
                return _finish(_C.Reader(data=f.read()), map_location, trusted)
            try:
                return _legacy(f, bound)
            except Exception as e:
                if pos is None:
                    raise
                f.seek(pos)
                data = f.read()
                if not isinstance(data, (bytes, bytearray)) or not _neither(bytes(data[:512]), e):
                    raise
                with _explained(e):
                    reader = _C.Reader(data=data)
                return _finish(reader, map_location, trusted)
    return _legacy(f, bound)


@contextlib.contextmanager
def _explained(torch_error: BaseException) -> Iterator[None]:
    """Re-raises a SafetensorError saying that torch's loader refused the bytes too."""
    try:
        yield
    except SafetensorError as e:
        err = _core.error(
            f"not a torch checkpoint (torch's loader raised {type(torch_error).__name__}) "
            f"and not a valid safetensors file: {e}",
            e.code,
            e.tensor,
        )
        err.position = e.position
        raise err from torch_error


def _tell(f: Any) -> Optional[int]:
    """The position of a seekable file object, else None."""
    try:
        return f.tell() if f.seekable() else None
    except (AttributeError, OSError, ValueError):
        return None


def _neither(head: bytes, err: BaseException) -> bool:
    """Whether torch's loader failed on bytes that are not a torch checkpoint at all.

    Not when the bytes are a zip, a protocol 2+ pickle or a tar (torch's formats), a
    pickle whose globals were refused, or when torch recognised and refused a format it
    knows (its RuntimeErrors: TorchScript, legacy tar, mmap of a legacy file). Such
    bytes are reported by the strict safetensors reader instead of torch's unpickler."""
    if head[:2] == b"PK" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return False
    if head[257:262] == b"ustar":
        return False
    if head.startswith(b"L%d" % _ser.MAGIC_NUMBER):  # pre-1.6 with pickle protocol 0 or 1
        return False
    if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err):
        return False
    return not isinstance(err, (RuntimeError, OSError, MemoryError, KeyboardInterrupt))


# ---- sharded checkpoints (a directory, or a *.safetensors.index.json) ----


def _is_sharded_index(f: Any, fd: int) -> bool:
    """Whether a file that is not safetensors is an index (safetensors or legacy ``.bin``
    shards): by name, or JSON by content (a pickle never starts with '{')."""
    name = _source.fspath(f)
    return (name.endswith(_source.INDEX_SUFFIX) or name.endswith(_source.LEGACY_INDEX_SUFFIX)
            or _source.is_index_head(os.pread(fd, 64, 0)))


def _load_sharded(f: Any, map_location: Any, mmap: Optional[bool], weights_only: Optional[bool] = None) -> Any:
    from . import _sharded  # imported here: _sharded builds on this module

    return _sharded.load_sharded(f, map_location=map_location, mmap=mmap,
                                 weights_only=weights_only is not False)


# ---- the legacy path ----


def _legacy(f: Any, bound: inspect.BoundArguments) -> Any:
    """torch's own loader on f, with weights_only=True unless the caller passed False."""
    assert _orig_load is not None
    a = bound.arguments
    explicit_unsafe = a.get("weights_only") is False
    if not explicit_unsafe:
        if a.get("pickle_module") is not None:
            raise RuntimeError(
                "torch_safetensors loads legacy checkpoints with weights_only=True, and a "
                "custom pickle_module cannot be made safe. Pass weights_only=False explicitly "
                "to use it, only for a file from a trusted source."
            )
        a["weights_only"] = True
    args, kwargs = bound.args[1:], bound.kwargs
    if explicit_unsafe:
        return _orig_load(f, *args, **kwargs)
    try:
        return _orig_load(f, *args, **kwargs)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(_weights_only_hint(e)) from None


def save(
    obj: Any,
    f: Any,
    *args: Any,
    format: Optional[str] = None,
    metadata: Optional[Dict[str, str]] = None,
    durable: bool = False,
    checksums: bool = False,
    **kwargs: Any,
) -> None:
    _check_format(format)
    if format == "safetensors" or (format is None and _has_safetensors_suffix(f)):
        _SAVE_SIG.bind(obj, f, *args, **kwargs)  # torch's own arguments still checked
        save_safetensors(obj, f, metadata, durable=durable, checksums=checksums)
        return
    if format is None and _default.get_default_format() == "safetensors":
        _SAVE_SIG.bind(obj, f, *args, **kwargs)
        if _save_by_default(obj, f, metadata, durable, checksums):
            return
        metadata, durable, checksums = None, False, False  # the fallback: torch's own format below
    if metadata is not None or durable or checksums:
        raise ValueError("metadata, durable and checksums apply only with format='safetensors'")
    assert _orig_save is not None
    _orig_save(obj, f, *args, **kwargs)


def _target_name(f: Any) -> str:
    if _is_path(f):
        return repr(os.fsdecode(os.fspath(f)))
    name = getattr(f, "name", None)
    return repr(name) if isinstance(name, (str, bytes)) else f"a {type(f).__name__}"


def _save_by_default(
    obj: Any, f: Any, metadata: Optional[Dict[str, str]], durable: bool, checksums: bool
) -> bool:
    """Saves as safetensors because that is the default format. False when the object
    cannot be stored and the fallback to pickle is on (nothing was written: paths are
    written atomically and file objects only after the whole file is built).

    Cannot be stored: a TypeError (a value the format refuses), or a ValueError about
    the object's shape that pickle does not mind (a cycle, keys whose dotted names
    collide)."""
    try:
        save_safetensors(obj, f, metadata, durable=durable, checksums=checksums)
        return True
    except (TypeError, ValueError) as e:
        if not (_is_path(f) or hasattr(f, "write")) or type(e) not in (TypeError, ValueError):
            raise
        if _default.fallback() != "pickle":
            raise type(e)(
                f"{e}\n(torch.save to {_target_name(f)} writes safetensors because the default format is "
                f"safetensors ({_default.ENV_FORMAT} or set_default_format); pass "
                f"format='pickle' to this call, or set {_default.ENV_FALLBACK}=pickle to "
                "write pickle whenever an object cannot be stored)"
            ) from None
        warnings.warn(
            f"torch.save to {_target_name(f)} wrote pickle, not safetensors: {e}",
            _default.PickleFallbackWarning,
            stacklevel=4,
        )
        return False


# ---- signatures and docs ----

_SAVE_DOC = """

torch_safetensors adds:
    format (str, optional, keyword-only): ``"safetensors"`` writes a standard
        safetensors file (atomically, for paths); ``"pickle"`` forces torch's own
        format; ``None`` (default) writes the default format (torch's, unless
        ``TORCH_SAFETENSORS_FORMAT=safetensors`` or
        ``torch_safetensors.set_default_format("safetensors")``), except for paths
        ending in ``.safetensors``, which are always written as safetensors.
    metadata (dict[str, str], optional, keyword-only): extra header metadata for
        safetensors files (``{"format": "pt"}`` is always written).
    durable (bool, keyword-only): with safetensors, flush the data and the directory
        entry to stable storage before returning (off by default, as torch.save).
    checksums (bool, keyword-only): with safetensors, record each tensor's CRC32C in
        the header metadata, checked by ``torch-safetensors verify --data``.
"""

_LOAD_DOC = """

torch_safetensors adds:
    Safetensors files are recognised by their bytes, whatever their name, and load
    zero-copy from a private mapping (``mmap=False`` reads them into memory). Every
    other file goes to torch's loader with ``weights_only=True`` unless
    ``weights_only=False`` is passed explicitly; a failed safe load is never retried
    unsafely.
    format (str, optional, keyword-only): ``"safetensors"`` requires a safetensors
        file; ``"pickle"`` skips the check and uses torch's loader; ``None`` decides
        by content.
"""


def _extend_signature(fn: Callable[..., Any], extra: list) -> inspect.Signature:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    var_kw = [p for p in params if p.kind is p.VAR_KEYWORD]
    rest = [p for p in params if p.kind is not p.VAR_KEYWORD]
    return sig.replace(parameters=rest + extra + var_kw)


def _kwonly(name: str, default: Any = None, annotation: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _make_wrappers() -> Tuple[Callable[..., Any], Callable[..., Any]]:
    assert _orig_save is not None and _orig_load is not None

    @functools.wraps(_orig_save)
    def save_wrapper(obj: Any, f: Any, *args: Any, format: Optional[str] = None,
                     metadata: Optional[Dict[str, str]] = None, durable: bool = False,
                     checksums: bool = False, **kwargs: Any) -> None:
        return save(obj, f, *args, format=format, metadata=metadata, durable=durable,
                    checksums=checksums, **kwargs)

    @functools.wraps(_orig_load)
    def load_wrapper(f: Any, *args: Any, format: Optional[str] = None, **kwargs: Any) -> Any:
        return load(f, *args, format=format, **kwargs)

    save_wrapper.__signature__ = _extend_signature(  # type: ignore[attr-defined]
        _orig_save,
        [
            _kwonly("format", None, Optional[str]),
            _kwonly("metadata", None, Optional[Dict[str, str]]),
            _kwonly("durable", False, bool),
            _kwonly("checksums", False, bool),
        ],
    )
    load_wrapper.__signature__ = _extend_signature(  # type: ignore[attr-defined]
        _orig_load, [_kwonly("format", None, Optional[str])]
    )
    save_wrapper.__doc__ = (_orig_save.__doc__ or "") + _SAVE_DOC
    load_wrapper.__doc__ = (_orig_load.__doc__ or "") + _LOAD_DOC
    setattr(save_wrapper, _MARK, _orig_save)
    setattr(load_wrapper, _MARK, _orig_load)
    return save_wrapper, load_wrapper


_wrappers: Optional[Tuple[Callable[..., Any], Callable[..., Any]]] = None
_SAVE_SIG: inspect.Signature
_LOAD_SIG: inspect.Signature


def install() -> None:
    """Wraps torch.save/torch.load (and their torch.serialization names). Idempotent."""
    global _orig_save, _orig_load, _wrappers, _SAVE_SIG, _LOAD_SIG
    if _orig_save is None:
        # if another copy already wrapped torch, wrap the originals it kept
        _orig_save = getattr(_ser.save, _MARK, _ser.save)
        _orig_load = getattr(_ser.load, _MARK, _ser.load)
        _SAVE_SIG = inspect.signature(_orig_save)
        _LOAD_SIG = inspect.signature(_orig_load)
        _wrappers = _make_wrappers()
    assert _wrappers is not None
    save_w, load_w = _wrappers
    torch.save = _ser.save = save_w
    torch.load = _ser.load = load_w


def uninstall() -> None:
    """Restores torch's original torch.save/torch.load."""
    if _orig_save is None or _orig_load is None:
        return
    torch.save = _ser.save = _orig_save
    torch.load = _ser.load = _orig_load


def installed() -> bool:
    """Whether torch.save/torch.load are currently the torch_safetensors wrappers."""
    return _wrappers is not None and torch.load is _wrappers[1] and torch.save is _wrappers[0]
