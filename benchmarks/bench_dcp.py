"""torch.distributed.checkpoint save/load: SafetensorsWriter/Reader against torch's own
FileSystemWriter/Reader and HuggingFaceStorageWriter/Reader, on one 2-rank state.

Run:  python benchmarks/bench_dcp.py [--mib 512] [--repeat 3] [--no-sync] [--dir DIR]

Two gloo ranks on CPU (spawned by this script) hold DTensors sharded on dim 0 (half
fp32, half bf16 by bytes) plus a few replicated tensors. Each timing is
the wall time between two barriers, so it is the slower rank's time. "load" reads
back with the same placement, "reshard" loads into DTensors sharded on dim 1. Loads
run with a warm page cache (the files were just written): they measure the storage
layer, not the disk. Prints medians and each backend's time divided by ours.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

import torch

WORLD = 2


def _state(mib: int, mesh: Any, dim: int, zeros: bool) -> Dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    n_big = 8  # tensors per dtype
    per_tensor = mib * 2**20 // (2 * n_big)  # bytes: half fp32, half bf16
    g = torch.Generator().manual_seed(0)
    state: Dict[str, Any] = {}
    for dtype in (torch.float32, torch.bfloat16):
        cols = 1024
        rows = per_tensor // (cols * torch.empty((), dtype=dtype).element_size())
        for i in range(n_big):
            name = f"layers.{i}.{'w32' if dtype == torch.float32 else 'w16'}"
            full = torch.zeros(rows, cols, dtype=dtype) if zeros else torch.randn(rows, cols, generator=g).to(dtype)
            state[name] = distribute_tensor(full, mesh, [Shard(dim)])
    for i in range(4):
        t = torch.zeros(1024) if zeros else torch.randn(1024, generator=g)
        state[f"norm.{i}"] = distribute_tensor(t, mesh, [Replicate()])
    # tensors only: torch's HuggingFaceStorageWriter writes a file its own reader
    # refuses ("header too large") when the state holds a non-tensor value
    return state


def _backends(directory: str, sync: bool) -> Dict[str, Dict[str, Callable[[], Any]]]:
    import torch.distributed.checkpoint as dcp

    from torch_safetensors.distributed import SafetensorsReader, SafetensorsWriter

    def hf_writer() -> Any:
        w = dcp.HuggingFaceStorageWriter(directory, save_distributed=True)
        w.sync_files = sync
        return w

    return {
        "torch_safetensors": {
            "writer": lambda: SafetensorsWriter(directory, sync_files=sync),
            "reader": lambda: SafetensorsReader(directory),
        },
        "FileSystem (torch)": {
            "writer": lambda: dcp.FileSystemWriter(directory, sync_files=sync),
            "reader": lambda: dcp.FileSystemReader(directory),
        },
        "HuggingFace (torch)": {
            "writer": hf_writer,
            "reader": lambda: dcp.HuggingFaceStorageReader(directory),
        },
    }


def _rank_main(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (WORLD,))
    source = _state(args.mib, mesh, 0, zeros=False)
    check = source["layers.0.w16"].full_tensor()
    results: Dict[str, Dict[str, List[float]]] = {}

    def timed(fn: Callable[[], Any]) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    backends = _backends(args.dir, args.sync)
    failed: Dict[str, str] = {}
    for name in backends:
        results[name] = {"save": [], "load": [], "reshard": []}
    # interleaved (one run of every backend per round): load on the machine hits all alike
    for _ in range(args.repeat):
        for name, backend in backends.items():
            if name in failed:
                continue
            times = results[name]
            try:
                if rank == 0:
                    shutil.rmtree(args.dir, ignore_errors=True)
                dist.barrier()
                times["save"].append(timed(lambda: dcp.save(source, storage_writer=backend["writer"]())))
                for kind, dim in (("load", 0), ("reshard", 1)):
                    target = _state(args.mib, mesh, dim, zeros=True)
                    times[kind].append(timed(lambda: dcp.load(target, storage_reader=backend["reader"]())))
                    if not torch.equal(target["layers.0.w16"].full_tensor(), check):
                        raise AssertionError(f"{name}: {kind} read back different values")
                    del target
            except (Exception, dcp.api.CheckpointException) as e:  # reported, not fatal
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if rank == 0:
                    print(f"{name}: failed: {failed[name]}", flush=True)
    for name in failed:
        del results[name]
    if rank == 0:
        shutil.rmtree(args.dir, ignore_errors=True)
        _report(results, args)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _report(results: Dict[str, Dict[str, List[float]]], args: argparse.Namespace) -> None:
    ours = results.get("torch_safetensors")
    print(f"\n2 gloo ranks, {args.mib} MiB of DTensors (fp32 + bf16, Shard(0)), "
          f"sync_files={args.sync}, median of {args.repeat}; ratio = time / torch_safetensors' time")
    print(f"{'backend':22s}{'save s':>9s}{'ratio':>7s}{'load s':>9s}{'ratio':>7s}{'reshard s':>11s}{'ratio':>7s}")
    for name, times in results.items():
        row = f"{name:22s}"
        for kind, width in (("save", 9), ("load", 9), ("reshard", 11)):
            m = statistics.median(times[kind])
            ratio = m / statistics.median(ours[kind]) if ours else float("nan")
            row += f"{m:{width}.3f}{ratio:6.2f}x"
        print(row)
    gib = args.mib / 1024
    if ours:
        print(f"torch_safetensors: save {gib / statistics.median(ours['save']):.2f} GiB/s, "
              f"load {gib / statistics.median(ours['load']):.2f} GiB/s")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512, help="total state size in MiB (default 512)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (default 3)")
    p.add_argument("--no-sync", dest="sync", action="store_false", help="do not fsync (all backends)")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a new temp dir)")
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_worker:
        return _rank_main(args)
    created = args.dir is None
    if created:
        args.dir = os.path.join(tempfile.mkdtemp(prefix="bench_dcp_"), "ckpt")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(WORLD), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--rank-worker", "--mib", str(args.mib),
           "--repeat", str(args.repeat), "--dir", args.dir] + ([] if args.sync else ["--no-sync"])
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r))) for r in range(WORLD)]
    codes = [proc.wait() for proc in procs]
    if created:
        shutil.rmtree(os.path.dirname(args.dir), ignore_errors=True)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
