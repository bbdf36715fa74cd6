"""async_save's snapshot pool stays bounded (issue 22, section 5): one idle buffer at most,
reused by a smaller save, replaced (after being freed) for a larger one; whatever the
sequence of sizes it never holds more than about 1.0x the largest recent save. The
12-saves figure is in benchmarks/bench_async_pool.py."""
from __future__ import annotations

import random

import torch

import torch_safetensors
from torch_safetensors import _async


def _save(path, nbytes, meta_len):
    sd = {"w": torch.zeros(nbytes // 4)}
    torch_safetensors.async_save(sd, path, metadata={"m": "x" * meta_len}).result()
    return nbytes


def test_pool_never_holds_more_than_the_largest_recent_save(tmp_path):
    torch_safetensors.release_async_buffers()
    rng = random.Random(0)
    largest = 0
    try:
        for i in range(12):
            n = _save(tmp_path / "a.safetensors", rng.choice([1, 2, 3, 5]) << 20, rng.randrange(0, 3000))
            largest = max(largest, n)
            assert len(_async._pool._free) <= 1
            assert _async._pool.idle_bytes() <= largest * 1.02 + (1 << 16)
    finally:
        torch_safetensors.release_async_buffers()


def test_a_larger_buffer_is_reused_for_a_smaller_save_and_growing_headers(tmp_path):
    torch_safetensors.release_async_buffers()
    try:
        _save(tmp_path / "a.safetensors", 4 << 20, 10)
        (buf,) = [b for bufs in _async._pool._free.values() for b in bufs]
        ptr = buf.data_ptr()
        del buf
        for meta_len in (1, 50, 500, 5000):  # smaller data, then a header that grows
            _save(tmp_path / "a.safetensors", 3 << 20, meta_len)
            (buf,) = [b for bufs in _async._pool._free.values() for b in bufs]
            assert buf.data_ptr() == ptr
            del buf
        _save(tmp_path / "a.safetensors", 8 << 20, 10)  # larger: a new buffer, the old one freed
        assert len(_async._pool._free) == 1 and _async._pool.idle_bytes() >= 8 << 20
        got = torch.load(tmp_path / "a.safetensors")
        assert got["w"].numel() == (8 << 20) // 4
    finally:
        torch_safetensors.release_async_buffers()
