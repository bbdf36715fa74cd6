"""Legacy torch checkpoints: our C reader vs plain torch.load(weights_only=True), one run.

    python benchmarks/bench_legacy.py            # 20,000 small tensors; a 768 MiB checkpoint
    python benchmarks/bench_legacy.py --quick    # 2,000 small tensors; a 64 MiB checkpoint
    python benchmarks/bench_legacy.py --fresh    # the first load in a fresh process (issue 19)
    python benchmarks/bench_legacy.py --plan-memory   # the engine's memory per pickle byte
    python benchmarks/bench_legacy.py --fileobj  # io.BytesIO sources through the C reader

Workloads (issue 15, point 3), each in the zip format and the pre-1.6 format:
  small  20,000 tensors of 16 float32 values (a state dict of many small layers);
  large  8 float32 tensors of size/8 each, loaded and touched (every tensor summed).
Alternatives, in the same process, interleaved, median of --repeat runs after a warm-up:
  torch     plain torch.load(weights_only=True) (the wrapper uninstalled);
  ours      torch.load through torch_safetensors (the C reader);
each with mmap=False and mmap=True (plain torch refuses mmap for pre-1.6 files: "-").
Targets: small <= 0.10x torch, large <= 1.00x torch, in both mmap modes.

--fresh: 20,000 tensors of 1 KiB (zip), each load the first one of a fresh process
(`import torch, torch_safetensors` done, then one timed torch.load), alternating plain
torch and ours, median of --repeat processes per side, in CPU time (process_time, one
thread: the figure holds on a shared machine); target <= 0.05x torch. The import
of torch_safetensors is reported apart (a process pays it once, whatever it loads).
--plan-memory: peak memory (VmHWM after clear_refs) of loading a data.pkl of 8 MiB of one
opcode, over its size, ours vs plain torch, each in a fresh process.
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


_FRESH = r"""
import sys, time
t0 = time.perf_counter()
import torch
which, path, mmap = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
t1 = time.process_time()
if which == "ours":
    import torch_safetensors
    from torch_safetensors import _legacy
    load = torch.load
else:
    sys.path.insert(0, sys.argv[4])
    from torch_safetensors import _torch  # noqa: the original, without the wrapper
    load = _torch._orig_load
t2 = time.process_time()  # CPU time: the machine is shared, wall time is noise
r = load(path, mmap=mmap, weights_only=True)
t3 = time.process_time()
if which == "ours" and _legacy.last_fallback is not None:
    raise SystemExit("fell back: " + _legacy.last_fallback)
print(t2 - t1 if which == "ours" else 0.0, t3 - t2)
"""


def fresh(repeat: int, d: str) -> None:
    """The first load of a fresh process, ours vs plain torch."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(d, "fresh.pt")
    torch.save({f"layers.{i}.weight": torch.randn(256) for i in range(20000)}, path)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(which: str, mmap: bool) -> tuple:
        out = subprocess.run([sys.executable, "-c", _FRESH, which, path, "1" if mmap else "0", root],
                             capture_output=True, text=True, env=env, check=True).stdout.split()
        return float(out[0]), float(out[1])

    print("| mmap | torch (first load) | ours (first load) | ratio | target | import torch_safetensors |")
    print("|---|---|---|---|---|---|")
    for mmap in (False, True):
        theirs, ours, imports = [], [], []
        for i in range(repeat):
            for which in (("torch", "ours") if i % 2 == 0 else ("ours", "torch")):
                imp, t = run(which, mmap)
                (theirs if which == "torch" else ours).append(t)
                if which == "ours":
                    imports.append(imp)
        t, o = statistics.median(theirs), statistics.median(ours)
        ok = "met" if o / t <= 0.05 else "**not met**"
        print(f"| {mmap} | {t:.4f} s | {o:.4f} s | {o / t:.3f} | <= 0.05 ({ok}) | "
              f"{statistics.median(imports):.4f} s |", flush=True)
    print(f"\n20000 x 1 KiB float32, zip; median of {repeat} fresh processes per side; torch {torch.__version__}")


_MEM = r"""
import sys, warnings
import torch
which, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if which == "ours":
    import torch_safetensors
    from torch_safetensors import _legacy
    load = torch.load
else:
    sys.path.insert(0, sys.argv[4])
    from torch_safetensors import _torch
    load = _torch._orig_load
def status(k):
    for line in open("/proc/self/status"):
        if line.startswith(k):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to VmRSS
base = status("VmRSS:")
warnings.simplefilter("ignore")
r = load(path, weights_only=True)
if which == "ours" and _legacy.last_fallback is not None:
    raise SystemExit("fell back: " + _legacy.last_fallback)
print((status("VmHWM:") - base) / size)
"""


def plan_memory(d: str) -> None:
    """Peak memory per pickle byte of one-opcode pickles of 8 MiB, ours vs plain torch."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "fuzz"))
    from gen_pickle import torch_records, zip_bytes

    n = 8 << 20
    print("| data.pkl of 8 MiB of | ours | torch |")
    print("|---|---|---|")
    for name, body in (("NONE", b"N" * n), ("EMPTY_TUPLE", b")" * n), ("BININT1", b"K\x07" * (n // 2)),
                       ("EMPTY_LIST", b"]" * n), ("EMPTY_DICT", b"}" * n)):
        path = os.path.join(d, "mem.pt")
        with open(path, "wb") as f:
            f.write(zip_bytes(torch_records(b"archive/", b"\x80\x02" + body + b".", [])))
        got = []
        for which in ("ours", "torch"):
            out = subprocess.run([sys.executable, "-c", _MEM, which, path, str(n), root], capture_output=True,
                                 text=True, check=True).stdout
            got.append(float(out))
        print(f"| {name} | {got[0]:.1f}x | {got[1]:.1f}x |", flush=True)


def fileobj(repeat: int, large_mib: int) -> None:
    """io.BytesIO of the small and large zip workloads: _legacy.load_fileobj (what the
    loader calls for seekable file objects) vs plain torch.load on the same object."""
    import inspect
    import io

    bound = inspect.signature(torch.load).bind(None, weights_only=True)
    n = large_mib * 2**20 // 4 // 8
    print("| workload | torch.load(BytesIO) | ours | ratio |")
    print("|---|---|---|---|")
    for name, sd in (("small", {f"layers.{i}.weight": torch.randn(256) for i in range(20000)}),
                     ("large", {f"block.{i}.weight": torch.randn(n) for i in range(8)})):
        buf = io.BytesIO()
        torch.save(sd, buf)
        data = buf.getvalue()
        del sd, buf

        def theirs() -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _torch._orig_load(io.BytesIO(data), weights_only=True)

        def ours() -> Any:
            out = _legacy.load_fileobj(io.BytesIO(data), bound, lambda: None)
            if _legacy.last_fallback is not None:
                raise RuntimeError(_legacy.last_fallback)
            return out

        t, o = timed_pair(theirs, ours, repeat)
        tm, om = statistics.median(t), statistics.median(o)
        print(f"| {name} | {tm:.4f} s | {om:.4f} s | {om / tm:.3f} |", flush=True)
    print(f"\nsmall: 20000 x 1 KiB; large: 8 x {large_mib // 8} MiB float32; zip; median of {repeat}, warm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--fresh", action="store_true", help="only the first load of fresh processes")
    ap.add_argument("--plan-memory", action="store_true", help="only the engine's memory per pickle byte")
    ap.add_argument("--fileobj", action="store_true", help="only io.BytesIO sources")
    args = ap.parse_args()
    if args.fileobj:
        torch.set_num_threads(1)
        fileobj(args.repeat or 3, 64 if args.quick else 512)
        return
    if args.fresh or args.plan_memory:
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            if args.plan_memory:
                plan_memory(d)
            if args.fresh:
                fresh(args.repeat or 7, d)
        return
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
