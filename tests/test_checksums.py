"""CRC32C in C (csrc/st_hash.c) and the per-tensor checksums recorded with
checksums=True: known vectors, the SSE4.2 and portable paths against a bitwise
reference, chaining, and what the metadata records."""
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_safetensors as ts
from torch_safetensors import _C, _checksums


def reference_crc32c(data: bytes, value: int = 0) -> int:
    c = value ^ 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


VECTORS = [  # RFC 3720, appendix B.4, and the usual check value
    (b"", 0),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("data,expected", VECTORS)
@pytest.mark.parametrize("portable", [False, True])
def test_known_vectors(data, expected, portable):
    assert _C.crc32c(data, portable=portable) == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 7), st.integers(0, 2**32 - 1))
def test_both_paths_match_the_reference(data, skip, value):
    view = memoryview(data)[min(skip, len(data)):]  # every alignment
    expected = reference_crc32c(bytes(view), value)
    assert _C.crc32c(view, value) == expected
    assert _C.crc32c(view, value, portable=True) == expected


def test_large_buffer_paths_agree():
    data = os.urandom((1 << 20) + 13)
    assert _C.crc32c(data) == _C.crc32c(data, portable=True)


def test_chaining():
    a, b = os.urandom(1000), os.urandom(777)
    assert _C.crc32c(b, _C.crc32c(a)) == _C.crc32c(a + b)


def test_arguments():
    with pytest.raises(ValueError, match="32-bit"):
        _C.crc32c(b"x", 2**32)
    with pytest.raises(TypeError):
        _C.crc32c("text")
    assert _C.crc32c(bytearray(b"123456789")) == 0xE3069283


def test_tensor_crc_covers_the_stored_bytes():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    raw = t.numpy().tobytes()
    assert _checksums.tensor_crc(t) == reference_crc32c(raw)
    # a non-contiguous view is stored as its values, and checksummed the same way
    v = t.t()
    assert _checksums.tensor_crc(v) == reference_crc32c(v.contiguous().numpy().tobytes())
    assert _checksums.tensor_crc(torch.zeros(0)) == 0
    assert _checksums.tensor_crc(torch.zeros(2, device="meta")) is None


@pytest.mark.parametrize("how", ["save_file", "save", "torch.save"])
def test_checksums_recorded_at_save_time(tmp_path, how):
    tensors = {"a": torch.randn(5), "b": torch.arange(6, dtype=torch.int16).reshape(2, 3).t()}
    p = tmp_path / "c.safetensors"
    if how == "save_file":
        ts.save_file(tensors, p, metadata={"x": "y"}, checksums=True)
    elif how == "save":
        p.write_bytes(ts.save(tensors, {"x": "y"}, checksums=True))
    else:
        torch.save(tensors, p, format="safetensors", metadata={"x": "y"}, checksums=True)
    with ts.safe_open(p) as f:
        meta = f.metadata()
        assert meta["x"] == "y"
        doc = json.loads(meta[_checksums.CHECKSUM_KEY])
        assert doc["algorithm"] == "crc32c"
        for name in ("a", "b"):
            _d, _s, begin, end = f._reader.info(name)
            stored = p.read_bytes()[begin:end]
            assert doc["tensors"][name] == f"{reference_crc32c(stored):08x}"


def test_checksums_default_off(tmp_path):
    ts.save_file({"a": torch.ones(1)}, tmp_path / "a.safetensors")
    assert ts.safe_open(tmp_path / "a.safetensors").metadata() is None


def test_checksums_with_pickle_format_refused(tmp_path):
    with pytest.raises(ValueError, match="checksums"):
        torch.save({"a": torch.ones(1)}, tmp_path / "a.pt", checksums=True)


def test_file_crc_truncated(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert _checksums.file_crc(fd, 10, 60, str(p)) == reference_crc32c(b"x" * 50)
        with pytest.raises(ts.SafetensorError, match="ended at byte 100"):
            _checksums.file_crc(fd, 90, 120, str(p))
    finally:
        os.close(fd)
