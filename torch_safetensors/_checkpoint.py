"""Which objects a safetensors checkpoint holds, and under which names.

A checkpoint is any bounded nesting of dict / OrderedDict (str or int keys), list and
tuple, whose leaves are tensors or plain values (None, bool, int, float, str). Tensors
are stored under dotted paths (``model.layers.0.weight``); everything else (the
containers, their key types and order, plain values, which tensors are Parameters or
require grad, and which names are ties of one tensor) goes as JSON under one namespaced
``__metadata__`` key. A flat ``str -> Tensor`` dict of plain, untied tensors needs no
structure, so its file is byte-identical to the ``safetensors`` package's.

Reading trusts nothing: the structure JSON only ever builds dicts, OrderedDicts, lists,
tuples, plain values, tensors from the file and ``nn.Parameter``.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _C
from ._core import SafetensorError, error

STRUCTURE_KEY = "torch_safetensors.structure"
STRUCTURE_VERSION = 1
MAX_DEPTH = 200  # nesting of containers, on save and on load

_Parameter = torch.nn.Parameter
_PLAIN = (type(None), bool, int, float, str)


# ---- refusal ----


def _hint(value: Any) -> str:
    module = type(value).__module__ or ""
    if isinstance(value, torch.Tensor):
        return ""
    if module.startswith("numpy"):
        return " (convert arrays with torch.from_numpy(x) and numpy scalars with .item())"
    if isinstance(value, (set, frozenset)):
        return " (store it as a list or a tuple)"
    if isinstance(value, (bytes, bytearray)):
        return " (store it as a str or as a uint8 tensor: torch.frombuffer(bytearray(b), dtype=torch.uint8))"
    if isinstance(value, dict):
        return " (convert it with dict(x))"
    if isinstance(value, tuple):
        return " (convert it with tuple(x))"
    if isinstance(value, list):
        return " (convert it with list(x))"
    if callable(value):
        return " (code is never stored; save what it computes instead)"
    return ""


def _type_name(value: Any) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _refuse(path: str, value: Any) -> TypeError:
    where = path if path else "the object"
    return TypeError(
        f"{where}: {_type_name(value)} cannot be saved in "
        f"safetensors format, which holds tensors, dict/list/tuple and None, bool, int, "
        f"float, str{_hint(value)}"
    )


def _tensor_problem(path: str, t: torch.Tensor) -> Optional[TypeError]:
    """A clear error for tensors that have no plain dense bytes to store."""
    kind = type(t)
    if kind is not torch.Tensor and kind is not _Parameter:
        name = f"{kind.__module__}.{kind.__qualname__}"
        if "DTensor" in kind.__name__:
            what = "gather it with .full_tensor(), or save it with torch_safetensors.distributed"
        elif "Fake" in kind.__name__ or "Functional" in kind.__name__:
            what = "save real tensors, outside tracing"
        else:
            what = "convert it with .as_subclass(torch.Tensor) if its data is all that matters"
        return TypeError(f"{path}: tensor subclass {name} cannot be saved in safetensors format; {what}")
    if t.is_nested:
        return TypeError(
            f"{path}: nested tensors cannot be saved in safetensors format; save its parts "
            "(.unbind()) or a padded tensor (.to_padded_tensor(0))"
        )
    if t.is_quantized:
        return TypeError(
            f"{path}: quantized tensor ({t.dtype}) cannot be saved in safetensors format; "
            "save .dequantize() or its int_repr() with its scale and zero point"
        )
    if t.layout is not torch.strided:
        return TypeError(
            f"{path}: {t.layout} tensor cannot be saved in safetensors format, which stores "
            "dense tensors; convert it with .to_dense()"
        )
    if t.device.type == "meta":
        return TypeError(
            f"{path}: tensor on the meta device has no data to save; materialize it first "
            "(for example with module.to_empty(device='cpu') and an initializer)"
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


class _Flattener:
    def __init__(self) -> None:
        self.tensors: Dict[str, torch.Tensor] = {}
        self.by_object: Dict[int, str] = {}
        self.by_view: Dict[tuple, str] = {}
        self.keep_alive: List[Any] = []
        self.needs_structure = False

    def tensor(self, path: str, shown: str, t: torch.Tensor) -> Any:
        problem = _tensor_problem(shown, t)
        if problem is not None:
            raise problem
        if not path:
            path = "tensor"
            self.needs_structure = True  # a bare tensor must come back as a tensor
        node: Dict[str, Any] = {"t": path}
        if type(t) is _Parameter:
            node["p"] = 1
            self.needs_structure = True
        if t.requires_grad:
            node["g"] = 1
            self.needs_structure = True
        # ties: the same object, or the same view of the same memory, is stored once
        same = self.by_object.get(id(t))
        if same is None:
            view = view_key(t)
            if view is not None:
                same = self.by_view.setdefault(view, path)
                if same == path:
                    same = None  # the first of its view
        if same is not None:
            node["t"] = same
            if self.by_object.get(id(t)) == same:
                node["same"] = 1  # the very same object
            self.needs_structure = True
            return node
        if path in self.tensors:
            raise ValueError(
                f"{shown}: another tensor is already stored as {path!r} "
                "(keys joined with '.' collide); rename one of the keys"
            )
        self.by_object[id(t)] = path
        self.keep_alive.append(t)  # ids stay unique while flattening
        self.tensors[path] = t
        return node

    def value(self, path: str, shown: str, v: Any, depth: int) -> Any:
        """path: the dotted name tensors are stored under; shown: the path in messages."""
        if depth > MAX_DEPTH:
            raise ValueError(f"{shown}: nested deeper than {MAX_DEPTH} levels")
        kind = type(v)
        if isinstance(v, torch.Tensor):
            return self.tensor(path, shown, v)
        if kind in _PLAIN:
            self.needs_structure = True
            if kind is float and not math.isfinite(v):
                return {"f": "nan" if v != v else ("inf" if v > 0 else "-inf")}
            return v
        if kind is dict or kind is OrderedDict:
            # a top-level dict of tensors needs no structure; anything deeper does
            self.needs_structure = self.needs_structure or depth > 0
            items = []
            for k, item in v.items():
                part = _key_text(k, shown)
                if type(k) is int:
                    self.needs_structure = True
                    sub_shown = f"{shown}[{k}]"
                else:
                    sub_shown = _join(shown, k)
                items.append([k, self.value(_join(path, part), sub_shown, item, depth + 1)])
            return {"d" if kind is dict else "od": items}
        if kind is list or kind is tuple:
            self.needs_structure = True
            nodes = [
                self.value(_join(path, str(i)), f"{shown}[{i}]", item, depth + 1)
                for i, item in enumerate(v)
            ]
            return {"l" if kind is list else "tu": nodes}
        raise _refuse(shown, v)


def flatten(obj: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Splits obj into named tensors and the header metadata that describes the rest.

    Returns:
        (tensors by dotted path, extra ``__metadata__`` entries: none for a flat dict of
        plain untied tensors, else the structure JSON under ``STRUCTURE_KEY``).

    Raises:
        TypeError: naming the key path and type of the first value that cannot be saved.
        ValueError: nesting too deep, or two keys whose dotted paths collide.
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
    if _C.plain_flat(obj):
        return obj, {}, True
    tensors, meta = flatten(obj)
    return tensors, meta, False


def explain(obj: Any) -> None:
    """Raises the precise TypeError for the first tensor of a flat dict that cannot be
    stored (nested, quantized, sparse, meta); returns if there is none."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, torch.Tensor):
                problem = _tensor_problem(str(k), v)
                if problem is not None:
                    raise problem


# ---- unflatten ----


def _bad(msg: str) -> SafetensorError:
    return error(f"invalid {STRUCTURE_KEY} metadata: {msg}", "structure")


class _Builder:
    def __init__(self, tensors: Dict[str, torch.Tensor]):
        self.tensors = tensors
        self.objects: Dict[str, Any] = {}  # stored name -> the object built for it

    def tensor(self, node: Dict[str, Any]) -> Any:
        name = node.get("t")
        if not isinstance(name, str):
            raise _bad("a tensor reference is not a string")
        if name not in self.tensors:
            raise _bad(f"it refers to a tensor {name!r} that the file does not hold")
        if node.get("same") == 1 and name in self.objects:
            return self.objects[name]
        t = self.tensors[name]
        if name in self.objects:
            t = t.detach()  # a tie: another tensor object over the same storage
        grad = node.get("g") == 1
        if grad and not (t.is_floating_point() or t.is_complex()):
            raise _bad(f"tensor {name!r} of dtype {t.dtype} cannot require grad")
        if node.get("p") == 1:
            out: Any = _Parameter(t, requires_grad=grad)
        else:
            out = t.requires_grad_(True) if grad and not t.requires_grad else t
        self.objects.setdefault(name, out)
        return out

    def build(self, node: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise _bad(f"nested deeper than {MAX_DEPTH} levels")
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is list:
            raise _bad("a bare JSON array where a tagged node was expected")
        if type(node) is not dict or len(node) == 0:
            raise _bad("a node is not a tagged JSON object")
        if "t" in node:
            return self.tensor(node)
        if len(node) != 1:
            raise _bad(f"a node has unexpected fields {sorted(node)[:4]}")
        (tag, body), = node.items()
        if tag == "f":
            if body not in ("nan", "inf", "-inf"):
                raise _bad(f"unknown float {body!r}")
            return float(body)
        if not isinstance(body, list):
            raise _bad(f"the body of a {tag!r} node is not a list")
        if tag in ("d", "od"):
            out: Any = {} if tag == "d" else OrderedDict()
            for pair in body:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise _bad("a dict item is not a [key, value] pair")
                k = pair[0]
                if type(k) not in (str, int):
                    raise _bad(f"a dict key of type {type(k).__name__}")
                out[k] = self.build(pair[1], depth + 1)
            return out
        if tag in ("l", "tu"):
            items = [self.build(item, depth + 1) for item in body]
            return items if tag == "l" else tuple(items)
        raise _bad(f"unknown node tag {tag!r}")


def unflatten(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]]) -> Any:
    """Rebuilds what flatten split, from a file's tensors and metadata.

    Without the structure key the tensors dict is returned as it is.

    Raises:
        SafetensorError: the structure metadata is malformed or refers to a tensor that
            the file does not hold.
    """
    text = (metadata or {}).get(STRUCTURE_KEY)
    if text is None:
        return tensors
    try:
        doc = json.loads(text, parse_constant=lambda c: _raise_constant(c))
    except RecursionError:
        raise _bad("nested too deeply") from None
    except ValueError as e:
        if isinstance(e, SafetensorError):
            raise
        raise _bad(f"not JSON ({e})") from None
    version = doc.get("version") if type(doc) is dict else None
    if type(version) is not int or version != STRUCTURE_VERSION or "root" not in doc:
        raise _bad(f"expected an object with version {STRUCTURE_VERSION} and a root")
    return _Builder(tensors).build(doc["root"], 0)


def _raise_constant(c: str) -> Any:
    raise _bad(f"the non-standard JSON constant {c}")
