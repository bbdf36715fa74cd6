"""Legacy torch checkpoints (``.pt``/``.bin``/``.pth``) through our C reader first.

This module is the one place that decides when torch's own ``weights_only`` loader reads
a legacy checkpoint. The C engine (``csrc/st_pickle.c``) interprets a strict subset of
what torch's ``weights_only`` unpickler accepts; anything outside it -- an opcode or
global it does not handle, a class the user allowlisted with ``add_safe_globals``, a
storage torch would place on another device, any doubt -- goes unchanged to torch's
``weights_only`` loader, never to an unsafe path.

torch's loader is used when:
  * the caller passed ``weights_only=False`` (explicitly unsafe: torch, as asked);
  * a ``pickle_module`` or extra pickle arguments are given (torch decides and refuses);
  * ``map_location`` is a callable, or sends a storage anywhere but the CPU;
  * torch's global state changes what its loader builds (fake tensor mode, ``skip_data``,
    shared mmap, a big-endian default for files without a byte order record);
  * the source is not a path to a zip checkpoint;
  * the C reader reports that the file is outside its subset (the reason is kept in
    :data:`last_fallback` for tests and diagnostics).
"""
from __future__ import annotations

import gc
import io
import mmap as _mmap
import os
import pickle
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional

import torch
import torch.serialization as _ser

from . import _C, _source

__all__ = ["load_path", "load_fileobj", "load_for_convert", "last_fallback"]

_C.legacy_init(
    OrderedDict,
    torch.Size,
    torch.device,
    torch.nn.Parameter,
    tuple(getattr(torch, name, None) for name in _C.legacy_dtype_names()),
)

#: why torch's loader read the last legacy checkpoint (None: the C reader did)
last_fallback: Optional[str] = None

_ZIP_MAGIC = b"PK\x03\x04"
# the pickled magic number that opens a pre-1.6 file (torch.serialization.MAGIC_NUMBER)
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def _is_tar(head: bytes) -> bool:
    """Whether torch would first read these bytes as its legacy tar format."""
    import tarfile

    if len(head) < 512:
        return False
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _cpu_test(map_location: Any) -> Optional[Callable[[str], bool]]:
    """A test "does torch put a storage tagged `location` on the CPU, unchanged?" for a
    map_location, or None when only torch can apply it (a callable)."""
    if map_location is None:
        return lambda loc: loc == "cpu"
    if isinstance(map_location, dict):
        return lambda loc: type(map_location.get(loc, loc)) is str and map_location.get(loc, loc) == "cpu"
    if isinstance(map_location, str):
        return lambda loc: map_location == "cpu"
    if isinstance(map_location, torch.device):
        return lambda loc: str(map_location) == "cpu"
    return None


def _torch_state_allows() -> Optional[str]:
    """Why torch's global state rules the C reader out, or None."""
    try:
        from torch._guards import detect_fake_mode

        if detect_fake_mode(None) is not None:
            return "a fake tensor mode is active"
    except Exception:  # noqa: BLE001 - no such API: nothing to detect
        pass
    tls = getattr(_ser, "_serialization_tls", None)
    if tls is not None and getattr(tls, "skip_data", False):
        return "torch.serialization.skip_data is active"
    return None


def _default_little() -> bool:
    end = _ser.get_default_load_endianness()
    return end is None or end == _ser.LoadEndianness.LITTLE


def _mmap_wanted(mmap: Optional[bool]) -> bool:
    if mmap is None:
        from torch.utils.serialization import config

        return bool(config.load.mmap)
    return bool(mmap)


def load_path(fd: int, bound: Any, torch_load: Callable[[], Any]) -> Any:
    """Loads the legacy checkpoint open at fd with the C reader, or with torch_load.

    Args:
        fd: an open descriptor of the file (a regular file; read with pread only).
        bound: torch.load's bound arguments (map_location, mmap, weights_only, ...).
        torch_load: calls torch's own loader on the same file with weights_only=True
            (or as the caller explicitly asked).

    Returns:
        What ``torch.load(f, weights_only=True)`` returns for the file.

    Raises:
        RuntimeError: a storage record is shorter than its pickle claims, compressed,
            ambiguous or cannot be checked, with mmap=True, for a file torch would load
            (it would map the wrong bytes); torch's own errors for files it refuses.
        OSError: the file cannot be read.
    """
    global last_fallback
    a = bound.arguments
    use_mmap = _mmap_wanted(a.get("mmap"))
    why = _why_torch(a, use_mmap)
    if why is None:
        head = os.pread(fd, 512, 0)
        if head[:4] != _ZIP_MAGIC and not (head.startswith(_LEGACY_MAGIC) and not _is_tar(head)):
            why = "neither a zip nor a pre-1.6 checkpoint"
    checked = False
    refusal: Optional[RuntimeError] = None
    if why is None:
        test = _cpu_test(a.get("map_location"))
        assert test is not None  # _why_torch ruled callables out
        out = _load_no_gc(fd, use_mmap, test)
        if out[0] == "ok":
            last_fallback = None
            return out[1]
        if out[0] == "refuse":
            why, checked, refusal = "refused: " + out[1], True, RuntimeError(out[1])
        else:
            why, checked = out[1], out[2]
    last_fallback = why
    if use_mmap and not checked and a.get("weights_only") is not False and not _meta(a.get("map_location")):
        refusal = _check_zip_records(fd, a.get("map_location"))
    result = torch_load()  # torch's own error, when it refuses the file, comes first
    if refusal is not None:
        del result
        raise refusal
    return result


def _meta(map_location: Any) -> bool:
    """Whether torch builds meta storages for map_location (then it maps no data)."""
    test = getattr(_ser, "_is_meta_location", None)
    try:
        return bool(test(map_location)) if test is not None else False
    except Exception:  # noqa: BLE001 - torch decides; check as usual
        return False


def _load_no_gc(fd: int, use_mmap: bool, cpu_ok: Callable[[str], bool], unaligned: bool = False) -> tuple:
    """_C.legacy_load with Python's cyclic GC paused: building thousands of tensors would
    otherwise run collections over every object in the process (after ``import torch``, a
    full one takes ~0.1 s), none of which can free what is being built."""
    was = gc.isenabled()
    gc.disable()
    try:
        return _C.legacy_load(fd, use_mmap, cpu_ok, _default_little(), unaligned)
    finally:
        if was:
            gc.enable()


def load_fileobj(f: Any, bound: Any, torch_load: Callable[[], Any]) -> Any:
    """Loads the legacy checkpoint in a seekable file object with the C reader, or with
    torch_load (the same rules as :func:`load_path`).

    The zip directory is read through ``seek``/``read`` (``readinto`` when there is one),
    each storage record straight into its tensor's memory: the stream is never copied
    whole. torch's loader reads the file instead when the object is not at its start,
    cannot seek, or ``mmap=True`` is asked (torch refuses that for file objects); the
    object is put back at its start first.

    Args:
        f: a file object with ``read``, ``seek`` and ``tell`` (io.BytesIO, an open file,
            a tar member, ...).
        bound: torch.load's bound arguments.
        torch_load: calls torch's own loader on f with weights_only=True (or as the
            caller explicitly asked).

    Returns:
        What ``torch.load(f, weights_only=True)`` returns for the file.

    Raises:
        Whatever torch raises for files it refuses, and what the file object raises.
    """
    global last_fallback
    a = bound.arguments
    use_mmap = _mmap_wanted(a.get("mmap"))
    why = _why_torch(a, use_mmap)
    start: Optional[int] = None
    if why is None and use_mmap:
        why = "mmap=True with a file object"
    if why is None:
        try:
            start = f.tell()
            end = f.seek(0, io.SEEK_END)
            size = f.tell() if end is None else end
            f.seek(start)
        except Exception:  # noqa: BLE001 - torch decides what such an object is
            why, start = "a file object that cannot seek", None
    if why is None and start != 0:
        why = "a file object not at its start"
    if why is None:
        head = f.read(512)
        f.seek(0)
        if not isinstance(head, bytes) or (head[:4] != _ZIP_MAGIC and not (head.startswith(_LEGACY_MAGIC)
                                                                       and not _is_tar(head))):
            why = "neither a zip nor a pre-1.6 checkpoint"
        elif head[:4] != _ZIP_MAGIC and not callable(getattr(f, "readline", None)):
            # torch reads a pre-1.6 file with pickle, which needs readline: torch refuses
            # such an object, so we do too, in its words
            why = "a pre-1.6 checkpoint in a file object without readline"
    if why is None:
        test = _cpu_test(a.get("map_location"))
        assert test is not None  # _why_torch ruled callables out
        was = gc.isenabled()
        gc.disable()
        try:
            out = _C.legacy_load_fileobj(f, size, test, _default_little())
        finally:
            if was:
                gc.enable()
        if out[0] == "ok":
            last_fallback = None
            return out[1]
        why = out[1]
    last_fallback = why
    if start is not None:
        f.seek(start)
    return torch_load()


def load_for_convert(fd: int) -> Optional[tuple]:
    """Reads the legacy checkpoint open at fd with the C reader for ``convert``: every
    storage a view of one private mapping, with no element alignment needed (the writer
    only copies the bytes out), storages placed on the CPU as map_location="cpu" does.

    Args:
        fd: an open descriptor of a regular file.

    Returns:
        ``(obj,)``, what ``torch.load(f, map_location="cpu", weights_only=True)`` gives,
        or None when torch's own loader must read the file (the reason is in
        :data:`last_fallback`).

    Raises:
        OSError: the file cannot be read.
    """
    global last_fallback
    why = _torch_state_allows()
    if why is None:
        out = _load_no_gc(fd, True, lambda loc: True, True)
        if out[0] == "ok":
            last_fallback = None
            return (out[1],)
        why = out[1]
    last_fallback = why
    return None


def _why_torch(a: Dict[str, Any], use_mmap: bool) -> Optional[str]:
    if a.get("weights_only") is False:
        return "weights_only=False was passed explicitly"
    if a.get("pickle_module") is not None:
        return "a pickle_module was given"
    if a.get("pickle_load_args"):
        return "extra pickle arguments were given"
    if _cpu_test(a.get("map_location")) is None:
        return "map_location is a callable"
    if use_mmap and _ser.get_default_mmap_options() == _mmap.MAP_SHARED:
        return "torch maps shared (set_default_mmap_options)"
    return _torch_state_allows()


# ---- the guard for files torch reads with mmap=True ----


class _Unchecked(Exception):
    """The records of a zip checkpoint cannot be checked the way torch would map them."""


def _refuse_unchecked(why: str) -> RuntimeError:
    return RuntimeError(
        f"invalid checkpoint: {why}; refusing to map it, since torch.load(mmap=True) could "
        "fill tensors from bytes outside their records. Load it with mmap=False."
    )


def _to_meta(map_location: Any, location: Any) -> bool:
    """Whether torch moves a storage tagged location to the meta device (its bytes unused)."""
    loc = location.decode("ascii", "replace") if isinstance(location, bytes) else str(location)
    if isinstance(map_location, dict):
        loc = map_location.get(loc, loc)
    elif isinstance(map_location, (str, torch.device)):
        loc = map_location
    elif map_location is not None:
        return False  # a callable: only torch knows
    return str(loc).startswith("meta")


def _claimed_storage_bytes(data_pkl: bytes, map_location: Any = None) -> Dict[str, int]:
    """Bytes each storage record must hold, by key, from a zip checkpoint's pickle.

    The pickle is run through torch's weights_only unpickler with storages on the meta
    device: no data is read and nothing outside its allowlist can run. As torch does, a
    key's first reference decides its dtype and size; later ones reuse it."""
    from torch import _weights_only_unpickler as wou

    claims: Dict[Any, int] = {}
    loaded: Dict[Any, Any] = {}

    def persistent_load(saved_id: Any) -> Any:
        typename, storage_type, key, _location, numel = saved_id
        if typename not in ("storage", b"storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {typename!r}")
        if key in loaded:  # torch maps every key once (an empty slice of the mapping too)
            return loaded[key]
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        nbytes = int(numel) * torch._utils._element_size(dtype)
        to_meta = _to_meta(map_location, _location)
        if nbytes and not to_meta:  # else no byte is used
            claims[key] = nbytes
        meta = torch.UntypedStorage(nbytes, device="meta")
        typed = torch.storage.TypedStorage(wrap_storage=meta, dtype=dtype, _internal=True)
        if not to_meta:  # torch keeps a storage whose data pointer is not null: a mapped one
            loaded[key] = typed
        return typed

    unpickler = wou.Unpickler(io.BytesIO(data_pkl), encoding="utf-8")
    unpickler.persistent_load = persistent_load  # type: ignore[attr-defined]
    result = unpickler.load()
    used = _storages_used(result)
    if used is None:
        return claims
    return {str(k): n for k, n in claims.items() if k in loaded and loaded[k]._untyped_storage._cdata in used}


def _storages_used(obj: Any) -> Optional[set]:
    """The storages (by _cdata) that tensors and storages reachable from obj use, or None
    when obj holds something this walk does not know (then every claim counts)."""
    used: set = set()
    seen: set = set()
    todo = [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen or o is None or type(o) in (bool, int, float, complex, str, bytes, torch.dtype,
                                                     torch.device, torch.Size):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if type(o) not in (torch.Tensor, torch.nn.Parameter) or o.is_sparse or o.is_nested:
                return None
            used.add(o.untyped_storage()._cdata)
        elif isinstance(o, torch.storage.TypedStorage):
            used.add(o._untyped_storage._cdata)
        elif isinstance(o, torch.UntypedStorage):
            used.add(o._cdata)
        elif type(o) in (list, tuple, set, frozenset):
            todo.extend(o)
        elif isinstance(o, dict) and type(o) in (dict, OrderedDict):
            todo.extend(o.keys())
            todo.extend(o.values())
            todo.extend(vars(o).values() if hasattr(o, "__dict__") else ())
        else:
            return None
    return used


def _read_record(fd: int, rec: tuple) -> bytes:
    import zlib

    _name, method, comp_size, size, at = rec
    if at < 0:
        raise _Unchecked("a record whose local header cannot be read")
    raw = os.pread(fd, comp_size, at)
    if method == 0:
        return raw
    d = zlib.decompressobj(-15)
    out = d.decompress(raw, size + 1)
    if len(out) != size:
        raise _Unchecked("a compressed record that does not inflate to its size")
    return out


def _check_zip_records(fd: int, map_location: Any = None) -> Optional[RuntimeError]:
    """The refusal of a zip checkpoint whose storage records are shorter than its pickle
    says, for files the C reader left to torch with mmap=True (None: nothing to refuse).

    torch.load(mmap=True) slices storages out of the mapped file by the sizes the pickle
    claims without checking the records (torch 2.13), so a short record would fill a
    tensor from the bytes after it. The directory is read by the C engine, as torch's zip
    reader reads it (not by Python's zipfile, which disagrees with it on some files); the
    pickle and the records are found as torch finds them: the archive is the folder of
    the first entry, names are looked up as C strings (cut at a NUL byte) without regard
    to ASCII case, in the order torch's zip library searches them (so of names equal but
    for case, the one torch reads is checked). A file this check cannot
    read is refused: it is never assumed to be checked. The caller raises the refusal only
    if torch's loader accepts the file: when torch refuses it, its own error stands."""
    if os.pread(fd, 4, 0) != _ZIP_MAGIC:
        return  # torch refuses mmap=True for anything but a zip
    try:
        found = _C.legacy_zip_records(fd)
        if found is None:
            raise _Unchecked("a zip directory the reader cannot check")
        records, order = found
        searched = [records[i] for i in order]
        if not records or b"/" not in records[0][0]:
            return  # torch refuses an archive without a top-level folder itself
        prefix = records[0][0].split(b"/", 1)[0] + b"/"
        if b"\0" in prefix:
            return  # torch looks up nothing in such a folder: it refuses the file
        def lookup(rest: bytes) -> list:
            # torch's binary search (miniz) over its case-blind order: the record it reads
            name = (prefix + rest).split(b"\0", 1)[0].lower()
            lo, hi = 0, len(searched) - 1
            while lo <= hi:
                mid = lo + ((hi - lo) >> 1)
                have = searched[mid][0].lower()
                if have == name:
                    return [searched[mid]]
                lo, hi = (mid + 1, hi) if have < name else (lo, mid - 1)
            return []

        claims: Dict[str, int] = {}
        for rec in lookup(b"data.pkl"):
            pkl = _read_record(fd, rec)
            try:
                found = _claimed_storage_bytes(pkl, map_location)
            except pickle.UnpicklingError:
                continue  # torch's weights_only unpickler refuses it too
            except Exception as e:  # noqa: BLE001 - unsure what torch would map
                raise _Unchecked(f"a data.pkl the check cannot read ({type(e).__name__})") from None
            for key, nbytes in found.items():
                claims[key] = max(claims.get(key, 0), nbytes)
        size = os.fstat(fd).st_size
        for key, nbytes in claims.items():
            name = f"data/{key}".encode("utf-8", "surrogatepass")
            for rec in lookup(name):  # none: torch fails to locate it, in every mode
                shown = rec[0].decode("utf-8", "replace")
                if rec[1] != 0:
                    return RuntimeError(
                        f"invalid checkpoint: record {shown!r} is compressed; refusing to map it "
                        "(torch.load(mmap=True) would map the compressed bytes as the tensor's "
                        "data). Load it with mmap=False."
                    )
                if rec[3] < nbytes:
                    return RuntimeError(
                        f"invalid checkpoint: record size {rec[3]} of {shown!r} does not "
                        f"match the {nbytes} bytes its pickle claims; refusing to map it (mmap=True "
                        "would read the bytes that follow the record)"
                    )
                if rec[4] < 0 or rec[4] > size - nbytes:
                    raise _Unchecked(f"record {shown!r} whose data lies outside the file")
    except _Unchecked as e:
        return _refuse_unchecked(str(e))
    return None


# ---- torch's own loader, always with weights_only unless the caller said otherwise ----

#: torch's torch.load as it was before torch_safetensors wrapped it (set by ``_torch.install``)
torch_load_fn: Optional[Callable[..., Any]] = None

_MARK = "__torch_safetensors_original__"

def _torch_loader() -> Callable[..., Any]:
    fn = torch_load_fn
    if fn is None:  # not installed: whatever torch.load is, unwrapped
        fn = getattr(_ser.load, _MARK, _ser.load)
    return fn


def torch_load(f: Any, bound: Any, head: Optional[bytes] = None) -> Any:
    """torch's own loader on f, with ``weights_only=True`` unless the caller passed False.

    Args:
        f: what torch.load receives (a path, or a file object at the caller's position).
        bound: torch.load's bound arguments.
        head: the file's first bytes, when known: torch's refusal of a file that is one
            of its formats says how to move on; other files keep torch's message as is.

    Raises:
        RuntimeError: a custom ``pickle_module`` without ``weights_only=False``.
        pickle.UnpicklingError: torch's weights_only loader refused the file (never
            retried unsafely).
    """
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
    load = _torch_loader()
    if explicit_unsafe:
        return load(f, *args, **kwargs)
    try:
        return load(f, *args, **kwargs)
    except pickle.UnpicklingError as e:
        if head is not None and _source.describe_head(head) is None:  # not torch's format: its words stand
            raise
        raise pickle.UnpicklingError(weights_only_hint(e)) from None


def weights_only_hint(err: BaseException) -> str:
    """torch's weights_only refusal, with what a user of torch_safetensors can do next."""
    return (
        f"{err}\n\n"
        "torch_safetensors loaded this legacy (pickle) checkpoint with weights_only=True, "
        "because pickle can run code from the file; it was not retried unsafely. To move on:\n"
        "  (1) convert it once, in an environment you trust, to safetensors: "
        "torch.save(torch.load(path, weights_only=False), new_path, format=\"safetensors\");\n"
        "  (2) or, if you trust the file, allowlist the classes it needs with "
        "torch.serialization.add_safe_globals([...]) (see the message above for their names);\n"
        "  (3) or pass weights_only=False explicitly, only for a file from a trusted source."
        + _FORCE_NO_WEIGHTS_ONLY_NOTE * force_no_weights_only_set()
    )


_FORCE_NO_WEIGHTS_ONLY_NOTE = (
    "\nTORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set in this environment: torch_safetensors "
    "deliberately does not honour it, because a variable set once for one trusted file would "
    "let every later file run code. Pass weights_only=False in the call instead."
)


def force_no_weights_only_set() -> bool:
    """Whether torch's TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set (we never honour it)."""
    return os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true")
