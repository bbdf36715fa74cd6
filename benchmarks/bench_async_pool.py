"""async_save's snapshot pool over 12 saves whose header grows a little each time (a
step counter in the metadata, as training loops write): the idle bytes the pool holds
after each save, and the process RSS, as multiples of the model's size (issue 22, section 5).

    python benchmarks/bench_async_pool.py [--mib 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch_safetensors  # noqa: E402
from torch_safetensors import _async  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    a = ap.parse_args()
    model = {f"layer{i}.weight": torch.randn(a.mib * (1 << 20) // 4 // 8) for i in range(8)}
    size = sum(t.numel() * t.element_size() for t in model.values())
    base = rss()
    top_idle = top_rss = 0
    with tempfile.TemporaryDirectory() as d:
        print(f"{'save':>4} {'idle/model':>10} {'rss+/model':>10}")
        for step in range(12):
            meta = {"step": "x" * (step * 37 + 1)}  # the header grows by a few bytes per save
            torch_safetensors.async_save(model, os.path.join(d, "ckpt.safetensors"), metadata=meta).result()
            idle = _async._pool.idle_bytes()
            grown = rss() - base
            top_idle, top_rss = max(top_idle, idle), max(top_rss, grown)
            print(f"{step + 1:>4} {idle / size:>10.2f} {grown / size:>10.2f}")
    print(f"max idle pool: {top_idle / size:.2f}x the model; max RSS growth: {top_rss / size:.2f}x")
    torch_safetensors.release_async_buffers()


if __name__ == "__main__":
    main()
