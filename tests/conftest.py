"""Shared helpers for the C core's tests: raw file builders, loaders, modes."""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Dict, Optional, Union

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _C, _core

SafetensorError = ts.SafetensorError

# Every dtype the format can hold with a torch equivalent: (torch dtype, header name).
ALL_DTYPES = [
    (torch.bool, "BOOL"),
    (torch.uint8, "U8"),
    (torch.uint16, "U16"),
    (torch.uint32, "U32"),
    (torch.uint64, "U64"),
    (torch.int8, "I8"),
    (torch.int16, "I16"),
    (torch.int32, "I32"),
    (torch.int64, "I64"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.float32, "F32"),
    (torch.float64, "F64"),
    (torch.complex64, "C64"),
    (torch.float8_e4m3fn, "F8_E4M3"),
    (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fnuz, "F8_E4M3FNUZ"),
    (torch.float8_e5m2fnuz, "F8_E5M2FNUZ"),
    (torch.float8_e8m0fnu, "F8_E8M0"),
    (torch.float4_e2m1fn_x2, "F4"),
]
DTYPE_NAME = {dt: name for dt, name in ALL_DTYPES}


# ---- raw file builders ----


def entry(dtype: str, shape, begin: int, end: int) -> Dict[str, Any]:
    """One header entry, as a dict."""
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def header_bytes(header: Union[dict, str, bytes]) -> bytes:
    """A header as bytes: dicts become compact JSON, str is UTF-8 encoded, bytes kept."""
    if isinstance(header, dict):
        return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if isinstance(header, str):
        return header.encode("utf-8")
    return bytes(header)


def make_file(header: Union[dict, str, bytes], data: bytes = b"", *,
              pad_to: Optional[int] = None, length: Optional[int] = None) -> bytes:
    """8-byte little-endian header length + header + data.

    pad_to: pad the header with spaces so 8 + N is a multiple of it.
    length: write this N instead of the real header length.
    """
    h = header_bytes(header)
    if pad_to:
        while (8 + len(h)) % pad_to:
            h += b" "
    n = len(h) if length is None else length
    return struct.pack("<Q", n) + h + bytes(data)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor's values (works for every dtype)."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return b""
    # a contiguous tensor's elements are dense in memory even when a size-1 dimension
    # has an odd stride (t[::2] of one element): read them with unit strides
    flat = t.as_strided((t.numel(),), (1,))
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def random_tensor(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    """A tensor of random bytes viewed as dtype (torch shape)."""
    size = torch.empty((), dtype=dtype).element_size() if dtype != torch.float4_e2m1fn_x2 else 1
    numel = 1
    for d in shape:
        numel *= d
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and bytes."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert tuple(a.shape) == tuple(b.shape), (a.shape, b.shape)
    assert tensor_bytes(a) == tensor_bytes(b)


# ---- loading through each entry point ----


def _via_load(data: bytes, tmp_path) -> Dict[str, torch.Tensor]:
    return ts.load(data)


def _via_load_file(data: bytes, tmp_path) -> Dict[str, torch.Tensor]:
    p = tmp_path / "input.safetensors"
    p.write_bytes(data)
    return ts.load_file(p)


def _via_safe_open(data: bytes, tmp_path) -> Dict[str, torch.Tensor]:
    p = tmp_path / "input.safetensors"
    p.write_bytes(data)
    with ts.safe_open(str(p), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


LOADERS = {"load": _via_load, "load_file": _via_load_file, "safe_open": _via_safe_open}


@pytest.fixture(params=sorted(LOADERS))
def loader(request, tmp_path) -> Callable[[bytes], Dict[str, torch.Tensor]]:
    """Loads raw bytes through load(bytes), load_file(path) or safe_open(path)."""
    fn = LOADERS[request.param]
    return lambda data: fn(data, tmp_path)


@pytest.fixture(params=["zero_copy", "fallback"])
def mode(request):
    """Runs a test with the C zero-copy path, then with the frombuffer fallback."""
    enabled = request.param == "zero_copy"
    _core.set_zero_copy(enabled)
    request.addfinalizer(lambda: _core.set_zero_copy(True))
    assert _core.zero_copy() is enabled
    return request.param


def expect_error(fn: Callable[[], Any], code: Optional[str], fragment: str,
                 tensor: Any = ...) -> SafetensorError:
    """Calls fn, checks it raised SafetensorError with the code, fragment and tensor."""
    with pytest.raises(SafetensorError) as info:
        fn()
    exc = info.value
    assert isinstance(exc, ValueError)
    assert fragment in str(exc), str(exc)
    if code is not None:
        assert exc.code == code, (exc.code, str(exc))
    if tensor is not ...:
        assert exc.tensor == tensor, (exc.tensor, str(exc))
    return exc


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE")


def mapped_paths() -> list:
    """Paths of file mappings in /proc/self/maps."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6:
                out.append(parts[5].strip())
    return out


@pytest.fixture(autouse=True)
def _zero_copy_restored():
    """No test may leave the fallback switched on for the next one."""
    yield
    _core.set_zero_copy(True)



@pytest.fixture(autouse=True)
def _torch_global_state_restored():
    """Frameworks switch torch's global state (Lightning's deterministic=True turns on
    deterministic algorithms, which make torch.empty fill memory and fail for float4):
    no test may leave it changed for the next one."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    default_dtype = torch.get_default_dtype()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_default_dtype(default_dtype)


# ---- training frameworks (tests/test_framework_*.py) ----


def is_safetensors_file(path: Any) -> bool:
    """Whether the file at path holds safetensors, by its bytes (as torch.load decides)."""
    with open(path, "rb") as f:
        data = f.read()
    return _C.sniff(data[:4096], len(data))


@pytest.fixture
def environment_restored():
    """Frameworks set environment variables (ACCELERATE_*, PL_*, ...): none may leak."""
    env = dict(os.environ)
    yield
    for name in set(os.environ) - set(env):
        del os.environ[name]
    os.environ.update(env)


@pytest.fixture
def default_format():
    """ts.set_default_format, with the process default restored afterwards."""
    from torch_safetensors import _default

    saved = (_default._format, _default._fallback)
    yield ts.set_default_format
    _default._format, _default._fallback = saved
