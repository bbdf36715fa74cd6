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

import io
import mmap as _mmap
import os
import pickle
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional

import torch
import torch.serialization as _ser

from . import _C

__all__ = ["load_path", "last_fallback"]

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
        RuntimeError: a storage record is shorter than its pickle claims, compressed, or
            ambiguous, with mmap=True (torch would map the wrong bytes); and torch's own
            errors for files it refuses.
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
    if why is None:
        test = _cpu_test(a.get("map_location"))
        assert test is not None  # _why_torch ruled callables out
        out = _C.legacy_load(fd, use_mmap, test, _default_little())
        if out[0] == "ok":
            last_fallback = None
            return out[1]
        why, checked = out[1], out[2]
    last_fallback = why
    if use_mmap and not checked and a.get("weights_only") is not False:
        _check_zip_records(fd)
    return torch_load()


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


def _claimed_storage_bytes(data_pkl: bytes) -> Dict[str, int]:
    """Bytes each storage record must hold, by key, from a zip checkpoint's pickle.

    The pickle is run through torch's weights_only unpickler with storages on the meta
    device: no data is read and nothing outside its allowlist can run."""
    from torch import _weights_only_unpickler as wou

    claims: Dict[str, int] = {}

    def persistent_load(saved_id: Any) -> Any:
        typename, storage_type, key, _location, numel = saved_id
        if typename not in ("storage", b"storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {typename!r}")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        nbytes = int(numel) * torch._utils._element_size(dtype)
        claims[str(key)] = max(claims.get(str(key), 0), nbytes)
        meta = torch.UntypedStorage(nbytes, device="meta")
        return torch.storage.TypedStorage(wrap_storage=meta, dtype=dtype, _internal=True)

    unpickler = wou.Unpickler(io.BytesIO(data_pkl), encoding="utf-8")
    unpickler.persistent_load = persistent_load  # type: ignore[attr-defined]
    unpickler.load()
    return claims


def _check_zip_records(fd: int) -> None:
    """Refuses a zip checkpoint whose storage records are shorter than its pickle says,
    for files the C reader left to torch with mmap=True.

    torch.load(mmap=True) slices storages out of the mapped file by the sizes the pickle
    claims without checking the records (torch 2.13), so a short record would fill a
    tensor from the bytes after it. The pickle is found as torch finds it: the archive
    is the folder of the central directory's first entry, and names are matched without
    regard to case (miniz's lookup); with several such members (zip readers disagree on
    which one wins) each is checked, so extra members never switch the check off.
    Anything this check cannot read is left to torch."""
    import zipfile

    try:
        with os.fdopen(os.dup(fd), "rb") as fobj, zipfile.ZipFile(fobj) as z:
            infos = z.infolist()
            if not infos or "/" not in infos[0].filename:
                return  # torch refuses an archive without a top-level folder itself
            prefix = infos[0].filename.split("/", 1)[0] + "/"
            by_name: Dict[str, list] = {}
            for i in infos:
                by_name.setdefault(i.filename.lower(), []).append(i)
            claims: Dict[str, int] = {}
            for info in by_name.get((prefix + "data.pkl").lower(), []):
                try:
                    found = _claimed_storage_bytes(z.read(info))
                except Exception:  # noqa: BLE001 - torch's unpickler refuses it too
                    continue
                for key, nbytes in found.items():
                    claims[key] = max(claims.get(key, 0), nbytes)
    except Exception:  # noqa: BLE001 - not a zip this check understands: torch decides
        return
    for key, nbytes in claims.items():
        record = f"{prefix}data/{key}"
        found_records = by_name.get(record.lower(), [])
        if not found_records:
            raise RuntimeError(
                f"invalid checkpoint: record size None of {record!r} does not match the "
                f"{nbytes} bytes its pickle claims; refusing to map it (mmap=True would "
                "read the bytes that follow the record)"
            )
        for info in found_records:
            if info.compress_type != zipfile.ZIP_STORED:
                raise RuntimeError(
                    f"invalid checkpoint: record {record!r} is compressed; torch.load(mmap=True) "
                    "would map the compressed bytes as the tensor's data. Load it with mmap=False."
                )
            if info.file_size < nbytes:
                raise RuntimeError(
                    f"invalid checkpoint: record size {info.file_size} of {record!r} does not "
                    f"match the {nbytes} bytes its pickle claims; refusing to map it (mmap=True "
                    "would read the bytes that follow the record)"
                )


# ---- torch's own loader, always with weights_only unless the caller said otherwise ----

#: torch's torch.load as it was before torch_safetensors wrapped it (set by ``_torch.install``)
torch_load_fn: Optional[Callable[..., Any]] = None

_MARK = "__torch_safetensors_original__"

# how a file that torch's loader refused begins, when it is one of torch's formats
_PICKLE_PROTOCOLS = range(2, 6)


def _torch_loader() -> Callable[..., Any]:
    fn = torch_load_fn
    if fn is None:  # not installed: whatever torch.load is, unwrapped
        fn = getattr(_ser.load, _MARK, _ser.load)
    return fn


def is_torch_format(head: bytes) -> bool:
    """Whether the first bytes are one of torch's own formats (zip, pre-1.6, tar) or a
    pickle: a file for which torch's ``weights_only`` advice applies."""
    return (head[:4] == _ZIP_MAGIC or head.startswith(_LEGACY_MAGIC) or head[257:262] == b"ustar"
            or head.startswith(b"L%d" % _ser.MAGIC_NUMBER)
            or (len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS))


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
        if head is not None and not is_torch_format(head):
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
