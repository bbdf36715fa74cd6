"""The type table of the checkpoint structure: which values are data, which need permission.

Data types (containers, numbers, strings, bytes, sets, paths, torch dtypes and devices,
numpy arrays and scalars...) are encoded and rebuilt here without any allowlist: rebuilding
them runs no code named by the file. Everything else is a *reference* to a class or a
function by its qualified name, and :class:`Allowlist` decides whether a reference read
from a file may be resolved: only if the loading process allowed it with
``torch.serialization.add_safe_globals`` / ``safe_globals`` (as torch's ``weights_only``
loader does), or if the caller passed ``weights_only=False`` explicitly.
A refused reference imports nothing.
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys
import types
from typing import Any, Dict, Optional, Tuple

import torch

__all__: list = []  # private module

# ---- torch value types ----

_DTYPES: Dict[str, torch.dtype] = {
    str(v)[len("torch."):]: v for v in vars(torch).values() if isinstance(v, torch.dtype)
}
_LAYOUTS: Dict[str, torch.layout] = {
    str(v)[len("torch."):]: v for v in vars(torch).values() if isinstance(v, torch.layout)
}
_MEMORY_FORMATS: Dict[str, torch.memory_format] = {
    str(v)[len("torch."):]: v for v in vars(torch).values() if isinstance(v, torch.memory_format)
}
_QSCHEMES: Dict[str, Any] = {
    str(v)[len("torch."):]: v for v in vars(torch).values() if isinstance(v, torch.qscheme)
}

PATH_TYPES: Dict[str, type] = {
    c.__name__: c
    for c in (pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath, pathlib.WindowsPath)
}

# defaultdict factories that are data, not code the file names
DEFAULT_FACTORIES: Dict[str, Any] = {
    "list": list, "dict": dict, "set": set, "frozenset": frozenset, "tuple": tuple,
    "int": int, "float": float, "complex": complex, "str": str, "bytes": bytes,
    "bytearray": bytearray, "bool": bool, "OrderedDict": collections.OrderedDict,
    "Counter": collections.Counter,
}
FACTORY_NAMES = {id(v): k for k, v in DEFAULT_FACTORIES.items()}

Namespace = argparse.Namespace


def dtype_name(d: torch.dtype) -> str:
    return str(d)[len("torch."):]


def lookup(table: Dict[str, Any], name: Any, what: str, bad: Any) -> Any:
    if type(name) is not str or name not in table:
        raise bad(f"unknown {what} {str(name)[:80]!r}")
    return table[name]


def make_path(kind: Any, text: Any, bad: Any) -> Any:
    cls = lookup(PATH_TYPES, kind, "path type", bad)
    if type(text) is not str:
        raise bad("a path is not a string")
    if cls is pathlib.WindowsPath and sys.platform != "win32":
        cls = pathlib.PureWindowsPath  # a concrete Windows path cannot exist here
    elif cls is pathlib.PosixPath and sys.platform == "win32":
        cls = pathlib.PurePosixPath
    return cls(text)


# ---- numpy (imported only when a checkpoint holds numpy values) ----

# byte order, kind (bool, signed, unsigned, float, complex), item size
_NP_DTYPE = re.compile(r"[<>|=][biufc][0-9]{1,2}\Z")
_NP_SIZES = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}
_NP_REFUSED_KINDS = {
    "O": "object", "U": "string", "S": "bytes string", "V": "structured or void",
    "M": "datetime", "m": "timedelta",
}


def is_numpy(v: Any) -> bool:
    return (type(v).__module__ or "").startswith("numpy")


def numpy_dtype_text(dt: Any, shown: str, what: str = "numpy.ndarray") -> str:
    """The dtype as numpy's ``dtype.str`` (``'<f4'``), refusing what torch cannot hold."""
    if dt.fields is not None or dt.kind in _NP_REFUSED_KINDS:
        kind = _NP_REFUSED_KINDS.get(dt.kind, "structured")
        raise TypeError(
            f"{shown}: {what} of {kind} dtype {dt} cannot be saved in safetensors format, which "
            "holds numeric and bool numpy values; convert it to a numeric array or a Python list"
        )
    text = dt.str
    if not _NP_DTYPE.match(text) or text[1:] not in _NP_SIZES:
        raise TypeError(f"{shown}: {what} of dtype {dt} cannot be saved in safetensors format, "
                        "which holds numeric and bool numpy values with a torch dtype")
    return text


def numpy_dtype(text: Any, bad: Any) -> Any:
    """A numeric numpy dtype from its ``dtype.str``; anything else is refused."""
    if type(text) is not str or not _NP_DTYPE.match(text) or text[1:] not in _NP_SIZES:
        raise bad(f"unknown numpy dtype {str(text)[:40]!r}")
    import numpy as np

    try:
        dt = np.dtype(text)
    except TypeError:
        raise bad(f"unknown numpy dtype {text!r}") from None
    if dt.kind not in "biufc":
        raise bad(f"numpy dtype {text!r} is not numeric")
    return dt


def array_to_tensor(arr: Any, shown: str) -> Tuple[str, torch.Tensor]:
    """(dtype text, a tensor holding the array's values in native byte order)."""
    import numpy as np

    text = numpy_dtype_text(arr.dtype, shown)
    native = arr.dtype.newbyteorder("=")
    try:
        # a copy: torch.from_numpy wants writable memory, and the caller's array may change
        return text, torch.from_numpy(arr.astype(native, order="C", copy=True))
    except TypeError:
        raise TypeError(f"{shown}: numpy dtype {arr.dtype} has no torch equivalent; convert it first") from None


def tensor_to_array(text: Any, t: torch.Tensor, bad: Any, charge: Any = None) -> Any:
    """The numpy array a stored tensor holds; charge(nbytes) before a byte-swapping copy."""
    dt = numpy_dtype(text, bad)
    if t.layout is not torch.strided or t.device.type != "cpu" or t.requires_grad:
        raise bad("a numpy array's data is not a plain CPU tensor")
    try:
        arr = t.numpy()
    except (TypeError, RuntimeError) as e:
        raise bad(f"a numpy array's data cannot become numpy ({e})") from None
    if arr.dtype != dt.newbyteorder("="):
        raise bad(f"a numpy array of dtype {text!r} holds {t.dtype} data")
    if arr.dtype == dt:
        return arr
    if charge is not None:
        charge(arr.nbytes)
    return arr.astype(dt)


def numpy_scalar(text: Any, value: Any, bad: Any) -> Any:
    dt = numpy_dtype(text, bad)
    kinds = {"b": (bool,), "i": (int,), "u": (int,), "f": (float, int), "c": (complex, float, int)}
    if type(value) not in kinds[dt.kind]:
        raise bad(f"a numpy {text} scalar holds a {type(value).__name__}")
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return dt.type(value)
    except (OverflowError, ValueError, RuntimeWarning, DeprecationWarning) as e:
        raise bad(f"numpy {text} scalar {str(value)[:40]}: {e}") from None


# ---- references to classes and functions ----


def reference(obj: Any, shown: str) -> str:
    """``module:qualname`` of a class or function, checked to name this very object.

    Raises:
        TypeError: obj has no importable name (a lambda, a local class, a module...).
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(obj, types.ModuleType):
        raise TypeError(f"{shown}: module {obj.__name__} cannot be saved in safetensors format; "
                        "store its name as a str")
    if type(module) is not str or type(qualname) is not str or "<" in qualname:
        kind = "class" if isinstance(obj, type) else type(obj).__name__
        raise TypeError(
            f"{shown}: {kind} {qualname or obj!r} cannot be saved in safetensors format: it has "
            "no importable name (lambdas and local classes or functions are code, not data); "
            "save what it computes, or define it at the top level of a module"
        )
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not obj:
        raise TypeError(
            f"{shown}: {module}.{qualname} cannot be saved in safetensors format: that name "
            "does not lead back to this object"
        )
    return f"{module}:{qualname}"


_REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


class Allowlist:
    """Resolves class and function references read from a file.

    A reference is resolved only when the loading process allowed it (torch's
    ``add_safe_globals`` / ``safe_globals``; allowed objects already carry their module,
    so nothing is imported), or when ``trusted`` (an explicit ``weights_only=False``).
    """

    def __init__(self, *, trusted: bool, bad: Any) -> None:
        self.trusted = trusted
        self.bad = bad
        self._allowed: Optional[Dict[str, Any]] = None

    def allowed(self) -> Dict[str, Any]:
        if self._allowed is None:
            table: Dict[str, Any] = {}
            for entry in torch.serialization.get_safe_globals():
                if isinstance(entry, tuple) and len(entry) == 2 and type(entry[1]) is str:
                    table[entry[1]] = entry[0]
                else:
                    module = getattr(entry, "__module__", None)
                    qualname = getattr(entry, "__qualname__", None)
                    if type(module) is str and type(qualname) is str:
                        table[f"{module}.{qualname}"] = entry
            self._allowed = table
        return self._allowed

    def owns(self, obj: Any) -> bool:
        """Whether obj's class is allowed (or the file is trusted): state may go into it."""
        return self.trusted or any(type(obj) is v for v in self.allowed().values())

    def resolve(self, ref: Any, role: str) -> Any:
        """The object a ``module:qualname`` reference names, if this process allows it.

        Raises:
            SafetensorError: malformed, or not allowed (nothing imported).
        """
        if type(ref) is not str or ref.count(":") != 1:
            raise self.bad(f"a {role} reference is not 'module:qualname'")
        module, qualname = ref.split(":")
        if not _REF.match(module) or not _REF.match(qualname):
            raise self.bad(f"malformed {role} reference {ref[:120]!r}")
        full = f"{module}.{qualname}"
        table = self.allowed()
        if full in table:
            return table[full]
        if not self.trusted:
            raise self.bad(
                f"the checkpoint holds {role} {full}, which this process has not allowed; "
                "nothing of it was imported or run. If you trust it: "
                f"torch.serialization.add_safe_globals([{full}]) (or the "
                f"torch.serialization.safe_globals([{full}]) context manager), as for "
                "torch.load(weights_only=True); or torch.load(..., weights_only=False), "
                "only for a file from a trusted source",
                code="not_allowed",
            )
        import importlib

        try:
            found: Any = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
        except Exception as e:  # noqa: BLE001 - any failure of the named module
            raise self.bad(f"cannot find {role} {full}: {type(e).__name__}: {e}") from None
        return found
