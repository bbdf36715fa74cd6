"""Legacy torch checkpoints: our C reader vs plain torch.load(weights_only=True), one run.

    python benchmarks/bench_legacy.py            # 20,000 small tensors; a 768 MiB checkpoint
    python benchmarks/bench_legacy.py --quick    # 2,000 small tensors; a 64 MiB checkpoint

Workloads (issue 15, point 3), each in the zip format and the pre-1.6 format:
  small  20,000 tensors of 16 float32 values (a state dict of many small layers);
  large  8 float32 tensors of size/8 each, loaded and touched (every tensor summed).
Alternatives, in the same process, interleaved, median of --repeat runs after a warm-up:
  torch     plain torch.load(weights_only=True) (the wrapper uninstalled);
  ours      torch.load through torch_safetensors (the C reader);
each with mmap=False and mmap=True (plain torch refuses mmap for pre-1.6 files: "-").
Targets: small <= 0.10x torch, large <= 1.00x torch, in both mmap modes.
The page cache is warm (the files were just written and read): this measures parsing and
building, not the disk.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_safetensors  # noqa: E402
from torch_safetensors import _legacy, _torch  # noqa: E402


def plain_load(path: str, mmap: bool) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _torch._orig_load(path, weights_only=True, mmap=mmap)


def ours_load(path: str, mmap: bool) -> Any:
    out = torch.load(path, mmap=mmap)
    if _legacy.last_fallback is not None:
        raise RuntimeError(f"the C reader fell back to torch: {_legacy.last_fallback}")
    return out


def touch(obj: Dict[str, torch.Tensor]) -> float:
    return float(sum(float(t.sum()) for t in obj.values()))


def timed_pair(a: Callable[[], Any], b: Callable[[], Any], repeat: int):
    """Median-ready samples of a and b, alternating (a b, b a, ...) so that drift in the
    machine's load hits both alike. a's samples are None when a refuses the file."""
    try:
        a()  # warm-up (and: does it work at all?)
    except RuntimeError:
        a = None  # type: ignore[assignment]
    b()
    sa: List[float] = []
    sb: List[float] = []
    for i in range(repeat):
        order = [(a, sa), (b, sb)] if i % 2 == 0 else [(b, sb), (a, sa)]
        for fn, out in order:
            if fn is None:
                continue
            gc.collect()
            t0 = time.perf_counter()
            res = fn()
            out.append(time.perf_counter() - t0)
            del res
    return (sa or None), sb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    args = ap.parse_args()
    count = 2000 if args.quick else 20000
    large_mib = 64 if args.quick else 768
    repeat = args.repeat or (3 if args.quick else 5)
    torch.set_num_threads(1)

    small = {f"layers.{i}.weight": torch.randn(16) for i in range(count)}
    n = large_mib * 2**20 // 4 // 8
    large = {f"block.{i}.weight": torch.randn(n) for i in range(8)}
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for fmt, zipped in (("zip", True), ("pre-1.6", False)):
            for name, sd, load_touch in (("small", small, False), ("large", large, True)):
                path = os.path.join(d, f"{name}-{fmt}.pt")
                torch.save(sd, path, _use_new_zipfile_serialization=zipped)
                for mmap in (False, True):
                    if load_touch:
                        t_fn = lambda: touch(plain_load(path, mmap))  # noqa: E731
                        o_fn = lambda: touch(ours_load(path, mmap))  # noqa: E731
                    else:
                        t_fn = lambda: plain_load(path, mmap)  # noqa: E731
                        o_fn = lambda: ours_load(path, mmap)  # noqa: E731
                    theirs, ours = timed_pair(t_fn, o_fn, repeat)
                    rows.append((fmt, name, mmap, theirs, ours))
                    t = statistics.median(theirs) if theirs else None
                    o = statistics.median(ours)
                    print(f"{fmt:8} {name:6} mmap={str(mmap):5}  torch {t if t is None else f'{t:8.4f}s'}  "
                          f"ours {o:8.4f}s  ratio {'-' if t is None else f'{o / t:.3f}'}", flush=True)
                os.remove(path)
    print()
    print("| format | workload | mmap | torch.load(weights_only=True) | ours | ratio | target | |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt, name, mmap, theirs, ours in rows:
        o = statistics.median(ours)
        target = 0.10 if name == "small" else 1.00
        if theirs is None:
            print(f"| {fmt} | {name} | {mmap} | refused | {o:.4f} s | - | - | |")
            continue
        t = statistics.median(theirs)
        ok = "met" if o / t <= target else "**not met**"
        print(f"| {fmt} | {name} | {mmap} | {t:.4f} s | {o:.4f} s | {o / t:.3f} | <= {target:.2f} | {ok} |")
    print(f"\n{count} small tensors; large: 8 x {large_mib // 8} MiB float32, loaded and summed; "
          f"median of {repeat}; torch {torch.__version__}, 1 thread")


if __name__ == "__main__":
    main()
