"""Connects the C core to the running torch: finds libtorch's C ABI, and builds
tensors through the frombuffer fallback when the C ABI cannot (torch < 2.11, or
when tests force it)."""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, Optional, Tuple

import torch

if sys.byteorder != "little":
    raise ImportError(
        "torch_safetensors supports little-endian hosts only: safetensors stores "
        "little-endian data and this build does not swap bytes"
    )

from . import _C  # noqa: E402

SafetensorError = _C.SafetensorError

# Names as the header writes them -> torch dtypes (None: no torch equivalent here).
DTYPES: Dict[str, Optional[torch.dtype]] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": getattr(torch, "uint16", None),
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": getattr(torch, "uint32", None),
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": getattr(torch, "uint64", None),
    "C64": torch.complex64,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
    "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
    "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    "F4": getattr(torch, "float4_e2m1fn_x2", None),
    "F6_E2M3": None,
    "F6_E3M2": None,
}


def _init() -> Dict[str, Any]:
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    cpu = os.path.join(lib, "libtorch_cpu.so")
    py = os.path.join(lib, "libtorch_python.so")
    aoti = getattr(torch._C, "_aoti", None)
    return _C.init(
        cpu,
        py if os.path.exists(py) else None,
        getattr(aoti, "alloc_tensors_by_stealing_from_void_ptrs", None),
        getattr(aoti, "unsafe_alloc_void_ptrs_from_tensors", None),
        torch.Tensor,
    )


FEATURES = _init()


def error(message: str, code: str = "error", tensor: Optional[str] = None) -> SafetensorError:
    """A SafetensorError with the attributes the C core sets: code, tensor, position."""
    exc = SafetensorError(message)
    exc.code = code
    exc.tensor = tensor
    exc.position = None
    return exc


def set_zero_copy(enabled: bool) -> None:
    """Chooses the C zero-copy path (True) or forces the frombuffer fallback (False)."""
    _C.set_zero_copy(bool(enabled))


def zero_copy() -> bool:
    """Whether mapped tensors are built by the C ABI (torch_from_blob)."""
    return bool(_C.zero_copy())


def _torch_shape(dtype_name: str, shape: tuple, name: str) -> list:
    shape = list(shape)
    if dtype_name == "F4":
        if not shape or shape[-1] % 2:
            raise error(
                f"tensor {name!r}: F4 needs an even last dimension to become torch's "
                "float4_e2m1fn_x2 (two values per byte)",
                "shape",
                name,
            )
        shape[-1] //= 2
    return shape


def fallback_tensor(reader: "_C.Reader", name: str, buf: Any) -> torch.Tensor:
    """One tensor over buf (the mapping) with torch.frombuffer: zero-copy when aligned."""
    dtype_name, shape, begin, end = reader.info(name)
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise error(
            f"tensor {name!r}: dtype {dtype_name} has no torch equivalent in this version of torch",
            "dtype",
            name,
        )
    tshape = _torch_shape(dtype_name, shape, name)
    if end == begin:
        return torch.empty(tshape, dtype=dtype)
    if buf is None:
        # not mapped: read the bytes (mmap=False without the C ABI)
        data = bytearray(os.pread(reader.fd, end - begin, begin))
        if len(data) != end - begin:
            raise error(f"tensor {name!r}: the file was truncated while being read", "truncated", name)
        raw = torch.frombuffer(data, dtype=torch.uint8)
    elif isinstance(buf, (bytes, bytearray, memoryview)):
        raw = torch.frombuffer(bytearray(memoryview(buf)[begin:end]), dtype=torch.uint8)
    else:
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=begin)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if raw.data_ptr() % itemsize:
        raw = raw.clone()  # misaligned data crashes some kernels: copy into aligned memory
    return raw.view(dtype).reshape(tshape)


def build(reader: "_C.Reader", names: Optional[list], device: str) -> Dict[str, torch.Tensor]:
    """Tensors for names (all, in file order, when None) on 'cpu' or 'meta'."""
    use_c = FEATURES["aten"] and (device == "meta" or not reader.mapped or zero_copy())
    if use_c:
        return reader.tensors(names, device)
    if names is None:
        names = reader.offset_keys()
    buf = reader.buffer()
    out = {}
    for name in names:
        t = fallback_tensor(reader, name, buf)
        out[name] = t.to("meta") if device == "meta" else t
    return out


def resolve_device(device: Any) -> Tuple[str, Optional[torch.device]]:
    """Where the C core builds tensors ('cpu' or 'meta'), and where they then go."""
    if isinstance(device, int) and not isinstance(device, bool):
        dev = torch.device("cuda", device)  # as safetensors: an int is a CUDA index
    elif isinstance(device, (str, torch.device)):
        dev = torch.device(device)
    else:
        raise TypeError(f"device must be a str, int or torch.device, not {type(device).__name__}")
    if dev.type in ("cpu", "meta"):
        return dev.type, None
    return "cpu", dev


def move(tensors: Dict[str, torch.Tensor], dev: Optional[torch.device]) -> Dict[str, torch.Tensor]:
    """Moves built tensors to dev (None: leave them), one at a time: the CPU tensors are
    views of the mapping, so nothing extra is held."""
    if dev is not None:
        for name in tensors:
            tensors[name] = tensors[name].to(dev)
    return tensors
