"""torch.save / torch.load speak safetensors.

On import, ``torch.save``, ``torch.load``, ``torch.serialization.save`` and
``torch.serialization.load`` are replaced by wrappers that keep torch's signatures and
add keyword-only ``format`` (and ``metadata`` on save). ``torch.load`` recognises
safetensors by its bytes; everything else goes to torch's own loader with
``weights_only=True`` unless the caller explicitly passes ``weights_only=False``.
"""
from __future__ import annotations

import functools
import inspect
import os
import pickle
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.serialization as _ser

from . import _default, _legacy, _load, _save, _sharded, _source
from ._save import is_path as _is_path

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


def _has_safetensors_suffix(f: Any) -> bool:
    if not _is_path(f):
        return False
    path = os.fspath(f)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return path.lower().endswith(".safetensors")


# ---- loading: decide once what f is, then one loader per kind ----


def _load_sharded(src: _source.Source, a: _load.Args) -> Any:
    """A directory or a Hugging Face index (safetensors or legacy ``.bin`` shards)."""
    return _sharded.load_sharded(src.name, map_location=a.map_location, mmap=a.mmap,
                                 weights_only=a.weights_only is not False)


#: kind of source (``_source.resolve``) -> its loader
LOADERS: Dict[str, Callable[[_source.Source, _load.Args], Any]] = {
    **_load.LOADERS,
    _source.INDEX: _load_sharded,
    _source.DIRECTORY: _load_sharded,
}
assert set(LOADERS) == set(_source.KINDS)


def load(f: Any, *args: Any, format: Optional[str] = None, **kwargs: Any) -> Any:
    _check_format(format)
    a = _load.Args(_LOAD_SIG, f, args, kwargs, format)
    if format == "pickle":
        return _load_pickle(f, a)
    with _source.resolve(f) as src:
        return LOADERS[src.kind](src, a)


def _load_pickle(f: Any, a: _load.Args) -> Any:
    """format='pickle': torch's loader, asked for by name; a safetensors file is named
    as such when torch refuses it (retrying it with weights_only=False cannot help)."""
    start = _load.start_of(f)
    try:
        return _legacy.torch_load(f, a.bound)
    except pickle.UnpicklingError as e:
        name = _load.safetensors_named(f, start)
        if name is None:
            raise
        raise pickle.UnpicklingError(
            f"{name} is a safetensors file, not a pickle checkpoint: torch.load reads it "
            "without format='pickle' (or with format='safetensors')"
        ) from e


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
        _save.save_safetensors(obj, f, metadata, durable=durable, checksums=checksums)
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
        _save.save_safetensors(obj, f, metadata, durable=durable, checksums=checksums)
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
        _legacy.torch_load_fn = _orig_load
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
