"""Which objects a safetensors checkpoint holds, and under which names.

A checkpoint is any bounded nesting of containers and values: tensors of every kind that
torch's ``weights_only`` loader reads, plain values, the data types of the type table
(:mod:`._types`: sets, bytes, complex, paths, numpy arrays, torch dtypes...) and, stored
generically, instances of other classes. Tensors are stored as plain named tensors under
dotted paths (``model.layers.0.weight``); tensor kinds safetensors has no dtype or layout
for are stored as their dense components plus a tag. Everything else (containers, key
types and order, plain values, which tensors are Parameters or require grad, which names
are ties of one tensor, typed values, objects) goes as JSON under one namespaced
``__metadata__`` key. A flat ``str -> Tensor`` dict of plain, untied tensors needs no
structure, so its file is byte-identical to the ``safetensors`` package's.

Reading trusts nothing: data types are rebuilt directly; an object or a reference to a
class or function is rebuilt only if the loading process allowed that class or function
(``torch.serialization.add_safe_globals`` / ``safe_globals``, as for
``torch.load(weights_only=True)``) or the caller passed ``weights_only=False``. The decoder
works within a memory budget proportional to the structure text.
"""
from __future__ import annotations

import base64
import collections
import copyreg
import ctypes
import enum
import json
import math
import operator
import re
import struct
import sys
import types
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _C, _types
from ._core import DTYPES, SafetensorError, error

STRUCTURE_KEY = "torch_safetensors.structure"
STRUCTURE_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_DEPTH = 200  # nesting of containers, on save and on load

# The decoder's memory budget: what rebuilding a structure may cost, estimated before
# parsing from the text's tokens and counted while building.
BUDGET_FACTOR = 4
BUDGET_FLOOR = 256 << 20

_Parameter = torch.nn.Parameter
_PLAIN = (type(None), bool, int, float, str)
_STORABLE_DTYPES = {d for d in DTYPES.values() if d is not None}
_BYTES_AS_TENSOR = 4096  # longer bytes go as a uint8 tensor instead of base64 text


# ---- refusal ----


def _hint(value: Any, *, code: bool = True) -> str:
    """Advice for a value that cannot be stored; ``code=False`` leaves out the generic
    one for callables (the caller already said what to do with it)."""
    if isinstance(value, torch.Tensor):
        return ""
    if isinstance(value, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
        return " (a running generator is code; save the values it would produce)"
    if hasattr(value, "read") or hasattr(value, "write") or hasattr(value, "fileno"):
        return " (an open file or stream is not data; save its path, or its contents as bytes)"
    if "lock" in type(value).__name__.lower():
        return " (a lock is process state, not data; leave it out of the checkpoint)"
    if callable(value) and code:
        return " (code is never stored; save what it computes instead)"
    return ""


def _type_name(value: Any) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _refuse(path: str, value: Any, why: str = "") -> TypeError:
    where = path if path else "the object"
    # with a reason, no generic callable hint after it (a module is callable: one hint)
    hint = _hint(value, code=not why)
    why = f" ({why})" if why else ""
    return TypeError(f"{where}: {_type_name(value)} cannot be saved in safetensors format{why}{hint}")


def _tensor_problem(path: str, t: torch.Tensor) -> Optional[TypeError]:
    """A clear error for tensors that have no plain dense bytes to store (flat files such as
    shards, which hold plain tensors only)."""
    kind = type(t)
    if kind is not torch.Tensor and kind is not _Parameter:
        problem = _unstorable(path, t)
        if problem is not None:
            return problem
        name = f"{kind.__module__}.{kind.__qualname__}"
        if _is_traceable(kind):
            return _flat_refusal(path, name)
        return TypeError(f"{path}: tensor subclass {name} cannot be saved in a flat safetensors file; "
                         "convert it with .as_subclass(torch.Tensor) if its data is all that matters")
    if t.is_nested:
        return TypeError(
            f"{path}: nested tensors cannot be saved in a flat safetensors file; save its parts "
            "(.unbind()) or a padded tensor (.to_padded_tensor(0))"
        )
    if t.is_quantized:
        return TypeError(
            f"{path}: quantized tensor ({t.dtype}) cannot be saved in a flat safetensors file; "
            "save .dequantize() or its int_repr() with its scale and zero point"
        )
    if t.layout is not torch.strided:
        return TypeError(
            f"{path}: {t.layout} tensor cannot be saved in a flat safetensors file, which stores "
            "dense tensors; convert it with .to_dense()"
        )
    if t.device.type == "meta":
        return TypeError(
            f"{path}: tensor on the meta device has no data to save; materialize it first "
            "(for example with module.to_empty(device='cpu') and an initializer)"
        )
    return None


def _unstorable(path: str, t: torch.Tensor) -> Optional[TypeError]:
    """A clear error for tensors that cannot be stored even as components."""
    kind = type(t)
    if kind is torch.Tensor or kind is _Parameter:
        problem = _no_data(path, t)
        if problem is not None:
            return problem
    if kind is not torch.Tensor and kind is not _Parameter:
        name = f"{kind.__module__}.{kind.__qualname__}"
        if "DTensor" in kind.__name__:
            what = "gather it with .full_tensor(), or save it with torch_safetensors.distributed"
        elif "Fake" in kind.__name__ or "Functional" in kind.__name__:
            what = "save real tensors, outside tracing"
        else:
            return None  # stored as its class reference plus its data
        return TypeError(f"{path}: tensor subclass {name} cannot be saved in safetensors format; {what}")
    if t.layout not in _COMPRESSED and t.layout not in (torch.strided, torch.sparse_coo) and not t.is_nested:
        return TypeError(
            f"{path}: {t.layout} tensor cannot be saved in safetensors format; convert it with .to_dense()"
        )
    return None


# ---- flatten ----


def _key_text(key: Any, path: str) -> str:
    if type(key) is str:
        return key
    if type(key) is int:
        return str(key)
    raise TypeError(
        f"{path or 'the object'}: dict key {key!r} of type {type(key).__name__} cannot be "
        "saved in safetensors format; keys must be str or int"
    )


def _join(path: str, part: str) -> str:
    return f"{path}.{part}" if path else part


def view_key(t: torch.Tensor) -> Optional[tuple]:
    """Identity of a view of memory: tensors with equal keys are ties, stored once.
    None for empty tensors, which never tie."""
    if t.numel() == 0:
        return None
    # t and t.conj() (or a negative view) share memory but are different values
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()),
            t.is_conj(), t.is_neg())


_COMPRESSED = {
    torch.sparse_csr: ("crow_indices", "col_indices"),
    torch.sparse_csc: ("ccol_indices", "row_indices"),
    torch.sparse_bsr: ("crow_indices", "col_indices"),
    torch.sparse_bsc: ("ccol_indices", "row_indices"),
}


_FLOAT_FORMATS = {2: ">e", 4: ">f", 8: ">d"}


def _float_node(v: float, bits: Optional[bytes] = None) -> Any:
    """A float as JSON: finite ones as numbers, the others tagged. A NaN other than the
    standard one keeps its sign and payload as ``nan:<hex>``, its big-endian bits at its
    own width (``bits``, for a numpy float16/32 value; a Python float's otherwise)."""
    if math.isfinite(v):
        return v
    if v == v:
        return {"f": "inf" if v > 0 else "-inf"}
    raw = struct.pack(">d", v) if bits is None else bits
    if raw == struct.pack(_FLOAT_FORMATS[len(raw)], math.nan):
        return {"f": "nan"}
    return {"f": "nan:" + raw.hex()}


def _nan_bits(body: Any, size: int) -> Optional[bytes]:
    """The bits of a ``nan:<hex>`` float body of ``size`` bytes; None for any other body.

    Raises:
        SafetensorError: the hex is malformed, of another width, or not a NaN's.
    """
    if type(body) is not str or not body.startswith("nan:"):
        return None
    digits = body[4:]
    if len(digits) != 2 * size or not re.fullmatch(r"[0-9a-f]+", digits):
        raise _bad(f"a {8 * size}-bit NaN needs {2 * size} lowercase hex digits, not {digits[:40]!r}")
    raw = bytes.fromhex(digits)
    if not math.isnan(struct.unpack(_FLOAT_FORMATS[size], raw)[0]):
        raise _bad(f"float bits {digits!r} are not a NaN's (other values are JSON numbers)")
    return raw


class _Flattener:
    def __init__(self) -> None:
        self.tensors: Dict[str, torch.Tensor] = {}
        self.by_object: Dict[int, Tuple[str, int]] = {}  # id -> (stored name, object number)
        self.by_view: Dict[tuple, str] = {}
        self.objects_per_name: Dict[str, int] = {}
        self.keep_alive: List[Any] = []
        self.active: set = set()  # ids of containers being walked: cycles are refused
        self.needs_structure = False
        self.kind_nodes: Dict[int, Dict[str, Any]] = {}  # id of a tensor stored as a kind -> its node
        self.tsubs: Dict[int, str] = {}  # traceable subclass objects: id -> their node's name

    # -- tensors --

    def store(self, path: str, shown: str, t: torch.Tensor) -> str:
        """Stores a dense tensor under path (or a free name near it); returns the name."""
        if path in self.tensors:
            raise ValueError(
                f"{shown}: another tensor is already stored as {path!r} "
                "(keys joined with '.' collide); rename one of the keys"
            )
        self.keep_alive.append(t)
        self.tensors[path] = t
        return path

    def tensor(self, path: str, shown: str, t: torch.Tensor) -> Any:
        problem = _unstorable(shown, t)
        if problem is not None:
            raise problem
        if not path:
            path = "tensor"
            self.needs_structure = True  # a bare tensor must come back as a tensor
        if type(t) is not torch.Tensor and type(t) is not _Parameter and type(t) is not _JAGGED:
            return _subclass_node(self, path, shown, t)
        flags: Dict[str, Any] = {}
        if type(t) is _Parameter:
            flags["p"] = 1
        if t.requires_grad:
            flags["g"] = 1
        if flags:
            self.needs_structure = True
        plain = (
            t.layout is torch.strided and not t.is_nested and not t.is_quantized
            and t.device.type != "meta" and t.dtype in _STORABLE_DTYPES
        )
        if not plain:
            self.needs_structure = True
            seen_node = self.kind_nodes.get(id(t))
            if seen_node is not None and seen_node.get("tk") != "meta":
                return seen_node  # the same object again: an identical node, rebuilt as one object
            node = self.kind(path, shown, t.detach())
            node.update(flags)
            self.kind_nodes[id(t)] = node
            self.keep_alive.append(t)
            return node
        node: Dict[str, Any] = {"t": path}
        node.update(flags)
        # ties: the same object, or the same view of the same memory, is stored once
        seen = self.by_object.get(id(t))
        if seen is not None:
            name, number = seen
        else:
            view = view_key(t)
            name = self.by_view.setdefault(view, path) if view is not None else path
            if name == path:
                self.store(path, shown, t)
                number = 0
            else:
                number = self.objects_per_name.get(name, 0) + 1
                self.objects_per_name[name] = number
            self.by_object[id(t)] = (name, number)
            self.keep_alive.append(t)  # ids stay unique while flattening
        if name != path or seen is not None:
            node["t"] = name
            if number == 0:
                node["same"] = 1  # the very object stored under that name
            else:
                node["o"] = number  # another object over the same memory
            self.needs_structure = True
        return node

    def kind(self, path: str, shown: str, t: torch.Tensor) -> Dict[str, Any]:
        """A tensor kind safetensors cannot hold, as dense components plus a tag."""
        if t.device.type == "meta":
            return {"tk": "meta", "dtype": _types.dtype_name(t.dtype), "shape": list(t.shape),
                    "stride": list(t.stride()) if t.layout is torch.strided else None}
        if t.is_nested:
            layout = "jagged" if t.layout is torch.jagged else "strided"
            parts = [self.tensor(_join(path, str(i)), f"{shown}[{i}]", p) for i, p in enumerate(t.unbind())]
            return {"tk": "nested", "layout": layout, "parts": parts}
        if t.is_quantized:
            scheme = t.qscheme()
            node: Dict[str, Any] = {"tk": "quant", "dtype": _types.dtype_name(t.dtype),
                                    "scheme": str(scheme)[len("torch."):],
                                    "int": self.tensor(_join(path, "int_repr"), shown, t.int_repr())}
            if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                node["scale"] = _float_node(float(t.q_scale()))
                node["zero_point"] = int(t.q_zero_point())
            else:
                node["scales"] = self.tensor(_join(path, "scales"), shown, t.q_per_channel_scales())
                node["zero_points"] = self.tensor(_join(path, "zero_points"), shown, t.q_per_channel_zero_points())
                node["axis"] = int(t.q_per_channel_axis())
            return node
        if t.layout is torch.sparse_coo:
            return {"tk": "sparse_coo", "size": list(t.shape), "coalesced": bool(t.is_coalesced()),
                    "indices": self.tensor(_join(path, "indices"), shown, t._indices()),
                    "values": self.tensor(_join(path, "values"), shown, t._values())}
        if t.layout in _COMPRESSED:
            first, second = _COMPRESSED[t.layout]
            return {"tk": "sparse_compressed", "layout": str(t.layout)[len("torch."):], "size": list(t.shape),
                    "compressed": self.tensor(_join(path, first), shown, getattr(t, first)()),
                    "plain": self.tensor(_join(path, second), shown, getattr(t, second)()),
                    "values": self.tensor(_join(path, "values"), shown, t.values())}
        if t.is_complex():
            # no complex128 (or complex32) in safetensors: the (real, imag) pairs instead
            return {"tk": "complex", "data": self.tensor(path, shown, torch.view_as_real(t.resolve_conj().resolve_neg()))}
        raise TypeError(f"{shown}: tensor of dtype {t.dtype} cannot be saved in safetensors format")

    def subclass(self, path: str, shown: str, t: torch.Tensor, flags: Dict[str, Any]) -> Dict[str, Any]:
        self.needs_structure = True
        ref = _types.reference(type(t), shown)
        data = t.detach().as_subclass(torch.Tensor)
        node: Dict[str, Any] = {"tk": "sub", "cls": ref, "data": self.tensor(path, shown, data)}
        state = getattr(t, "__dict__", None)
        if state:
            node["state"] = self.value(_join(path, "state"), f"{shown}.__dict__", dict(state), 1)
        node.update(flags)
        return node

    # -- values --

    def value(self, path: str, shown: str, v: Any, depth: int) -> Any:
        """path: the dotted name tensors are stored under; shown: the path in messages."""
        if depth > MAX_DEPTH:
            raise ValueError(f"{shown}: nested deeper than {MAX_DEPTH} levels")
        kind = type(v)
        if isinstance(v, torch.Tensor):
            try:
                return self.tensor(path, shown, v)
            except (TypeError, ValueError, MemoryError):
                raise
            except Exception as e:  # noqa: BLE001 - a refusal is a TypeError, whatever raised it
                raise _refuse(shown, v, f"{type(e).__name__}: {_one_line(e)}") from None
        if kind in _PLAIN:
            self.needs_structure = True
            return _float_node(v) if kind is float else v
        if kind is dict or kind is OrderedDict:
            # a top-level dict of tensors needs no structure; anything deeper does
            self.needs_structure = self.needs_structure or depth > 0
        else:
            self.needs_structure = True
        if id(v) in self.active:
            raise ValueError(f"{shown}: the object contains itself; cycles cannot be saved")
        self.active.add(id(v))
        try:
            return self.typed(path, shown, v, kind, depth)
        except (TypeError, ValueError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - a refusal is a TypeError (the pickle fallback's cue)
            raise _refuse(shown, v, f"{type(e).__name__}: {_one_line(e)}") from None
        finally:
            self.active.discard(id(v))

    def items(self, path: str, shown: str, v: dict, depth: int) -> Any:
        """A dict's items: a JSON object when every key is a str, else [key, value] pairs."""
        if all(type(k) is str for k in v):
            return {k: self.value(_join(path, k), _join(shown, k), item, depth + 1) for k, item in v.items()}
        self.needs_structure = True
        pairs = []
        for i, (k, item) in enumerate(v.items()):
            if type(k) in (str, int):
                part, key = str(k), k
                sub_shown = _join(shown, k) if type(k) is str else f"{shown}[{k}]"
            else:
                part = f"key{i}"
                sub_shown = f"{shown}[{k!r}]"
                key = self.value(_join(path, f"key{i}.key"), f"{shown} key {k!r}", k, depth + 1)
            pairs.append([key, self.value(_join(path, part), sub_shown, item, depth + 1)])
        return pairs

    def seq(self, path: str, shown: str, v: Any, depth: int) -> List[Any]:
        return [self.value(_join(path, str(i)), f"{shown}[{i}]", item, depth + 1) for i, item in enumerate(v)]

    def typed(self, path: str, shown: str, v: Any, kind: type, depth: int) -> Any:
        if kind is dict or kind is OrderedDict:
            attrs = getattr(v, "__dict__", None) if kind is OrderedDict else None
            if attrs:
                # a state dict's _metadata (module versions): pickle keeps it, and a module's
                # loader reads a missing version as its oldest layout. A flat dict of plain
                # tensors stays byte-identical to safetensors': the modules whose loading
                # needs the version all hold values that need a structure anyway
                # (tests/test_structure_placement.py finds them)
                shadow = [k for k in attrs if type(k) is not str or hasattr(OrderedDict, k)]
                if shadow:
                    raise _refuse(shown, v, f"its attribute {shadow[0]!r} would hide an OrderedDict method")
                body = self.items(path, shown, v, depth)
                plain, stored = not self.needs_structure, len(self.tensors)
                extra = self.items(_join(path, "__dict__"), f"{shown}.__dict__", dict(attrs), depth)
                if depth == 0 and plain and len(self.tensors) == stored:
                    self.needs_structure = False
                return {"oda": [body, extra]}
            return {"d" if kind is dict else "od": self.items(path, shown, v, depth)}
        if kind is list or kind is tuple:
            return {"l" if kind is list else "tu": self.seq(path, shown, v, depth)}
        if kind is set or kind is frozenset:
            return {"set" if kind is set else "fset": self.seq(path, shown, v, depth)}
        if kind is bytes or kind is bytearray:
            tag = "b" if kind is bytes else "ba"
            if len(v) >= _BYTES_AS_TENSOR:
                data = torch.frombuffer(bytearray(v), dtype=torch.uint8)
                return {tag: self.tensor(path or "bytes", shown, data)}
            return {tag: base64.b64encode(v).decode("ascii")}
        if kind is complex:
            return {"c": [_float_node(v.real), _float_node(v.imag)]}
        if kind is range:
            return {"range": [v.start, v.stop, v.step]}
        if kind is slice:
            return {"slice": self.seq(path, shown, (v.start, v.stop, v.step), depth)}
        if kind is torch.dtype:
            return {"dtype": _types.dtype_name(v)}
        if kind is torch.device:
            return {"device": str(v)}
        if kind is torch.Size:
            return {"size": list(v)}
        if kind is torch.layout:
            return {"layout": str(v)[len("torch."):]}
        if kind is torch.memory_format:
            return {"mfmt": str(v)[len("torch."):]}
        if kind in _PATHS:
            return {"path": [kind.__name__, str(v)]}
        if kind is _types.Namespace:
            return {"ns": self.items(path, shown, vars(v), depth)}
        if kind is collections.Counter:
            return {"counter": self.items(path, shown, v, depth)}
        if kind is collections.defaultdict:
            factory = v.default_factory
            if factory is None:
                fnode: Any = None
            elif _types.FACTORY_NAMES.get(id(factory)) is not None:
                fnode = _types.FACTORY_NAMES[id(factory)]
            else:
                fnode = self.value(_join(path, "default_factory"), f"{shown}.default_factory", factory, depth + 1)
            return {"dd": [fnode, self.items(path, shown, v, depth)]}
        if _types.is_numpy(v):
            node = self.numpy(path, shown, v)
            if node is not None:
                return node
        if isinstance(v, type) or isinstance(v, (types.FunctionType, types.BuiltinFunctionType)):
            return {"ref": _types.reference(v, shown)}
        if isinstance(v, types.ModuleType):
            raise _refuse(shown, v, "a module is code; store its name as a str")
        if isinstance(v, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType,
                          types.MethodType, types.CodeType, types.FrameType)):
            raise _refuse(shown, v)
        if isinstance(v, (torch.UntypedStorage, torch.TypedStorage)):
            raise _refuse(shown, v, "store the tensor that views it")
        if isinstance(v, torch.nn.Module):
            raise _refuse(shown, v, "save its state_dict() and rebuild the module in code")
        return self.reduced(path, shown, v, depth)

    def numpy(self, path: str, shown: str, v: Any) -> Any:
        import numpy as np  # already imported: v is a numpy value

        if type(v) is np.ndarray:
            text, t = _types.array_to_tensor(v, shown)
            return {"nd": [text, self.tensor(path or "array", shown, t)]}
        if isinstance(v, np.generic):
            text = _types.numpy_dtype_text(v.dtype, shown, _type_name(v))
            item = v.item()
            if type(item) not in (float, complex):
                return {"npv": [text, item]}
            raw = np.asarray(v).astype(v.dtype.newbyteorder(">")).tobytes()  # a NaN's payload too
            if type(item) is float:
                return {"npv": [text, _float_node(item, raw)]}
            half = len(raw) // 2
            return {"npv": [text, {"c": [_float_node(item.real, raw[:half]), _float_node(item.imag, raw[half:])]}]}
        if isinstance(v, np.dtype):
            return {"npdt": _types.numpy_dtype_text(v, shown, "numpy.dtype")}
        if isinstance(v, np.ndarray):
            raise _refuse(shown, v, "convert it with np.asarray(x)")
        return None

    def reduced(self, path: str, shown: str, v: Any, depth: int) -> Any:
        """Any other object, as pickle's reduce protocol describes it, in JSON and tensors."""
        try:
            rv = v.__reduce_ex__(2)
        except Exception as e:  # noqa: BLE001 - objects refuse to pickle in many ways
            raise _refuse(shown, v, f"{type(e).__name__}: {e}") from None
        if isinstance(rv, str):
            module = getattr(v, "__module__", None) or ""
            found = sys.modules.get(module)
            for part in rv.split("."):
                found = getattr(found, part, None)
            if found is not v:
                raise _refuse(shown, v, f"its reduce names {rv!r}, which does not lead back to it")
            return {"ref": f"{module}:{rv}"}
        if not isinstance(rv, tuple) or not 2 <= len(rv) <= 6:
            raise _refuse(shown, v, "its __reduce_ex__ returned something pickle would not accept")
        func, args, state, listitems, dictitems, setter = (tuple(rv) + (None,) * 4)[:6]
        if (func is getattr or func is operator.or_) and isinstance(v, enum.Enum) and _enum_by_value(v):
            # early Python 3.11 releases (Debian 12's 3.11.2) reduce an enum member to
            # getattr(cls, name), and a composite flag to operator.or_(a, b): calls no
            # loader should allow. Later ones reduce both to cls(value): that, so the
            # file is the same whichever Python wrote it
            func, args = type(v), (v._value_,)
        if setter is not None:
            raise _refuse(shown, v, "its reduce uses a state setter")
        if not isinstance(args, tuple):
            raise _refuse(shown, v, "its reduce arguments are not a tuple")
        body: Dict[str, Any] = {}
        kwargs = None
        if func is copyreg.__newobj__:
            cls, args = args[0], args[1:]
            body["new"] = _types.reference(cls, shown)
        elif func is copyreg.__newobj_ex__:
            cls, args, kwargs = args
            body["new"] = _types.reference(cls, shown)
        else:
            body["call"] = _types.reference(func, shown)
        if args:
            body["args"] = self.seq(_join(path, "args"), f"{shown}.args", args, depth)
        if kwargs:
            body["kwargs"] = self.items(_join(path, "kwargs"), f"{shown}.kwargs", dict(kwargs), depth)
        if state is not None:
            body["state"] = self.value(path, shown, state, depth + 1)
        if listitems is not None:
            body["list"] = self.seq(_join(path, "items"), shown, list(listitems), depth)
        if dictitems is not None:
            body["dict"] = self.items(_join(path, "items"), shown, dict(dictitems), depth)
        return {"obj": body}


def _enum_by_value(v: enum.Enum) -> bool:
    """Whether the enum member comes back from its class called with its value."""
    try:
        return type(v)(v._value_) is v
    except Exception:  # noqa: BLE001 - an enum whose lookup by value fails in its own way
        return False


_PATHS = set(_types.PATH_TYPES.values())


def flatten(obj: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Splits obj into named tensors and the header metadata that describes the rest.

    Returns:
        (tensors by dotted path, extra ``__metadata__`` entries: none for a flat dict of
        plain untied tensors, else the structure JSON under ``STRUCTURE_KEY``).

    Raises:
        TypeError: naming the key path and type of the first value that cannot be saved.
        ValueError: nesting too deep, a cycle, or two keys whose dotted paths collide.
    """
    fl = _Flattener()
    root = fl.value("", "", obj, 0)
    if not fl.needs_structure:
        return fl.tensors, {}
    doc = {"version": STRUCTURE_VERSION, "root": root}
    return fl.tensors, {STRUCTURE_KEY: json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)}


def split(obj: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], bool]:
    """flatten, with a C fast path for the common flat dict of plain tensors.

    Returns:
        (tensors, extra metadata, plain): plain is True when obj was taken as it is
        without looking for ties; the writer must then refuse overlapping tensors
        (check_shared), and the caller falls back to :func:`flatten` if it does.
    """
    if _C.plain_flat(obj) and all(
        t.layout is torch.strided and t.dtype in _STORABLE_DTYPES and t.device.type != "meta"
        and not t.is_nested and not t.is_quantized and not _functional(t) and not _func_wrapped(t)
        for t in obj.values()
    ):
        return obj, {}, True
    tensors, meta = flatten(obj)
    return tensors, meta, False


def explain(obj: Any) -> None:
    """Raises the precise TypeError for the first tensor of a flat dict that cannot be
    stored; returns if there is none."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, torch.Tensor):
                problem = _tensor_problem(str(k), v)
                if problem is not None:
                    raise problem


# ---- tensor subclasses ----
#
# A subclass that implements __tensor_flatten__ / __tensor_unflatten__ (torchao's quantized
# and optimizer-state tensors, and any user class following the protocol) is stored as its
# inner tensors, plain named tensors under "<name>.<attribute>", plus one "tsub" node: the
# class reference, the flatten context as a value of the type table, the outer size, stride
# and dtype. Loading resolves the class through the allowlist before anything else and
# calls __tensor_unflatten__. A subclass object that appears under several names is one
# node ("same" references it); inner tensors tie like any tensor. Other subclasses: one
# that overrides __torch_dispatch__ has no data of its own to store and is refused; any
# other is the "sub" row (its storage, class and __dict__), read with __torch_function__
# disabled so that none of its overrides runs while saving.


try:  # a jagged nested tensor is a traceable subclass, stored as its parts (the "nested" row)
    from torch.nested._internal.nested_tensor import NestedTensor as _JAGGED
except ImportError:  # pragma: no cover - older torch
    _JAGGED = None


_functional = torch._is_functional_tensor
_func_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _type_path(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _no_data(path: str, t: torch.Tensor) -> Optional[TypeError]:
    """A tensor of a plain type whose data lives elsewhere: a functionalized tensor, or a
    torch.func (grad, vmap) wrapper, seen while tracing. Either has no bytes to store."""
    if _functional(t):
        what = "a functionalized tensor (torch.func.functionalize or torch.compile tracing)"
    elif _func_wrapped(t):
        what = "a torch.func wrapper (inside grad, vjp, jvp or vmap)"
    else:
        return None
    return TypeError(f"{path or 'the object'}: {what} has no data of its own to save in safetensors "
                     "format; save real tensors, outside the transform")


def _flat_refusal(path: str, name: str) -> TypeError:
    return TypeError(f"{path}: tensor subclass {name} cannot be saved in a flat safetensors file, which holds "
                     "plain tensors; save it with torch.save(obj, f, format='safetensors'), which stores its "
                     "inner tensors and rebuilds it on load")


def _is_traceable(kind: type) -> bool:
    """Whether a tensor subclass implements the flatten protocol (as torch's
    is_traceable_wrapper_subclass decides it)."""
    return callable(getattr(kind, "__tensor_flatten__", None)) and callable(getattr(kind, "__tensor_unflatten__", None))


def _python_dispatch(t: torch.Tensor) -> bool:
    """Whether t's operations go to a __torch_dispatch__ (wrapper subclasses and the like)."""
    return torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python)


def _subclass_node(fl: "_Flattener", path: str, shown: str, t: torch.Tensor) -> Any:
    """The node of a tensor whose type is a subclass of torch.Tensor (Parameter aside).

    Raises:
        TypeError: naming the path, for a subclass that cannot be stored, one whose
            protocol methods fail, or one that recursed without end.
    """
    kind = type(t)
    try:
        with torch._C.DisableTorchFunctionSubclass():
            if _is_traceable(kind):
                return _flatten_tsub(fl, path, shown, t)
            if _python_dispatch(t):
                raise TypeError(
                    f"{shown}: tensor subclass {_type_path(kind)} overrides __torch_dispatch__ without "
                    "__tensor_flatten__/__tensor_unflatten__, so its values are made by its code rather than "
                    "held in its storage, and cannot be saved in safetensors format; implement the "
                    "flatten protocol, or save plain tensors"
                )
            flags: Dict[str, Any] = {"g": 1} if t.requires_grad else {}
            return fl.subclass(path, shown, t, flags)
    except RecursionError:
        raise TypeError(f"{shown}: tensor subclass {_type_path(kind)} recursed without end while being taken "
                        "apart; it cannot be saved in safetensors format") from None


def _flatten_tsub(fl: "_Flattener", path: str, shown: str, t: torch.Tensor) -> Dict[str, Any]:
    fl.needs_structure = True
    if id(t) in fl.active:
        raise ValueError(f"{shown}: the tensor subclass contains itself; cycles cannot be saved")
    if len(fl.active) >= MAX_DEPTH:
        raise ValueError(f"{shown}: nested deeper than {MAX_DEPTH} levels")
    seen = fl.tsubs.get(id(t))
    if seen is not None:
        return {"tk": "tsub", "name": seen, "same": 1}  # a tie: the very object stored there
    kind = type(t)
    if len(fl.tsubs) and path in fl.tsubs.values():
        raise ValueError(f"{shown}: another tensor is already stored as {path!r} (keys joined with '.' "
                         "collide); rename one of the keys")
    ref = _types.reference(kind, shown)
    try:
        names, ctx = t.__tensor_flatten__()
        inner = {}
        for name in names:
            if type(name) is not str or not name or name in inner:
                raise TypeError(f"__tensor_flatten__ named {name!r}, not a distinct attribute name")
            inner[name] = getattr(t, name)
        size, stride, dtype, grad = list(t.size()), list(t.stride()), t.dtype, t.requires_grad
        param = isinstance(t, _Parameter)
    except RecursionError:
        raise
    except Exception as e:  # noqa: BLE001 - the subclass's own code fails in many ways
        raise TypeError(f"{shown}: tensor subclass {_type_path(kind)} cannot be taken apart "
                        f"({type(e).__name__}: {_one_line(e)}), so it cannot be saved in safetensors format") from None
    for name, v in inner.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{shown}.{name}: tensor subclass {_type_path(kind)} names an inner tensor that is "
                            f"a {_type_name(v)}, so it cannot be saved in safetensors format")
    depth = len(fl.active)  # containers and subclasses being walked: the context nests below them
    fl.tsubs[id(t)] = path
    fl.keep_alive.append(t)  # its id stays unique while flattening
    fl.active.add(id(t))  # a subclass holding itself as an inner tensor is a cycle
    try:
        node: Dict[str, Any] = {"tk": "tsub", "name": path, "cls": ref}
        node["inner"] = {name: fl.tensor(_join(path, name), f"{shown}.{name}", v) for name, v in inner.items()}
        node["ctx"] = fl.value(_join(path, "ctx"), f"{shown} (flatten context)", ctx, depth + 1)
    finally:
        fl.active.discard(id(t))
    node.update(size=size, stride=stride, dtype=_types.dtype_name(dtype))
    if param:
        node["param"] = 1
    if grad:
        node["grad"] = 1
    return node


def _build_tsub(b: "_Builder", node: Dict[str, Any], depth: int) -> torch.Tensor:
    """A traceable subclass from its node: the class resolved through the allowlist first,
    then its inner tensors and context, then ``cls.__tensor_unflatten__``."""
    name = node.get("name")
    if type(name) is not str:
        raise _bad("a tensor subclass node has no name")
    if "same" in node:
        if node.get("same") != 1 or set(node) != {"tk", "name", "same"}:
            raise _bad(f"tensor subclass {name[:80]!r}: a tie has other fields")
        out = b.tsubs.get(name)
        if out is None:
            raise _bad(f"a tie refers to tensor subclass {name[:80]!r}, which is not built before it")
        return out
    if name in b.tsubs:
        raise _bad(f"two tensor subclass nodes are named {name[:80]!r}")
    missing = {"cls", "inner", "ctx", "size", "stride", "dtype"} - set(node)
    if missing:
        raise _bad(f"tensor subclass {name[:80]!r} lacks {sorted(missing)}")
    size = b.shape(node["size"], "a tensor subclass's size")
    stride = b.shape(node["stride"], "a tensor subclass's stride")
    if len(stride) != len(size):
        raise _bad("a tensor subclass's stride and size differ in length")
    dtype = _types.lookup(_types._DTYPES, node["dtype"], "dtype", _bad)
    inner = node["inner"]
    if type(inner) is not dict or any(type(v) is not dict or ("t" not in v and "tk" not in v) for v in inner.values()):
        raise _bad(f"tensor subclass {name[:80]!r}: its inner tensors are not a JSON object of tensors")
    for flag in ("param", "grad"):
        if flag in node and (type(node[flag]) is not int or node[flag] != 1):
            raise _bad(f"tensor subclass {name[:80]!r}: flag {flag!r} is not 1")
    cls = b.allow.resolve(node["cls"], "tensor subclass")  # before anything of it is built
    full = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', '?')}"
    if not (isinstance(cls, type) and issubclass(cls, torch.Tensor) and _is_traceable(cls)):
        raise _bad(f"{full} is not a tensor subclass with __tensor_unflatten__")
    tensors = {k: b.tensor(v, depth + 1) for k, v in inner.items()}
    ctx = b.build(node["ctx"], depth + 1)
    try:
        out = cls.__tensor_unflatten__(tensors, ctx, torch.Size(size), tuple(stride))
        with torch._C.DisableTorchFunctionSubclass():
            if not isinstance(out, cls) or list(out.size()) != size or out.dtype != dtype:
                raise _bad(f"{full}.__tensor_unflatten__ did not give back a {full} of size {size} and dtype "
                           f"{dtype}")
            if node.get("param") == 1:
                out = _Parameter(out, requires_grad=node.get("grad") == 1)
            elif node.get("grad") == 1:
                out = out.requires_grad_(True)
    except SafetensorError:
        raise
    except RecursionError:
        raise _bad(f"rebuilding {full} recursed too deeply") from None
    except Exception as e:  # noqa: BLE001 - an allowed class refusing what the file holds
        raise _bad(f"rebuilding {full} failed: {type(e).__name__}: {_one_line(e)}") from None
    b.tsubs[name] = out
    return out


def _validate_tsub(v: "_Validator", node: Dict[str, Any], path: str, depth: int) -> "_Info":
    """The schema of a "tsub" node (``_Validator.kind_tsub``: verify, and every load before
    building): its fields, inner tensors and context checked as nodes, a tie only to a
    subclass node before it. Resolves and imports nothing; the class is reported in
    ``v.classes``. Returns what the node builds."""
    seen = v.tsubs  # node name -> (dtype, size)
    info = _Info
    name = node.get("name")
    if type(name) is not str:
        raise v.bad(path, "a tensor subclass node has no name")
    if "same" in node:
        if node.get("same") != 1 or set(node) != {"tk", "name", "same"}:
            raise v.bad(path, f"tensor subclass {name[:80]!r}: a tie has other fields")
        if name not in seen:
            raise v.bad(path, f"a tie refers to tensor subclass {name[:80]!r}, which is not built before it")
        return info("tsub", *seen[name])
    if name in seen:
        raise v.bad(path, f"two tensor subclass nodes are named {name[:80]!r}")
    missing = {"cls", "inner", "ctx", "size", "stride", "dtype"} - set(node)
    if missing:
        raise v.bad(path, f"tensor subclass {name[:80]!r} lacks {sorted(missing)}")
    size = v.sizes(node["size"], path, "a tensor subclass's size")
    if len(v.sizes(node["stride"], path, "a tensor subclass's stride")) != len(size):
        raise v.bad(path, "a tensor subclass's stride and size differ in length")
    dtype = _types.lookup(_types._DTYPES, node["dtype"], "dtype", lambda msg: v.bad(path, msg))
    cls = node["cls"]
    if type(cls) is not str or not _REF_TEXT.match(cls):
        raise v.bad(path, "a tensor subclass reference is not 'module:qualname'")
    v.classes[cls.replace(":", ".")] = None
    inner = node["inner"]
    if type(inner) is not dict:
        raise v.bad(path, f"tensor subclass {name[:80]!r}: its inner tensors are not a JSON object of tensors")
    for flag in ("param", "grad"):
        if flag in node and (type(node[flag]) is not int or node[flag] != 1):
            raise v.bad(path, f"tensor subclass {name[:80]!r}: flag {flag!r} is not 1")
    if node.get("grad") == 1 and not (dtype.is_floating_point or dtype.is_complex):
        raise v.bad(path, f"tensor subclass {name[:80]!r} of dtype {dtype} cannot require grad")
    if depth + 1 > MAX_DEPTH:
        raise v.bad(path, f"nested deeper than {MAX_DEPTH} levels")
    for k, sub in inner.items():
        v.tensor(sub, _join(path, k), depth + 1)
    v.node(node["ctx"], _join(path, "ctx"), depth + 1)
    seen[name] = (dtype, tuple(size))
    return info("tsub", dtype, tuple(size))


def _describe_tsub(node: Dict[str, Any], tensor: Any) -> Dict[str, Any]:
    """A tensor subclass node for ``describe``: its class, outer dtype and size, inner tensors."""
    out: Dict[str, Any] = {"type": "tensor", "kind": "tsub"}
    if "same" in node:
        out["same_as"] = str(node.get("name"))
        return out
    out.update({"class": str(node.get("cls")).replace(":", "."), "dtype": node.get("dtype"),
                "size": node.get("size")})
    inner = node.get("inner")
    if isinstance(inner, dict):
        out["inner"] = {str(k): tensor(v) if isinstance(v, dict) else {"type": "invalid"} for k, v in inner.items()}
    return out


def _brief_tsub(node: Dict[str, Any]) -> str:
    if "same_as" in node:
        return f"tensor subclass, the same object as {node['same_as']}"
    size = node.get("size")
    shape = "[" + ", ".join(map(str, size)) + "]" if isinstance(size, list) else "[?]"
    return f"tensor subclass {node.get('class')} {node.get('dtype')} {shape}"


# ---- unflatten ----


def _bad(msg: str, code: str = "structure") -> SafetensorError:
    return error(f"invalid {STRUCTURE_KEY} metadata: {msg}" if code == "structure" else msg, code)


# estimated bytes that parsing one token may allocate (CPython 3.11, 64-bit, rounded up)
_COST_OBJECT = 240  # a JSON object: a dict
_COST_ARRAY = 72  # a JSON array: a list
_COST_STRING = 64  # a string object, besides its characters
_COST_VALUE = 48  # per separator: a pointer, a number object, a dict entry
_COST_TENSOR = 1024  # a tensor object built for a reference (Python object and TensorImpl)


def budget_for(text: str) -> int:
    """The memory the structure decoder may use for this text: ``BUDGET_FACTOR`` times
    its size, and at least ``BUDGET_FLOOR``."""
    return max(BUDGET_FACTOR * len(text), BUDGET_FLOOR)


def estimate(text: str) -> int:
    """An upper bound of what ``json.loads(text)`` allocates, counted without parsing:
    every token is charged as the largest object it can produce."""
    return (
        _COST_OBJECT * text.count("{")
        + _COST_ARRAY * text.count("[")
        + _COST_STRING * (text.count('"') // 2)
        + _COST_VALUE * (text.count(",") + text.count(":") + 1)
        + sys.getsizeof(text)
    )


_TENSOR_FLAGS = {"t", "p", "g", "same", "o"}
_KIND_FIELDS = {
    "meta": {"dtype", "shape", "stride"},
    "nested": {"layout", "parts"},
    "quant": {"dtype", "scheme", "int", "scale", "zero_point", "scales", "zero_points", "axis"},
    "sparse_coo": {"size", "coalesced", "indices", "values"},
    "sparse_compressed": {"layout", "size", "compressed", "plain", "values"},
    "complex": {"data"},
    "sub": {"cls", "data", "state"},
    "tsub": {"name", "same", "cls", "inner", "ctx", "size", "stride", "dtype", "param", "grad"},
}


class _Builder:
    def __init__(self, tensors: Dict[str, torch.Tensor], *, version: int, trusted: bool, budget: int, spent: int,
                 data_budget: int = 0, source: Optional[Any] = None):
        self.tensors = tensors
        self.source = source  # name -> the stored tensor on the CPU, when map_location moved them
        self.version = version
        self.objects: Dict[Tuple[str, int], Any] = {}  # (stored name, object number) -> the object
        self.allow = _types.Allowlist(trusted=trusted, bad=_bad)
        self.budget = budget
        self.spent = spent
        self.data_budget = data_budget
        self.data_spent = 0
        self.derived: Dict[Tuple[str, str, int], Any] = {}  # (tag, stored name, object number) -> value
        self.kinds: Dict[str, torch.Tensor] = {}  # a tk node's canonical text -> the tensor built
        self.checked: Dict[tuple, List[int]] = {}  # sparse indices torch has checked -> largest index
        self.tsubs: Dict[str, Any] = {}  # traceable subclasses rebuilt, by their node's name

    def charge(self, nbytes: int) -> None:
        self.spent += nbytes
        if self.spent > self.budget:
            raise _bad(f"rebuilding it would take more than its memory budget of {self.budget:,} bytes "
                       f"({BUDGET_FACTOR}x the structure text, at least {BUDGET_FLOOR:,})", "budget")

    def copied(self, nbytes: int) -> None:
        """Every copy of stored data the decoder makes is charged here, before it is made:
        at most one copy of what the file holds, in all."""
        self.data_spent += nbytes
        if self.data_spent > self.data_budget:
            raise _bad(f"its values would copy {self.data_spent:,} bytes of tensor data, more than the "
                       f"{self.data_budget:,} bytes the file holds", "budget")

    def data(self, tag: str, node: Dict[str, Any], depth: int, make: Any) -> Any:
        """A value built from a stored tensor (bytes, a numpy array): one per object the
        file names, however often it is referred to."""
        key = ((tag, node["t"], 0 if node.get("same") == 1 else node.get("o", 0)) if "t" in node
               else (tag, _canonical(node), 0))
        if key in self.derived:
            return self.derived[key]
        out = self.derived[key] = make(self.cpu(node, depth + 1))
        return out

    def cpu(self, node: Dict[str, Any], depth: int) -> torch.Tensor:
        """The CPU tensor a value that is not a torch tensor (bytes, a numpy array) is read
        from: such values are data, not storages, whatever map_location says."""
        if "t" not in node:  # a complex (real, imag) pair tensor under a numpy array
            inner = self.cpu(node["data"], depth + 1)
            if not inner.is_contiguous():
                self.copied(inner.numel() * inner.element_size())
                inner = inner.contiguous()
            return torch.view_as_complex(inner)
        name = node["t"]
        placed = self.tensors[name]
        if placed.device.type == "cpu":
            return placed.detach()  # the stored bytes, whatever flags another node gave that object
        if self.source is not None:
            return self.source(name)
        if placed.device.type == "meta":
            raise _bad(f"tensor {name!r} holds a value that is data, not a tensor, and its bytes were not "
                       "read (map_location='meta' on a stream); load it with another map_location")
        self.copied(placed.numel() * placed.element_size())
        return placed.cpu()

    # -- tensors --

    def tensor(self, node: Dict[str, Any], depth: int) -> Any:
        if "tk" in node:
            return self.kind(node, depth)
        extra = set(node) - _TENSOR_FLAGS
        if extra:
            raise _bad(f"a tensor reference has unexpected fields {sorted(extra)[:4]}")
        name = node.get("t")
        if not isinstance(name, str):
            raise _bad("a tensor reference is not a string")
        if name not in self.tensors:
            raise _bad(f"it refers to a tensor {name!r} that the file does not hold")
        number: Optional[int]
        if self.version == 1:
            # version 1 did not number tie objects: every other reference was its own object
            number = 0 if node.get("same") == 1 or (name, 0) not in self.objects else None
        else:
            number = 0 if node.get("same") == 1 else node.get("o", 0)
            if type(number) is not int or number < 0:
                raise _bad(f"tensor {name!r}: object number {str(number)[:20]!r} is not a natural number")
        if number is not None:
            cached = self.objects.get((name, number))
            if cached is not None:
                return cached  # one object per stored object, however often it is referenced
        t = self.tensors[name]
        if number != 0:
            self.charge(_COST_TENSOR)
            t = t.detach()  # a tie: another tensor object over the same storage
        out = self.flags(node, t, name)
        if number is not None:
            self.objects[(name, number)] = out
        return out

    def flags(self, node: Dict[str, Any], t: torch.Tensor, name: str) -> torch.Tensor:
        grad = node.get("g") == 1
        if grad and not (t.is_floating_point() or t.is_complex()):
            raise _bad(f"tensor {name!r} of dtype {t.dtype} cannot require grad")
        if node.get("p") == 1:
            return _Parameter(t, requires_grad=grad)
        if grad and not t.requires_grad:
            return t.requires_grad_(True) if t.is_leaf else t.detach().requires_grad_(True)
        return t

    def part(self, node: Dict[str, Any], field: str, depth: int) -> torch.Tensor:
        sub = node.get(field)
        if type(sub) is not dict or ("t" not in sub and "tk" not in sub):
            raise _bad(f"a {node.get('tk')} tensor's {field!r} is not a tensor")
        t = self.tensor(sub, depth + 1)
        if type(t) is not torch.Tensor:
            raise _bad(f"a {node.get('tk')} tensor's {field!r} is not a plain tensor")
        return t

    def shape(self, value: Any, what: str) -> List[int]:
        if type(value) is not list or len(value) > 64 or any(type(n) is not int or n < 0 or n >= 1 << 62 for n in value):
            raise _bad(f"{what} is not a list of sizes")
        return value

    def kind(self, node: Dict[str, Any], depth: int) -> Any:
        tk = node.get("tk")
        if type(tk) is not str or tk not in _KIND_FIELDS:
            raise _bad(f"unknown tensor kind {str(tk)[:40]!r}")
        extra = set(node) - _KIND_FIELDS[tk] - {"tk", "p", "g"}
        if extra:
            raise _bad(f"a {tk} tensor has unexpected fields {sorted(extra)[:4]}")
        key = _canonical(node) if tk != "meta" else None  # distinct meta tensors have equal nodes
        if key is not None and key in self.kinds:
            return self.kinds[key]  # the same node again: the same object, built and checked once
        self.charge(_COST_TENSOR)
        try:
            t = self.flags(node, self.make_kind(tk, node, depth), str(tk))
        except (SafetensorError, _NotOnMeta):
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, OverflowError) as e:
            raise _bad(f"a {tk} tensor cannot be rebuilt: {_one_line(e)}") from None
        if key is not None:
            self.kinds[key] = t
        return t

    def make_kind(self, tk: str, node: Dict[str, Any], depth: int) -> torch.Tensor:
        if tk in ("quant", "nested"):
            _not_on_meta(node, self.tensors, tk)
        if tk == "complex":
            data = self.part(node, "data", depth)
            if data.dtype not in (torch.float64, torch.float32, torch.float16) or data.dim() == 0 or data.shape[-1] != 2:
                raise _bad("a complex tensor's data is not (real, imag) pairs")
            if data.stride(-1) != 1 or data.dim() > 1 and data.stride(-2) % 2:
                self.copied(data.numel() * data.element_size())
                data = data.contiguous()
            return torch.view_as_complex(data)
        if tk == "tsub":
            return _build_tsub(self, node, depth)
        if tk == "sub":
            cls = self.allow.resolve(node.get("cls"), "tensor subclass")
            if not (isinstance(cls, type) and issubclass(cls, torch.Tensor)):
                raise _bad(f"{cls!r} is not a tensor subclass")
            out = self.part(node, "data", depth).as_subclass(cls)
            if "state" in node:
                state = self.build(node["state"], depth + 1)
                if type(state) is not dict:
                    raise _bad("a tensor subclass's state is not a dict")
                out.__dict__.update(state)
            return out
        if tk == "meta":
            dtype = _types.lookup(_types._DTYPES, node.get("dtype"), "dtype", _bad)
            shape = self.shape(node.get("shape"), "a meta tensor's shape")
            stride = node.get("stride")
            if stride is None:
                return torch.empty(shape, dtype=dtype, device="meta")
            stride = self.shape(stride, "a meta tensor's stride")
            if len(stride) != len(shape):
                raise _bad("a meta tensor's stride and shape differ in length")
            return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        if tk == "nested":
            parts = node.get("parts")
            if type(parts) is not list or not parts:
                raise _bad("a nested tensor has no parts")
            layout = {"strided": torch.strided, "jagged": torch.jagged}.get(str(node.get("layout")))
            if layout is None:
                raise _bad("unknown nested tensor layout")
            tensors = []
            for p in parts:
                if type(p) is not dict:
                    raise _bad("a nested tensor's part is not a tensor")
                tensors.append(self.tensor(p, depth + 1))
            self.copied(sum(p.numel() * p.element_size() for p in tensors))  # nested_tensor copies its parts
            return torch.nested.nested_tensor(tensors, layout=layout)
        if tk == "quant":
            dtype = _types.lookup(_types._DTYPES, node.get("dtype"), "dtype", _bad)
            if dtype not in _QDTYPES:
                raise _bad(f"{dtype} is not a quantized dtype")
            scheme = _types.lookup(_types._QSCHEMES, node.get("scheme"), "quantization scheme", _bad)
            ints = self.part(node, "int", depth)
            if ints.dtype is not _QDTYPES.get(dtype):
                raise _bad(f"a {dtype} tensor's integers are {ints.dtype}")
            self.copied(ints.numel() * ints.element_size())  # the quantized tensor copies its integers
            if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                scale, zp = self.build(node.get("scale"), depth + 1), node.get("zero_point")
                if type(scale) is not float or type(zp) is not int:
                    raise _bad("a quantized tensor's scale or zero point is not a number")
                return torch._make_per_tensor_quantized_tensor(ints, scale, zp)
            axis = node.get("axis")
            if type(axis) is not int:
                raise _bad("a quantized tensor's axis is not an int")
            return torch._make_per_channel_quantized_tensor(
                ints, self.part(node, "scales", depth), self.part(node, "zero_points", depth), axis)
        size = self.shape(node.get("size"), f"a {tk} tensor's size")
        values = self.part(node, "values", depth)
        # torch's invariant check reads every index: it runs once per stored index tensors
        # (and layout, coalesced flag); another node over them checks its size against the
        # largest index, remembered from that run
        fields = ("indices",) if tk == "sparse_coo" else ("compressed", "plain")
        parts = [self.part(node, f, depth) for f in fields]
        if tk == "sparse_coo":
            free = list(range(parts[0].shape[0])) if parts[0].dim() == 2 else []
            blocks = [1] * len(free)
        else:
            batch = parts[0].dim() - 1
            column = node.get("layout") in ("sparse_csr", "sparse_bsr")
            free = [batch + 1 if column else batch]
            blocked = node.get("layout") in ("sparse_bsr", "sparse_bsc")
            blocks = [values.shape[batch + (2 if column else 1)] if blocked and values.dim() > batch + 2 else 1]
        fixed = tuple(-1 if i in free else n for i, n in enumerate(size))
        once = (tk, tuple(str(node[f].get("t", "")) for f in fields), fixed, node.get("coalesced"), node.get("layout"))
        limits = self.checked.get(once)
        check = limits is None and values.device.type != "meta"  # a meta tensor has no indices to check
        if limits is not None:
            for d, block, top in zip(free, blocks, limits):
                if top >= size[d] // block:
                    raise _bad(f"a {tk} tensor's indices are out of range for its size {size}")
        if tk == "sparse_coo":
            coalesced = node.get("coalesced")
            if type(coalesced) is not bool:
                raise _bad("a sparse tensor's coalesced flag is not a bool")
            out = torch.sparse_coo_tensor(parts[0], values, size, is_coalesced=coalesced, check_invariants=check)
        else:
            layout = _types.lookup(_types._LAYOUTS, node.get("layout"), "layout", _bad)
            if layout not in _COMPRESSED:
                raise _bad(f"{layout} is not a compressed sparse layout")
            out = torch.sparse_compressed_tensor(parts[0], parts[1], values, size, layout=layout,
                                                 check_invariants=check)
        if check and parts[0].device.type != "meta":
            index = parts[0] if tk == "sparse_coo" else parts[1].reshape(1, -1)
            if index.shape[-1] == 0:
                self.checked[once] = [-1] * len(free)
            else:
                self.checked[once] = index.amax(dim=1).tolist() if tk == "sparse_coo" else [int(index.max())]
        return out

    # -- values --

    def build(self, node: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise _bad(f"nested deeper than {MAX_DEPTH} levels")
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is list:
            raise _bad("a bare JSON array where a tagged node was expected")
        if type(node) is not dict or len(node) == 0:
            raise _bad("a node is not a tagged JSON object")
        if "t" in node or "tk" in node:
            return self.tensor(node, depth)
        if len(node) != 1:
            raise _bad(f"a node has unexpected fields {sorted(node)[:4]}")
        (tag, body), = node.items()
        handler = _V1_TAGS.get(tag) if self.version == 1 else _TAGS.get(tag)
        if handler is None:
            raise _bad(f"unknown node tag {str(tag)[:40]!r}")
        return handler(self, body, depth)

    def seq(self, body: Any, depth: int, what: str) -> List[Any]:
        """Builds a list node's items in place: each JSON node is dropped once built."""
        if type(body) is not list:
            raise _bad(f"the body of a {what} node is not a list")
        for i, item in enumerate(body):
            body[i] = self.build(item, depth + 1)
        return body

    def pairs(self, body: Any, depth: int, what: str) -> List[Tuple[Any, Any]]:
        out = []
        if type(body) is dict and self.version >= 2:
            for k in body:
                body[k] = self.build(body[k], depth + 1)
            return body  # type: ignore[return-value]
        if type(body) is not list:
            raise _bad(f"the body of a {what} node is not a list of pairs")
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise _bad(f"a {what} item is not a [key, value] pair")
            k = pair[0]
            if self.version == 1 and type(k) not in (str, int):
                raise _bad(f"a dict key of type {type(k).__name__}")
            key = self.build(k, depth + 1)
            try:
                hash(key)
            except TypeError:
                raise _bad(f"a {what} key of type {type(key).__name__} is not hashable") from None
            out.append((key, self.build(pair[1], depth + 1)))
        body.clear()
        return out

    def dict_node(self, body: Any, depth: int) -> Any:
        items = self.pairs(body, depth, "dict")
        return items if type(items) is dict else dict(items)

    def odict_node(self, body: Any, depth: int) -> Any:
        items = self.pairs(body, depth, "OrderedDict")
        out = OrderedDict(items.items() if type(items) is dict else items)
        self.charge(48 * len(out))  # OrderedDict links
        return out

    def odict_attrs_node(self, body: Any, depth: int) -> Any:
        """An OrderedDict with attributes (a state dict's ``_metadata``), as pickle keeps it."""
        items, attrs = self.arity(body, 2, "OrderedDict")
        out = self.odict_node(items, depth)
        built = self.pairs(attrs, depth, "OrderedDict attributes")
        out.__dict__.update(built.items() if type(built) is dict else built)
        return out

    def tuple_node(self, body: Any, depth: int) -> Any:
        out = tuple(self.seq(body, depth, "tuple"))
        body.clear()
        return out

    def set_node(self, body: Any, depth: int, kind: Any = set) -> Any:
        items = self.seq(body, depth, "set")
        self.charge(32 * len(items))
        try:
            out = kind(items)
        except TypeError as e:
            raise _bad(f"a set holds an unhashable item ({e})") from None
        body.clear()
        return out

    def bytes_node(self, body: Any, depth: int, kind: Any = bytes) -> Any:
        if type(body) is str:
            try:
                return kind(base64.b64decode(body.encode("ascii"), validate=True))
            except (ValueError, UnicodeEncodeError):
                raise _bad("bytes are not base64") from None
        if type(body) is dict:
            def make(t: torch.Tensor) -> Any:
                if (type(t) is not torch.Tensor or t.layout is not torch.strided or t.dtype is not torch.uint8
                        or t.dim() != 1 or t.device.type != "cpu"):
                    raise _bad("bytes are not a 1-d uint8 CPU tensor")
                self.copied(t.numel())
                t = t.contiguous()
                return kind(ctypes.string_at(t.data_ptr(), t.numel()) if t.numel() else b"")
            return self.data(kind.__name__, body, depth, make)
        raise _bad("bytes are neither base64 nor a tensor")

    def arity(self, body: Any, n: int, what: str) -> List[Any]:
        if type(body) is not list or len(body) != n:
            raise _bad(f"a {what} node does not have {n} items")
        return body

    def number(self, node: Any, depth: int) -> float:
        v = self.build(node, depth + 1)
        if type(v) not in (int, float):
            raise _bad("a complex part is not a number")
        return float(v)

    def complex_node(self, body: Any, depth: int) -> Any:
        re_, im = self.arity(body, 2, "complex")
        return complex(self.number(re_, depth), self.number(im, depth))

    def range_node(self, body: Any, depth: int) -> Any:
        parts = self.arity(body, 3, "range")
        if any(type(p) is not int for p in parts) or parts[2] == 0:
            raise _bad("a range is not three ints with a nonzero step")
        return range(*parts)

    def slice_node(self, body: Any, depth: int) -> Any:
        return slice(*self.seq(self.arity(body, 3, "slice"), depth, "slice"))

    def size_node(self, body: Any, depth: int) -> Any:
        if type(body) is not list or any(type(n) is not int or not -(1 << 63) <= n < 1 << 63 for n in body):
            raise _bad("a torch.Size is not a list of 64-bit ints")
        try:
            return torch.Size(body)
        except (RuntimeError, OverflowError, TypeError) as e:
            raise _bad(f"a torch.Size cannot be built: {_one_line(e)}") from None

    def device_node(self, body: Any, depth: int) -> Any:
        if type(body) is not str or len(body) > 64:
            raise _bad("a device is not a short string")
        try:
            return torch.device(body)
        except (RuntimeError, ValueError) as e:
            raise _bad(f"device {body!r}: {_one_line(e)}") from None

    def path_node(self, body: Any, depth: int) -> Any:
        kind, text = self.arity(body, 2, "path")
        return _types.make_path(kind, text, _bad)

    def namespace_node(self, body: Any, depth: int) -> Any:
        items = self.pairs(body, depth, "Namespace")
        items = items.items() if type(items) is dict else items
        if any(type(k) is not str for k, _ in items):
            raise _bad("a Namespace has a key that is not a str")
        out = _types.Namespace()
        out.__dict__.update(items)  # what vars() gave on save: no attribute is set (not even __class__)
        return out

    def counter_node(self, body: Any, depth: int) -> Any:
        items = self.pairs(body, depth, "Counter")
        out = collections.Counter()
        out.update(dict(items.items() if type(items) is dict else items))
        return out

    def defaultdict_node(self, body: Any, depth: int) -> Any:
        factory, items = self.arity(body, 2, "defaultdict")
        if factory is None or type(factory) is str:
            fn = None if factory is None else _types.lookup(_types.DEFAULT_FACTORIES, factory, "defaultdict factory", _bad)
        else:
            fn = self.build(factory, depth + 1)
            if not callable(fn):
                raise _bad("a defaultdict factory is not callable")
        built = self.pairs(items, depth, "defaultdict")
        return collections.defaultdict(fn, built.items() if type(built) is dict else built)

    def ndarray_node(self, body: Any, depth: int) -> Any:
        text, data = self.arity(body, 2, "numpy array")
        if type(data) is not dict:
            raise _bad("a numpy array's data is not a tensor")
        def make(t: torch.Tensor) -> Any:
            if type(t) is not torch.Tensor:
                raise _bad("a numpy array's data is not a plain tensor")
            arr = _types.tensor_to_array(text, t, _bad, self.copied)
            return arr
        return self.data("nd", data, depth, make)

    def npscalar_node(self, body: Any, depth: int) -> Any:
        text, value = self.arity(body, 2, "numpy scalar")
        dt = _types.numpy_dtype(text, _bad)
        if dt.kind not in "fc":
            return _types.numpy_scalar(text, self.build(value, depth + 1), _bad)
        size = dt.itemsize // 2 if dt.kind == "c" else dt.itemsize
        complex_parts = dt.kind == "c" and type(value) is dict and list(value) == ["c"] and type(value["c"]) is list
        parts = value["c"] if complex_parts else [value]
        raws = []
        for i, part in enumerate(parts):
            raw = _nan_bits(part.get("f"), size) if type(part) is dict and len(part) == 1 else None
            if raw is not None:
                parts[i] = {"f": "nan"}  # built as a NaN, its bits set below
            raws.append(raw)
        if not complex_parts:
            value = parts[0]
        out = _types.numpy_scalar(text, self.build(value, depth + 1), _bad)
        if not any(r is not None for r in raws):
            return out
        import numpy as np

        fields = [out.real, out.imag] if dt.kind == "c" else [out]
        data = b"".join(r if r is not None else np.asarray(f).astype(f">f{size}").tobytes()
                        for r, f in zip(raws, fields))
        return np.frombuffer(data, dtype=dt.newbyteorder(">")).astype(dt.newbyteorder("="))[0]

    def ref_node(self, body: Any, depth: int) -> Any:
        return self.allow.resolve(body, "class or function")

    def obj_node(self, body: Any, depth: int) -> Any:
        """An object as its reduce tuple describes it: rebuilt only if allowed."""
        if type(body) is not dict:
            raise _bad("an object node is not a JSON object")
        extra = set(body) - {"new", "call", "args", "kwargs", "state", "list", "dict"}
        if extra or ("new" in body) == ("call" in body):
            raise _bad("an object node needs exactly one of 'new' and 'call', and nothing unknown")
        role = "class" if "new" in body else "class or function"  # an enum member is a class called
        target = self.allow.resolve(body.get("new", body.get("call")), role)
        name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"
        args = self.seq(body.get("args", []), depth, "arguments")
        kwargs = self.pairs(body.get("kwargs", {}), depth, "keyword arguments")
        kwargs = dict(kwargs.items() if type(kwargs) is dict else kwargs)
        if any(type(k) is not str for k in kwargs):
            raise _bad("keyword argument names must be str")
        self.charge(_COST_OBJECT)
        try:
            if role == "class":
                if not isinstance(target, type):
                    raise _bad(f"{name} is not a class")
                obj = target.__new__(target, *args, **kwargs)
            else:
                if not callable(target):
                    raise _bad(f"{name} is not callable")
                obj = target(*args, **kwargs)
            if ("state" in body or "list" in body or "dict" in body) and not self.allow.owns(obj):
                # as weights_only's BUILD: state goes only into instances of allowed classes
                raise _bad(f"{name} returned a {_type_name(obj)}, whose class this process has not allowed "
                           "to receive state", "not_allowed")
            if "state" in body:
                _set_state(obj, self.build(body["state"], depth + 1))
            if "list" in body:
                items = self.seq(body["list"], depth, "list items")
                obj.extend(items) if hasattr(obj, "extend") else [obj.append(x) for x in items]
            if "dict" in body:
                pairs = self.pairs(body["dict"], depth, "dict items")
                for k, v in (pairs.items() if type(pairs) is dict else pairs):
                    obj[k] = v
        except SafetensorError:
            raise
        except RecursionError:
            raise _bad(f"rebuilding {name} recursed too deeply") from None
        except Exception as e:  # noqa: BLE001 - an allowed class refusing malformed state
            raise _bad(f"rebuilding {name} failed: {type(e).__name__}: {_one_line(e)}") from None
        return obj


class _NotOnMeta(NotImplementedError):
    """What torch.load raises too: no quantized or nested tensors on the meta device."""


def _not_on_meta(node: Dict[str, Any], tensors: Dict[str, torch.Tensor], tk: str) -> None:
    """torch has no quantized or nested meta tensors: say so, as torch.load does."""
    sub = node.get("int") if tk == "quant" else (node.get("parts") or [None])[0]
    name = sub.get("t") if type(sub) is dict else None
    if name in tensors and tensors[name].device.type == "meta":
        what = "quantized" if tk == "quant" else "nested"
        raise _NotOnMeta(f"tensor {name!r}: torch has no {what} tensors on the meta device (torch.load "
                                  "fails the same way); load with map_location='cpu'")


def _set_state(obj: Any, state: Any) -> None:
    """pickle's BUILD, as torch's weights_only unpickler does it."""
    setstate = getattr(obj, "__setstate__", None)
    if setstate is not None:
        setstate(state)
        return
    slots = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slots = state
    if state:
        obj.__dict__.update(state)
    if slots:
        for k, v in slots.items():
            setattr(obj, k, v)


def _one_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:300]


_QDTYPES = {torch.qint8: torch.int8, torch.quint8: torch.uint8, torch.qint32: torch.int32}
if hasattr(torch, "quint4x2"):
    _QDTYPES[torch.quint4x2] = torch.uint8
if hasattr(torch, "quint2x4"):
    _QDTYPES[torch.quint2x4] = torch.uint8


def _float_tag(b: _Builder, body: Any, depth: int) -> Any:
    raw = _nan_bits(body, 8)
    if raw is not None:
        return struct.unpack(">d", raw)[0]
    if body not in ("nan", "inf", "-inf"):
        raise _bad(f"unknown float {str(body)[:40]!r}")
    return float(body)


def _lookup_tag(table: Dict[str, Any], what: str) -> Any:
    return lambda b, body, depth: _types.lookup(table, body, what, _bad)


_V1_TAGS: Dict[str, Any] = {
    "f": _float_tag,
    "d": _Builder.dict_node,
    "od": _Builder.odict_node,
    "l": lambda b, body, depth: b.seq(body, depth, "list"),
    "tu": _Builder.tuple_node,
}
_TAGS: Dict[str, Any] = dict(
    _V1_TAGS,
    oda=_Builder.odict_attrs_node,
    set=_Builder.set_node,
    fset=lambda b, body, depth: b.set_node(body, depth, frozenset),
    b=_Builder.bytes_node,
    ba=lambda b, body, depth: b.bytes_node(body, depth, bytearray),
    c=_Builder.complex_node,
    range=_Builder.range_node,
    slice=_Builder.slice_node,
    dtype=_lookup_tag(_types._DTYPES, "dtype"),
    device=_Builder.device_node,
    size=_Builder.size_node,
    layout=_lookup_tag(_types._LAYOUTS, "layout"),
    mfmt=_lookup_tag(_types._MEMORY_FORMATS, "memory format"),
    path=_Builder.path_node,
    ns=_Builder.namespace_node,
    counter=_Builder.counter_node,
    dd=_Builder.defaultdict_node,
    nd=_Builder.ndarray_node,
    npv=_Builder.npscalar_node,
    npdt=lambda b, body, depth: _types.numpy_dtype(body, _bad),
    ref=_Builder.ref_node,
    obj=_Builder.obj_node,
)


def unflatten(
    tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]], *, trusted: bool = False,
    source: Optional[Any] = None,
) -> Any:
    """Rebuilds what flatten split, from a file's tensors and metadata.

    Without the structure key the tensors dict is returned as it is.

    Args:
        tensors: the file's tensors by name.
        metadata: the file's ``__metadata__``.
        trusted: the caller passed ``weights_only=False``: classes and functions the
            file names are imported and rebuilt without the allowlist.
        source: name -> that stored tensor on the CPU, for values that are data rather
            than tensors (bytes, numpy arrays) when map_location put ``tensors`` elsewhere.

    Raises:
        SafetensorError: the structure metadata is malformed, refers to a tensor that the
            file does not hold, would exceed the decoder's memory budget
            (``max(4 x its size, 256 MiB)``), or names a class or function that this process
            has not allowed (code ``"not_allowed"``).
    """
    text = (metadata or {}).get(STRUCTURE_KEY)
    if text is None:
        return tensors
    root, version, budget, spent = _document(text)
    held = {name: (t.dtype, tuple(t.shape), t.numel() * t.element_size()) for name, t in tensors.items()}
    checked = _check(root, version, budget, spent, held)  # the schema first: the builder meets valid nodes
    try:
        return _Builder(tensors, version=version, trusted=trusted, budget=budget, spent=spent,
                        data_budget=checked.data_budget, source=source).build(root, 0)
    except RecursionError:
        raise _bad("nested too deeply") from None


def _parse(text: str) -> Tuple[Any, int, int]:
    """The structure JSON, parsed only when its worst case fits the memory budget.

    Returns:
        (the document, the budget in bytes, what parsing was charged against it).

    Raises:
        SafetensorError: over the budget, not JSON, a huge int, or nested too deeply.
    """
    budget = budget_for(text)
    spent = estimate(text)
    if spent > budget:
        raise _bad(f"parsing it could take {spent:,} bytes, more than its memory budget of "
                   f"{budget:,} ({BUDGET_FACTOR}x the structure text, at least {BUDGET_FLOOR:,})", "budget")
    try:
        doc = json.loads(text, parse_constant=_raise_constant, parse_int=_parse_int)
    except RecursionError:
        raise _bad("nested too deeply") from None
    except ValueError as e:
        if isinstance(e, SafetensorError):
            raise
        raise _bad(f"not JSON ({_one_line(e)})") from None
    return doc, budget, spent


MAX_INT_DIGITS = 4300  # CPython's default limit, kept even where a program lifts it


def _parse_int(text: str) -> int:
    """JSON ints of bounded length: converting a huge one is quadratic."""
    if len(text) > MAX_INT_DIGITS + 1:
        raise _bad(f"an integer of {len(text):,} digits (at most {MAX_INT_DIGITS} are read)")
    try:
        return int(text)
    except ValueError:
        raise _bad(f"an integer of {len(text):,} digits cannot be read") from None


def _raise_constant(c: str) -> Any:
    raise _bad(f"the non-standard JSON constant {c}")


# ---- validating a structure against its schema, without building it ----
#
# verify runs this alone; every load runs it first, so a structure that loads is one that
# verifies, and the builder below meets only well-formed nodes. Nothing is imported,
# resolved or instantiated: class and function references are collected for the report.

_REF_PART = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
_REF_TEXT = re.compile(f"{_REF_PART}:{_REF_PART}\\Z")
_NP_CHAR = {"b1": torch.bool, "i1": torch.int8, "i2": torch.int16, "i4": torch.int32, "i8": torch.int64,
            "u1": torch.uint8, "u2": torch.uint16, "u4": torch.uint32, "u8": torch.uint64,
            "f2": torch.float16, "f4": torch.float32, "f8": torch.float64,
            "c8": torch.complex64, "c16": torch.complex128}
_UNHASHABLE = {"d", "od", "l", "set", "ba", "ns", "counter", "dd", "nd"}
_QSCHEMES_READ = ("per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams")
_PER_CHANNEL_DTYPES = {"per_channel_affine": (torch.float64, torch.int64),
                       "per_channel_affine_float_qparams": (torch.float32, torch.float32)}
_INDEX_DTYPES = (torch.int32, torch.int64)
_DENSE = ("dense",)  # tensor kinds a component may be: strided, plain-typed (complex included)


class _Info:
    """What a tensor node builds, as far as the schema can tell: kind, dtype, shape."""

    __slots__ = ("kind", "dtype", "shape", "grad")

    def __init__(self, kind: str, dtype: Optional[torch.dtype], shape: Tuple[int, ...], grad: bool = False):
        self.kind, self.dtype, self.shape, self.grad = kind, dtype, shape, grad


def _where(path: str) -> str:
    if len(path) > 160:
        return "..." + path[-160:]  # deep nesting: the innermost part says where
    return path if path else "<root>"


class _Validator:
    """One pass over a parsed structure: fields and types of every node, tensor references
    with the dtype and shape each node needs, the invariants of sparse, quantized and
    nested tensors that the header decides, and what building it would cost."""

    def __init__(self, tensors: Dict[str, Tuple[Optional[torch.dtype], Tuple[int, ...], int]], *,
                 version: int, budget: int, spent: int) -> None:
        self.tensors = tensors  # name -> (torch dtype or None, torch shape, stored bytes)
        self.version = version
        self.budget = budget
        self.spent = spent
        self.data_budget = _data_allowance(tensors)
        self.data_spent = 0
        self.classes: Dict[str, None] = {}
        self.seen: set = set()  # (name, object number) already counted
        self.kinds: Dict[str, _Info] = {}  # a tk node's canonical text -> what it builds
        self.copied: set = set()  # (role, name, object number) whose copy is counted
        self.data: Dict[str, None] = {}  # stored tensors read as values that are data (bytes, numpy)
        self.tsubs: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = {}  # tsub node name -> (dtype, size)

    def bad(self, path: str, msg: str) -> SafetensorError:
        return _bad(f"at {_where(path)}: {msg}")

    def charge(self, path: str, nbytes: int) -> None:
        self.spent += nbytes
        if self.spent > self.budget:
            raise _bad(f"at {_where(path)}: rebuilding it would take more than its memory budget of "
                       f"{self.budget:,} bytes ({BUDGET_FACTOR}x the structure text, at least "
                       f"{BUDGET_FLOOR:,})", "budget")

    def charge_data(self, path: str, nbytes: int) -> None:
        """Copies of stored data: at most one copy of what the file holds, in all."""
        self.data_spent += nbytes
        if self.data_spent > self.data_budget:
            raise _bad(f"at {_where(path)}: its values would copy {self.data_spent:,} bytes of tensor data, "
                       f"more than the {self.data_budget:,} bytes the file holds", "budget")

    def copy(self, path: str, role: str, node: Dict[str, Any], nbytes: int) -> None:
        """A value that copies a stored tensor: counted once per object it builds."""
        key = (role, node.get("t"), 0 if node.get("same") == 1 else node.get("o", 0))
        self.data[str(node.get("t"))] = None
        if key not in self.copied:
            self.copied.add(key)
            self.charge_data(path, nbytes)

    # -- tensors --

    def ref(self, node: Dict[str, Any], path: str) -> _Info:
        extra = set(node) - _TENSOR_FLAGS
        if extra:
            raise self.bad(path, f"a tensor reference has unexpected fields {sorted(extra)[:4]}")
        name = node.get("t")
        if type(name) is not str:
            raise self.bad(path, "a tensor reference is not a string")
        if name not in self.tensors:
            raise self.bad(path, f"it refers to a tensor {name[:200]!r} that the file does not hold")
        for flag in ("p", "g", "same"):
            if flag in node and (type(node[flag]) is not int or node[flag] != 1):
                raise self.bad(path, f"tensor {name[:200]!r}: flag {flag!r} is not 1")
        number = node.get("o", 0)
        if type(number) is not int or number < 0:
            raise self.bad(path, f"tensor {name[:200]!r}: object number {str(number)[:20]!r} is not a natural number")
        dtype, shape, _nbytes = self.tensors[name]
        if dtype is None:
            raise self.bad(path, f"tensor {name[:200]!r} has a dtype this version of torch cannot hold")
        key = (name, 0 if node.get("same") == 1 else number)
        if key[1] != 0 and key not in self.seen:
            self.charge(path, _COST_TENSOR)
        self.seen.add(key)
        return self.flagged(node, _Info("param" if node.get("p") == 1 else "dense", dtype, shape), path, name)

    def flagged(self, node: Dict[str, Any], info: _Info, path: str, what: str) -> _Info:
        for flag in ("p", "g"):
            if flag in node and (type(node[flag]) is not int or node[flag] != 1):
                raise self.bad(path, f"{what[:200]!r}: flag {flag!r} is not 1")
        if node.get("g") == 1:
            if info.dtype is None or not (info.dtype.is_floating_point or info.dtype.is_complex):
                raise self.bad(path, f"tensor {what[:200]!r} of dtype {info.dtype} cannot require grad")
            info.grad = True
        if node.get("p") == 1:
            info.kind = "param" if info.kind == "dense" else info.kind
        return info

    def tensor(self, node: Any, path: str, depth: int) -> _Info:
        if type(node) is not dict or ("t" not in node and "tk" not in node):
            raise self.bad(path, "not a tensor")
        if "tk" not in node:
            return self.ref(node, path)
        tk = node.get("tk")
        if type(tk) is not str or tk not in _KIND_FIELDS:
            raise self.bad(path, f"unknown tensor kind {str(tk)[:40]!r}")
        extra = set(node) - _KIND_FIELDS[tk] - {"tk", "p", "g"}
        if extra:
            raise self.bad(path, f"a {tk} tensor has unexpected fields {sorted(extra)[:4]}")
        key = _canonical(node)
        known = self.kinds.get(key)
        if known is not None:
            return known  # the very same node again: the builder returns the same object
        self.charge(path, _COST_TENSOR)
        check = getattr(self, "kind_" + tk, None)
        info = check(node, path, depth) if check is not None else self.kind_generic(node, path, depth)
        info = self.flagged(node, info, path, tk)
        self.kinds[key] = info
        return info

    def part(self, node: Dict[str, Any], field: str, path: str, depth: int, kinds: Tuple[str, ...] = _DENSE) -> _Info:
        sub = node.get(field)
        where = _join(path, field)
        if type(sub) is not dict or ("t" not in sub and "tk" not in sub):
            raise self.bad(where, f"a {node.get('tk')} tensor's {field!r} is not a tensor")
        if depth + 1 > MAX_DEPTH:
            raise self.bad(where, f"nested deeper than {MAX_DEPTH} levels")
        info = self.tensor(sub, where, depth + 1)
        if info.kind not in kinds:
            raise self.bad(where, f"a {node.get('tk')} tensor's {field!r} is not a plain dense tensor")
        return info

    def sizes(self, value: Any, path: str, what: str) -> Tuple[int, ...]:
        if type(value) is not list or len(value) > 64 or any(type(n) is not int or n < 0 or n >= 1 << 62 for n in value):
            raise self.bad(path, f"{what} is not a list of sizes")
        return tuple(value)

    def kind_complex(self, node: Dict[str, Any], path: str, depth: int) -> _Info:
        data = self.part(node, "data", path, depth)
        pairs = {torch.float64: torch.complex128, torch.float32: torch.complex64, torch.float16: torch.complex32}
        if data.dtype not in pairs or not data.shape or data.shape[-1] != 2:
            raise self.bad(path, "a complex tensor's data is not (real, imag) pairs")
        return _Info("dense", pairs[data.dtype], data.shape[:-1])

    def kind_sub(self, node: Dict[str, Any], path: str, depth: int) -> _Info:
        cls = node.get("cls")
        if type(cls) is not str or not _REF_TEXT.match(cls):
            raise self.bad(path, "a tensor subclass reference is not 'module:qualname'")
        self.classes[cls.replace(":", ".")] = None
        data = self.part(node, "data", path, depth)
        if "state" in node:
            state = node["state"]
            if type(state) is not dict or set(state) != {"d"}:
                raise self.bad(_join(path, "state"), "a tensor subclass's state is not a dict")
            self.node(state, _join(path, "state"), depth + 1)
        return _Info("sub", data.dtype, data.shape)

    def kind_tsub(self, node: Dict[str, Any], path: str, depth: int) -> _Info:
        return _validate_tsub(self, node, path, depth)

    def kind_meta(self, node: Dict[str, Any], path: str, depth: int) -> _Info:
        dtype = _types._DTYPES.get(node.get("dtype")) if type(node.get("dtype")) is str else None
        if dtype is None:
            raise self.bad(path, f"unknown dtype {str(node.get('dtype'))[:40]!r}")
        shape = self.sizes(node.get("shape"), path, "a meta tensor's shape")
        stride = node.get("stride")
        if stride is not None and len(self.sizes(stride, path, "a meta tensor's stride")) != len(shape):
            raise self.bad(path, "a meta tensor's stride and shape differ in length")
        return _Info("meta", dtype, shape)

    def kind_nested(self, node: Dict[str, Any], path: str, depth: int) -> _Info:
        parts = node.get("parts")
        layout = node.get("layout")
        if layout not in ("strided", "jagged"):
            raise self.bad(path, "unknown nested tensor layout")
        if type(parts) is not list or not parts:
            raise self.bad(path, "a nested tensor has no parts")
        infos = []
        for i, p in enumerate(parts):
            if depth + 1 > MAX_DEPTH:
                raise self.bad(path, f"nested deeper than {MAX_DEPTH} levels")
            info = self.tensor(p, f"{path}[{i}]", depth + 1)
            if info.kind not in ("dense", "param"):
                raise self.bad(f"{path}[{i}]", "a nested tensor's part is not a dense tensor")
            infos.append(info)
        first = infos[0]
        for i, info in enumerate(infos):
            if info.dtype != first.dtype or len(info.shape) != len(first.shape):
                raise self.bad(f"{path}[{i}]", "a nested tensor's parts differ in dtype or number of dimensions")
            if layout == "jagged" and (not info.shape or info.shape[1:] != first.shape[1:]):
                raise self.bad(f"{path}[{i}]", "a jagged nested tensor's parts differ beyond their first dimension")
        self.charge_data(path, sum(_numel(i.shape) * _itemsize(i.dtype) for i in infos))  # nested_tensor copies
        return _Info("nested", first.dtype, (len(infos),))

    def kind_quant(self, node: Dict[str, Any], path: str, depth: int) -> _Info:
        dtype = _types._DTYPES.get(node.get("dtype")) if type(node.get("dtype")) is str else None
        if dtype not in _QDTYPES:
            raise self.bad(path, f"{str(node.get('dtype'))[:40]!r} is not a quantized dtype")
        scheme = node.get("scheme")
        if scheme not in _QSCHEMES_READ:
            raise self.bad(path, f"unknown quantization scheme {str(scheme)[:40]!r}")
        ints = self.part(node, "int", path, depth)
        if ints.dtype is not _QDTYPES[dtype]:
            raise self.bad(path, f"a {dtype} tensor's integers are {ints.dtype}")
        if scheme == "per_tensor_affine":
            if {"scales", "zero_points", "axis"} & set(node):
                raise self.bad(path, "a per-tensor quantized tensor has per-channel fields")
            if not _is_float_node(node.get("scale")) or type(node.get("zero_point")) is not int \
                    or not -(1 << 63) <= node["zero_point"] < 1 << 63:
                raise self.bad(path, "a quantized tensor's scale or zero point is not a number")
        else:
            if {"scale", "zero_point"} & set(node):
                raise self.bad(path, "a per-channel quantized tensor has per-tensor fields")
            axis = node.get("axis")
            if type(axis) is not int or not 0 <= axis < len(ints.shape):
                raise self.bad(path, f"per-channel axis {str(axis)[:20]} out of range for shape {list(ints.shape)}")
            want = _PER_CHANNEL_DTYPES[scheme]
            for field, dt in zip(("scales", "zero_points"), want):
                info = self.part(node, field, path, depth)
                if info.dtype is not dt or info.shape != (ints.shape[axis],):
                    raise self.bad(_join(path, field), f"per-channel {field} must be {dt} of shape "
                                   f"[{ints.shape[axis]}] (the size of axis {axis}), not {info.dtype} "
                                   f"{list(info.shape)}")
        self.charge_data(path, _numel(ints.shape) * _itemsize(ints.dtype))  # the quantized tensor's own copy
        return _Info("quant", dtype, ints.shape)

    def kind_sparse_coo(self, node: Dict[str, Any], path: str, depth: int) -> _Info:
        size = self.sizes(node.get("size"), path, "a sparse_coo tensor's size")
        if type(node.get("coalesced")) is not bool:
            raise self.bad(path, "a sparse tensor's coalesced flag is not a bool")
        indices = self.part(node, "indices", path, depth)
        values = self.part(node, "values", path, depth)
        if indices.dtype is not torch.int64 or len(indices.shape) != 2:
            raise self.bad(path, "a sparse tensor's indices are not a 2-d int64 tensor")
        sparse_dim, nnz = indices.shape
        if not values.shape or values.shape[0] != nnz:
            raise self.bad(path, f"a sparse tensor has {nnz} indices but values of shape {list(values.shape)}")
        if sparse_dim + len(values.shape) - 1 != len(size) or tuple(values.shape[1:]) != size[sparse_dim:]:
            raise self.bad(path, f"a sparse tensor's indices and values do not fit its size {list(size)}")
        return _Info("sparse", values.dtype, size)

    def kind_sparse_compressed(self, node: Dict[str, Any], path: str, depth: int) -> _Info:
        size = self.sizes(node.get("size"), path, "a sparse_compressed tensor's size")
        layout = node.get("layout")
        if layout not in ("sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc"):
            raise self.bad(path, f"{str(layout)[:40]!r} is not a compressed sparse layout")
        comp = self.part(node, "compressed", path, depth)
        plain = self.part(node, "plain", path, depth)
        values = self.part(node, "values", path, depth)
        if comp.dtype not in _INDEX_DTYPES or plain.dtype is not comp.dtype:
            raise self.bad(path, "compressed sparse indices are not both int32 or both int64")
        if not comp.shape or len(plain.shape) != len(comp.shape) or comp.shape[:-1] != plain.shape[:-1]:
            raise self.bad(path, "compressed sparse indices differ in their batch dimensions")
        batch = len(comp.shape) - 1
        blocked = layout in ("sparse_bsr", "sparse_bsc")
        dense = len(values.shape) - batch - 1 - (2 if blocked else 0)
        if dense < 0 or len(size) != batch + 2 + dense or size[:batch] != comp.shape[:-1] \
                or values.shape[:batch] != comp.shape[:-1] or values.shape[batch] != plain.shape[-1]:
            raise self.bad(path, f"a {layout} tensor's indices and values do not fit its size {list(size)}")
        along = batch + (0 if layout in ("sparse_csr", "sparse_bsr") else 1)
        block = values.shape[batch + 1 + (0 if along == batch else 1)] if blocked else 1
        if block == 0 or size[along] % block or comp.shape[-1] != size[along] // block + 1:
            raise self.bad(path, f"a {layout} tensor's compressed indices do not fit its size {list(size)}")
        if dense and values.shape[len(values.shape) - dense:] != size[len(size) - dense:]:
            raise self.bad(path, f"a {layout} tensor's values do not fit its size {list(size)}")
        return _Info("sparse", values.dtype, size)

    def kind_generic(self, node: Dict[str, Any], path: str, depth: int) -> _Info:
        """A kind this validator has no schema for: its tensors must exist, its values be nodes."""
        for field, value in node.items():
            if field in ("tk", "p", "g"):
                continue
            if type(value) is dict and ("t" in value or "tk" in value):
                self.tensor(value, _join(path, field), depth + 1)
            elif type(value) is not str:
                self.node(value, _join(path, field), depth + 1)
        return _Info(str(node["tk"]), None, ())

    # -- values --

    def node(self, node: Any, path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.bad(path, f"nested deeper than {MAX_DEPTH} levels")
        if node is None or type(node) in (bool, int, float, str):
            return
        if type(node) is list:
            raise self.bad(path, "a bare JSON array where a tagged node was expected")
        if type(node) is not dict or len(node) == 0:
            raise self.bad(path, "a node is not a tagged JSON object")
        if "t" in node or "tk" in node:
            self.tensor(node, path, depth)
            return
        if len(node) != 1:
            raise self.bad(path, f"a node has unexpected fields {sorted(node)[:4]}")
        (tag, body), = node.items()
        if tag not in (_V1_TAGS if self.version == 1 else _TAGS):
            raise self.bad(path, f"unknown node tag {str(tag)[:40]!r}")
        check = getattr(self, "tag_" + tag, None)
        if check is None:  # a tag this validator has no schema for: what it holds must exist
            self.generic(body, path, depth)
            return
        check(body, path, depth)

    def generic(self, body: Any, path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.bad(path, f"nested deeper than {MAX_DEPTH} levels")
        if type(body) is list:
            for i, item in enumerate(body):
                self.generic(item, f"{path}[{i}]", depth + 1)
        elif type(body) is dict and ("t" in body or "tk" in body):
            self.tensor(body, path, depth + 1)
        elif type(body) is dict and len(body) == 1 and next(iter(body)) in _TAGS:
            self.node(body, path, depth + 1)
        elif type(body) is dict:
            for k, v in body.items():
                self.generic(v, _join(path, str(k)), depth + 1)

    def seq(self, body: Any, path: str, depth: int, what: str) -> List[Any]:
        if type(body) is not list:
            raise self.bad(path, f"the body of a {what} node is not a list")
        for i, item in enumerate(body):
            self.node(item, f"{path}[{i}]", depth + 1)
        return body

    def pairs(self, body: Any, path: str, depth: int, what: str, str_keys: bool = False) -> None:
        if type(body) is dict and self.version >= 2:
            for k, v in body.items():
                self.node(v, _join(path, k), depth + 1)
            return
        if type(body) is not list:
            raise self.bad(path, f"the body of a {what} node is not a list of pairs")
        for i, pair in enumerate(body):
            if type(pair) is not list or len(pair) != 2:
                raise self.bad(f"{path}[{i}]", f"a {what} item is not a [key, value] pair")
            k, v = pair
            if self.version == 1 and type(k) not in (str, int):
                raise self.bad(f"{path}[{i}]", f"a dict key of type {type(k).__name__}")
            if str_keys and type(k) is not str:
                raise self.bad(f"{path}[{i}]", f"a {what} key is not a str")
            shown = _join(path, k) if type(k) is str else f"{path}[{str(k)[:40]}]"
            self.node(k, f"{path}[{i}].key", depth + 1)
            if self.hashable(k) is False:
                raise self.bad(f"{path}[{i}]", f"a {what} key is not hashable")
            self.node(v, shown, depth + 1)

    def hashable(self, node: Any) -> Optional[bool]:
        """Whether a (checked) node builds a hashable value; None when only building tells."""
        if type(node) is not dict:
            return True
        if "t" in node or "tk" in node:
            return True
        (tag, body), = node.items()
        if tag in _UNHASHABLE or (tag == "slice" and sys.version_info < (3, 12)):
            return False
        if tag == "tu":
            answers = [self.hashable(x) for x in body]
            return False if False in answers else (None if None in answers else True)
        return None if tag == "obj" else True

    def tag_f(self, body: Any, path: str, depth: int) -> None:
        if not _float_body_ok(body, 8):
            raise self.bad(path, f"unknown float {str(body)[:40]!r}")

    def tag_d(self, body: Any, path: str, depth: int) -> None:
        self.pairs(body, path, depth, "dict")

    def tag_od(self, body: Any, path: str, depth: int) -> None:
        self.pairs(body, path, depth, "OrderedDict")
        self.charge(path, 48 * len(body))

    def tag_oda(self, body: Any, path: str, depth: int) -> None:
        items, attrs = self.arity(body, 2, path, "OrderedDict")
        self.tag_od(items, path, depth)
        self.pairs(attrs, _join(path, "__dict__"), depth, "OrderedDict attributes", str_keys=True)
        names = attrs if type(attrs) is dict else [p[0] for p in attrs]
        for name in names:
            if hasattr(OrderedDict, name):  # an instance attribute 'keys' would hide the method
                raise self.bad(_join(path, "__dict__"), f"attribute {name[:40]!r} would hide an OrderedDict method")

    def tag_counter(self, body: Any, path: str, depth: int) -> None:
        self.pairs(body, path, depth, "Counter")

    def tag_ns(self, body: Any, path: str, depth: int) -> None:
        self.pairs(body, path, depth, "Namespace", str_keys=True)

    def tag_l(self, body: Any, path: str, depth: int) -> None:
        self.seq(body, path, depth, "list")

    def tag_tu(self, body: Any, path: str, depth: int) -> None:
        self.seq(body, path, depth, "tuple")

    def tag_set(self, body: Any, path: str, depth: int) -> None:
        for i, item in enumerate(self.seq(body, path, depth, "set")):
            if self.hashable(item) is False:
                raise self.bad(f"{path}[{i}]", "a set holds an unhashable item")
        self.charge(path, 32 * len(body))

    tag_fset = tag_set

    def tag_b(self, body: Any, path: str, depth: int, role: str = "b") -> None:
        if type(body) is str:
            try:
                base64.b64decode(body.encode("ascii"), validate=True)
            except (ValueError, UnicodeEncodeError):
                raise self.bad(path, "bytes are not base64") from None
            self.charge(path, len(body))
            return
        if type(body) is not dict or "t" not in body or "tk" in body or "p" in body or "g" in body:
            raise self.bad(path, "bytes are neither base64 nor a plain tensor reference")
        info = self.ref(body, path)
        if info.dtype is not torch.uint8 or len(info.shape) != 1:
            raise self.bad(path, "bytes are not a 1-d uint8 tensor")
        self.copy(path, role, body, info.shape[0])

    def tag_ba(self, body: Any, path: str, depth: int) -> None:
        self.tag_b(body, path, depth, "ba")

    def number(self, node: Any, path: str, size: int = 8) -> None:
        if type(node) is int:
            try:
                float(node)
            except OverflowError:
                raise self.bad(path, "a complex part is an int too large for a float") from None
        elif not _is_float_node(node, size):
            raise self.bad(path, "a complex part is not a number")

    def arity(self, body: Any, n: int, path: str, what: str) -> List[Any]:
        if type(body) is not list or len(body) != n:
            raise self.bad(path, f"a {what} node does not have {n} items")
        return body

    def tag_c(self, body: Any, path: str, depth: int, size: int = 8) -> None:
        for part in self.arity(body, 2, path, "complex"):
            self.number(part, path, size)

    def tag_range(self, body: Any, path: str, depth: int) -> None:
        parts = self.arity(body, 3, path, "range")
        if any(type(p) is not int for p in parts) or parts[2] == 0:
            raise self.bad(path, "a range is not three ints with a nonzero step")

    def tag_slice(self, body: Any, path: str, depth: int) -> None:
        self.seq(self.arity(body, 3, path, "slice"), path, depth, "slice")

    def tag_size(self, body: Any, path: str, depth: int) -> None:
        if type(body) is not list or len(body) > 1 << 16 or any(
                type(n) is not int or not -(1 << 63) <= n < 1 << 63 for n in body):
            raise self.bad(path, "a torch.Size is not a list of 64-bit ints")

    def tag_device(self, body: Any, path: str, depth: int) -> None:
        if type(body) is not str or len(body) > 64:
            raise self.bad(path, "a device is not a short string")
        try:
            torch.device(body)
        except (RuntimeError, ValueError) as e:
            raise self.bad(path, f"device {body!r}: {_one_line(e)}") from None

    def tag_dtype(self, body: Any, path: str, depth: int) -> None:
        _types.lookup(_types._DTYPES, body, "dtype", lambda m: self.bad(path, m))

    def tag_layout(self, body: Any, path: str, depth: int) -> None:
        _types.lookup(_types._LAYOUTS, body, "layout", lambda m: self.bad(path, m))

    def tag_mfmt(self, body: Any, path: str, depth: int) -> None:
        _types.lookup(_types._MEMORY_FORMATS, body, "memory format", lambda m: self.bad(path, m))

    def tag_path(self, body: Any, path: str, depth: int) -> None:
        kind, text = self.arity(body, 2, path, "path")
        if type(kind) is not str or kind not in _types.PATH_TYPES or type(text) is not str:
            raise self.bad(path, "a path is not a known path type and a string")

    def tag_dd(self, body: Any, path: str, depth: int) -> None:
        factory, items = self.arity(body, 2, path, "defaultdict")
        if type(factory) is str:
            if factory not in _types.DEFAULT_FACTORIES:
                raise self.bad(path, f"unknown defaultdict factory {factory[:40]!r}")
        elif factory is not None:
            if type(factory) is not dict or len(factory) != 1 or next(iter(factory)) not in ("ref", "obj"):
                raise self.bad(path, "a defaultdict factory is not a class or function")
            self.node(factory, _join(path, "default_factory"), depth + 1)
        self.pairs(items, path, depth, "defaultdict")

    def np_dtype(self, text: Any, path: str) -> torch.dtype:
        if type(text) is not str or not _types._NP_DTYPE.match(text) or text[1:] not in _NP_CHAR:
            raise self.bad(path, f"unknown numpy dtype {str(text)[:40]!r}")
        return _NP_CHAR[text[1:]]

    def tag_nd(self, body: Any, path: str, depth: int) -> None:
        text, data = self.arity(body, 2, path, "numpy array")
        want = self.np_dtype(text, path)
        if type(data) is not dict or "p" in data or "g" in data or not (
                "t" in data and "tk" not in data or data.get("tk") == "complex"):
            raise self.bad(path, "a numpy array's data is not a plain tensor")
        info = self.tensor(data, path, depth + 1)
        if info.dtype is not want:
            raise self.bad(path, f"a numpy array of dtype {text!r} holds {info.dtype} data")
        inner = data if "t" in data else data.get("data", {})
        self.data[str(inner.get("t"))] = None
        swapped = text[0] == ">" and sys.byteorder == "little" or text[0] == "<" and sys.byteorder == "big"
        if swapped and "t" in data:
            self.copy(path, "nd", data, _numel(info.shape) * _itemsize(info.dtype))

    def tag_npv(self, body: Any, path: str, depth: int) -> None:
        text, value = self.arity(body, 2, path, "numpy scalar")
        self.np_dtype(text, path)
        kind, size = text[1], int(text[2:])
        if kind == "b":
            ok = type(value) is bool
        elif kind in "iu":
            bits = 8 * size
            lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if kind == "i" else (0, 1 << bits)
            ok = type(value) is int and lo <= value < hi
        elif kind == "f":
            ok = _is_float_node(value, size) or type(value) is int and _fits_float(value, size)
            ok = ok and (type(value) is not float or _fits_float(value, size))
        else:
            half = size // 2  # each part of a complex64 is a float32

            def fits(part: Any) -> bool:
                return (_is_float_node(part, half) or type(part) is int) and (
                    type(part) not in (int, float) or _fits_float(part, half))

            if type(value) is dict and set(value) == {"c"}:
                self.tag_c(value["c"], path, depth + 1, half)
                ok = all(fits(part) for part in value["c"])
            else:
                ok = fits(value)
        if not ok:
            raise self.bad(path, f"a numpy {text} scalar holds {str(value)[:40]}")

    def tag_npdt(self, body: Any, path: str, depth: int) -> None:
        self.np_dtype(body, path)

    def reference(self, ref: Any, path: str, role: str) -> None:
        if type(ref) is not str or not _REF_TEXT.match(ref):
            raise self.bad(path, f"a {role} reference is not 'module:qualname'")
        self.classes[ref.replace(":", ".")] = None

    def tag_ref(self, body: Any, path: str, depth: int) -> None:
        self.reference(body, path, "class or function")

    def tag_obj(self, body: Any, path: str, depth: int) -> None:
        if type(body) is not dict:
            raise self.bad(path, "an object node is not a JSON object")
        extra = set(body) - {"new", "call", "args", "kwargs", "state", "list", "dict"}
        if extra or ("new" in body) == ("call" in body):
            raise self.bad(path, "an object node needs exactly one of 'new' and 'call', and nothing unknown")
        self.reference(body.get("new", body.get("call")), path, "class" if "new" in body else "callable")
        self.charge(path, _COST_OBJECT)
        if "args" in body:
            self.seq(body["args"], _join(path, "args"), depth, "arguments")
        if "kwargs" in body:
            self.pairs(body["kwargs"], _join(path, "kwargs"), depth, "keyword arguments", str_keys=True)
        if "state" in body:
            self.node(body["state"], path, depth + 1)
        if "list" in body:
            self.seq(body["list"], _join(path, "items"), depth, "list items")
        if "dict" in body:
            self.pairs(body["dict"], _join(path, "items"), depth, "dict items")


def _canonical(node: Dict[str, Any]) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: Optional[torch.dtype]) -> int:
    return dtype.itemsize if dtype is not None else 0


def _is_float_node(node: Any, size: int = 8) -> bool:
    """A float's node, a NaN's bits being ``size`` bytes wide."""
    return type(node) is float or (type(node) is dict and len(node) == 1 and "f" in node
                                   and _float_body_ok(node["f"], size))


def _float_body_ok(body: Any, size: int) -> bool:
    """Whether body is a float tag's: inf, -inf, nan, or a NaN's bits ``size`` bytes wide."""
    if body in ("nan", "inf", "-inf"):
        return True
    try:
        return _nan_bits(body, size) is not None
    except SafetensorError:
        return False


def _fits_float(value: Any, size: int) -> bool:
    fmt = {2: "<e", 4: "<f", 8: "<d"}.get(size, "<d")
    try:
        struct.pack(fmt, float(value))
    except (OverflowError, struct.error):
        return False
    return True


def _check(root: Any, version: int, budget: int, spent: int,
           tensors: Dict[str, Tuple[Optional[torch.dtype], Tuple[int, ...], int]]) -> _Validator:
    v = _Validator(tensors, version=version, budget=budget, spent=spent)
    try:
        v.node(root, "", 0)
    except RecursionError:
        raise _bad("nested too deeply") from None
    return v


def _document(text: str) -> Tuple[Any, int, int, int]:
    """(root, version, budget, spent) of a structure text, or SafetensorError."""
    doc, budget, spent = _parse(text)
    version = doc.get("version") if type(doc) is dict else None
    if type(version) is not int or version not in READABLE_VERSIONS or "root" not in doc:
        raise _bad(f"expected an object with a version in {READABLE_VERSIONS} and a root")
    extra = set(doc) - {"version", "root"}
    if extra:
        raise _bad(f"the document has unexpected fields {sorted(extra)[:4]}")
    return doc["root"], version, budget, spent


def validate(text: str, tensors: Dict[str, Tuple[str, Any, int]]) -> Dict[str, Any]:
    """Checks a structure against its schema without building anything (``verify``).

    Args:
        text: the structure JSON (the value of ``STRUCTURE_KEY``).
        tensors: the file's tensors by name: (safetensors dtype name, shape, stored bytes).

    Returns:
        ``{"version": int, "classes": [...], "data": [...]}``: the classes and functions
        it refers to (whether this process allows them is a loading question, not a
        validity one), and the stored tensors read as values that are data, not tensors
        (bytes, numpy arrays: a loader placing tensors on the meta device still needs
        their bytes).

    Raises:
        SafetensorError: naming the node's path and what is wrong, or the budget.
    """
    root, version, budget, spent = _document(text)
    held = {}
    for name, (dtype, shape, nbytes) in tensors.items():
        torch_dtype = DTYPES.get(dtype)
        shape = list(shape)
        if dtype == "F4" and shape and shape[-1] % 2 == 0:
            shape[-1] //= 2
        held[name] = (torch_dtype, tuple(shape), nbytes)
    v = _check(root, version, budget, spent, held)
    return {"version": version, "classes": sorted(v.classes), "data": sorted(v.data)}


def _data_allowance(held: Dict[str, Tuple[Optional[torch.dtype], Tuple[int, ...], int]]) -> int:
    """Values that are copies of stored data (bytes, byte-swapped arrays, quantized and
    nested tensors) may take one copy of the data the file holds, besides the budget."""
    return sum(n for _d, _s, n in held.values())


# ---- describing a structure without building it (the CLI's inspect tree) ----

_DESCRIBE_TYPES = {
    "d": "dict", "od": "OrderedDict", "oda": "OrderedDict", "l": "list", "tu": "tuple", "set": "set", "fset": "frozenset",
    "ns": "argparse.Namespace", "counter": "collections.Counter", "dd": "collections.defaultdict",
    "b": "bytes", "ba": "bytearray", "c": "complex", "range": "range", "slice": "slice",
    "dtype": "torch.dtype", "device": "torch.device", "size": "torch.Size", "layout": "torch.layout",
    "mfmt": "torch.memory_format", "path": "pathlib path", "nd": "numpy.ndarray", "npv": "numpy scalar",
    "npdt": "numpy.dtype", "ref": "reference", "obj": "object", "f": "float",
}


def describe(text: str, tensors: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The tree a structure describes, as JSON-ready nodes, without building anything:
    containers with their items, plain values, objects with their class names, tensors with
    their dtype and shape (``tensors``: name -> {"dtype", "shape"}), and tied aliases.

    Raises:
        SafetensorError: the structure is not JSON, over the memory budget, or too deep.
    """
    doc = _parse(text)[0]
    if type(doc) is not dict or "root" not in doc:
        raise _bad("no root")
    refs: Dict[str, List[str]] = {}

    def tensor(node: Dict[str, Any], where: str) -> Dict[str, Any]:
        if node.get("tk") == "tsub":
            return _describe_tsub(node, lambda inner: tensor(inner, where))
        if "tk" in node:
            out: Dict[str, Any] = {"type": "tensor", "kind": str(node.get("tk"))}
            for k, v in node.items():
                if isinstance(v, dict) and ("t" in v or "tk" in v):
                    out[k] = tensor(v, where)
                elif k == "parts" and isinstance(v, list):
                    out[k] = [tensor(p, where) if isinstance(p, dict) else walk(p, where, 1) for p in v]
                elif k != "tk":
                    out[k] = v
            return out
        name = str(node.get("t"))
        info = tensors.get(name, {})
        refs.setdefault(name, []).append(where)
        out = {"type": "tensor", "name": name, "dtype": info.get("dtype"), "shape": info.get("shape")}
        if node.get("p") == 1:
            out["parameter"] = True
        if node.get("g") == 1:
            out["requires_grad"] = True
        return out

    def items(body: Any, where: str, depth: int) -> List[Dict[str, Any]]:
        pairs = body.items() if isinstance(body, dict) else (p for p in body if isinstance(p, list) and len(p) == 2) \
            if isinstance(body, list) else ()
        out = []
        for k, v in pairs:
            key = k if isinstance(k, (str, int)) else walk(k, where, depth + 1)
            shown = k if isinstance(k, str) else f"[{k}]" if isinstance(k, int) else "[...]"
            out.append({"key": key, "value": walk(v, _join(where, str(shown)), depth + 1)})
        return out

    def walk(node: Any, where: str, depth: int) -> Dict[str, Any]:
        if depth > MAX_DEPTH:
            raise _bad(f"nested deeper than {MAX_DEPTH} levels")
        if node is None or type(node) in (bool, int, float, str):
            return {"type": type(node).__name__ if node is not None else "None", "value": node}
        if type(node) is not dict or not node:
            return {"type": "invalid"}
        if "t" in node or "tk" in node:
            return tensor(node, where)
        (tag, body), = list(node.items())[:1]
        kind = _DESCRIBE_TYPES.get(tag, f"unknown {tag!r}")
        if tag == "oda" and isinstance(body, list) and len(body) == 2:
            return {"type": kind, "items": items(body[0], where, depth),
                    "attributes": items(body[1], where, depth)}
        if tag in ("d", "od", "ns", "counter"):
            return {"type": kind, "items": items(body, where, depth)}
        if tag == "dd" and isinstance(body, list) and len(body) == 2:
            return {"type": kind, "default_factory": body[0], "items": items(body[1], where, depth)}
        if tag in ("l", "tu", "set", "fset") and isinstance(body, list):
            return {"type": kind, "items": [walk(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(body)]}
        if tag == "obj" and isinstance(body, dict):
            out: Dict[str, Any] = {"type": "object", "class": str(body.get("new", body.get("call"))).replace(":", ".")}
            for field in ("args", "list"):
                if isinstance(body.get(field), list):
                    out[field] = [walk(v, where, depth + 1) for v in body[field]]
            if "state" in body:
                out["state"] = walk(body["state"], where, depth + 1)
            for field in ("dict", "kwargs"):
                if field in body:
                    out[field] = items(body[field], where, depth)
            return out
        if tag == "ref":
            return {"type": kind, "name": str(body).replace(":", ".")}
        if tag == "nd" and isinstance(body, list) and len(body) == 2 and isinstance(body[1], dict):
            return {"type": kind, "numpy_dtype": body[0], "data": tensor(body[1], where)}
        if tag in ("b", "ba") and isinstance(body, dict):
            return {"type": kind, "data": tensor(body, where)}
        return {"type": kind, "value": body}

    try:
        root = walk(doc["root"], "", 0)
    except RecursionError:
        raise _bad("nested too deeply") from None
    ties = {name: where for name, where in refs.items() if len(where) > 1}
    return {"version": doc.get("version"), "root": root, "ties": ties}


def tree_lines(tree: Dict[str, Any], *, limit: int = 2000) -> List[str]:
    """The tree :func:`describe` returns, as indented text lines (at most ``limit``)."""
    lines: List[str] = []

    def brief(node: Dict[str, Any]) -> str:
        kind = node.get("type")
        if kind == "tensor" and node.get("kind") == "tsub":
            return _brief_tsub(node)
        if kind == "tensor":
            if "name" in node:
                shape = "[" + ", ".join(map(str, node.get("shape") or [])) + "]"
                flags = "".join([" parameter" if node.get("parameter") else "",
                                 " requires_grad" if node.get("requires_grad") else ""])
                return f"tensor {node.get('dtype')} {shape}{flags}  ({node['name']})"
            return f"tensor ({node.get('kind')})"
        if kind == "object":
            return f"object {node.get('class')}"
        if kind == "reference":
            return f"reference to {node.get('name')}"
        if "items" in node:
            count = len(node["items"])
            return f"{kind} ({count} item{'' if count == 1 else 's'})"
        if kind == "None":
            return "None"
        if "value" in node:
            return f"{kind} {json.dumps(node['value'], ensure_ascii=False)[:120]}"
        return str(kind)

    def emit(label: str, node: Dict[str, Any], indent: int) -> None:
        if len(lines) >= limit:
            return
        lines.append("  " * indent + (f"{label}: " if label else "") + brief(node))
        for i, item in enumerate(node.get("items", [])):
            if "key" in item:
                key = item["key"]
                text = key if isinstance(key, str) else str(key) if isinstance(key, int) else brief(key)
                emit(str(text), item["value"], indent + 1)
            else:
                emit(f"[{i}]", item, indent + 1)
        for field in ("args", "list"):
            for i, item in enumerate(node.get(field, [])):
                emit(f"{field}[{i}]", item, indent + 1)
        if isinstance(node.get("state"), dict):
            emit("state", node["state"], indent + 1)
        for field in ("dict", "kwargs"):
            for item in node.get(field, []):
                emit(str(item["key"]), item["value"], indent + 1)
        for k, v in (node.get("inner") or {}).items() if node.get("kind") == "tsub" else ():
            emit(k, v, indent + 1)
        if node.get("type") == "tensor" and "name" not in node:
            for k, v in node.items():
                if isinstance(v, dict) and v.get("type") == "tensor":
                    emit(k, v, indent + 1)
                elif k == "parts" and isinstance(v, list):
                    for i, p in enumerate(v):
                        emit(f"[{i}]", p, indent + 1)
        if "data" in node and node.get("type") != "tensor":
            emit("data", node["data"], indent + 1)

    emit("", tree["root"], 0)
    if len(lines) >= limit:
        lines.append(f"... (tree cut at {limit} lines; --json gives all of it)")
    for name, where in sorted(tree.get("ties", {}).items()):
        lines.append(f"tie: {name} is referenced at {', '.join(w or '<root>' for w in where)}")
    return lines
