"""Which objects a safetensors checkpoint holds, and under which names."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

import torch


def _refuse(path: str, value: Any) -> TypeError:
    kind = type(value).__name__
    hint = ""
    if type(value).__module__ == "numpy":
        hint = " (convert arrays with torch.from_numpy)"
    where = path if path else "the object"
    return TypeError(
        f"{where}: {kind} cannot be saved in safetensors format, which holds only tensors{hint}"
    )


def flatten(obj: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Splits obj into named tensors and header metadata describing the rest.

    Raises:
        TypeError: naming the key path and type of the first value that cannot be
            saved; raised before anything is written.
    """
    if not isinstance(obj, Mapping):
        raise _refuse("", obj)
    tensors: Dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise TypeError(f"key {key!r}: tensor names must be str, not {type(key).__name__}")
        if not isinstance(value, torch.Tensor):
            raise _refuse(key, value)
        tensors[key] = value
    return tensors, {}


def unflatten(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]]) -> Any:
    """Rebuilds what flatten split, from a file's tensors and metadata."""
    return tensors
