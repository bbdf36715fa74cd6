"""What a hostile whole-checkpoint structure can make the decoder spend (issue 22, section 3).

Each case is a small file whose structure refers to its stored tensors many times, in the
node kinds that copy or validate data: bytearray, byte-swapped numpy arrays, quantized and
nested tensors (memory), sparse tensors (CPU: invariant checks). Each load runs in its own
process; the table gives the file size, the structure text, the peak memory the load added
(its growth factor over the file), the CPU seconds, the CPU seconds per MB of structure, and
how the load ended (loaded, or refused by the budget). A legitimate large structure (a dict
of 200,000 small values) shows the linear-time figure for ordinary files.

    python benchmarks/bench_hostile_structure.py [--refs 128]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torch_safetensors import _api, _checkpoint  # noqa: E402

MIB = 1 << 20


def _write(path: str, tensors: dict, root: object) -> None:
    doc = {"version": _checkpoint.STRUCTURE_VERSION, "root": root}
    _api.save_file(tensors, path, metadata={_checkpoint.STRUCTURE_KEY: json.dumps(doc, separators=(",", ":"))})


def cases(refs: int, work: str) -> list:
    out = []
    u8 = torch.zeros(2 * MIB, dtype=torch.uint8)
    i32 = torch.zeros(MIB // 2, dtype=torch.int32)

    def add(name: str, tensors: dict, items: list) -> None:
        path = os.path.join(work, name + ".safetensors")
        _write(path, tensors, {"l": items})
        out.append((name, path))

    # every reference a distinct object ("o": i): each may cost a copy of the 2 MiB tensor
    add("bytearray x refs", {"x": u8}, [{"ba": {"t": "x", "o": i}} for i in range(refs)])
    add("bytes x refs (same)", {"x": u8}, [{"b": {"t": "x", "same": 1}} for _ in range(refs)])
    add("numpy >i4 x refs", {"x": i32}, [{"nd": [">i4", {"t": "x", "o": i}]} for i in range(refs)])
    add("quantized x refs", {"x": u8}, [{"tk": "quant", "dtype": "quint8", "scheme": "per_tensor_affine",
                                         "int": {"t": "x", "o": i}, "scale": 0.5, "zero_point": 0}
                                        for i in range(refs)])
    add("nested x refs", {"x": u8}, [{"tk": "nested", "layout": "strided", "parts": [{"t": "x", "o": i}]}
                                     for i in range(refs)])
    # CPU: one large sparse tensor's invariants, checked per referring node
    nnz = 1 << 20
    sp = {"i": torch.arange(nnz, dtype=torch.int64).reshape(1, nnz), "v": torch.ones(nnz)}
    add("sparse_coo x refs", sp, [{"tk": "sparse_coo", "size": [nnz + i], "coalesced": bool(i % 2),
                                   "indices": {"t": "i", "o": i}, "values": {"t": "v", "o": i}}
                                  for i in range(refs)])
    csr = torch.ones(1024, 1024).to_sparse_csr()
    cs = {"c": csr.crow_indices(), "p": csr.col_indices(), "v": csr.values()}
    add("sparse_csr x refs", cs, [{"tk": "sparse_compressed", "layout": "sparse_csr", "size": [1024, 1024 + i],
                                   "compressed": {"t": "c", "o": i}, "plain": {"t": "p", "o": i},
                                   "values": {"t": "v", "o": i}} for i in range(refs)])
    # a legitimate, large structure: time per MB for ordinary files
    path = os.path.join(work, "legit 200k values.safetensors")
    _write(path, {"w": torch.ones(4)}, {"d": {f"k{i}": {"l": [i, f"v{i}", 0.5, None]} for i in range(200_000)}})
    out.append(("legit 200k values", path))
    return out


def _child(path: str) -> None:
    import time

    import torch_safetensors  # noqa: F401

    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    rss0 = top = rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal top
        while not done.is_set():
            top = max(top, rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    c0 = time.process_time()
    try:
        obj = torch.load(path)
        outcome = "loaded"
    except Exception as e:  # noqa: BLE001 - reported
        obj = None
        outcome = f"refused: {type(e).__name__}: {str(e)[:70]}"
    cpu = time.process_time() - c0
    top = max(top, rss())
    done.set()
    sampler.join()
    print(json.dumps({"peak_growth": top - rss0, "cpu": cpu, "outcome": outcome}))
    del obj


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refs", type=int, default=128)
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        _child(a.child)
        return
    with tempfile.TemporaryDirectory() as work:
        rows = []
        for name, path in cases(a.refs, work):
            size = os.path.getsize(path)
            from torch_safetensors import _C

            r = _C.Reader(path=path)
            text = (r.metadata() or {})[_checkpoint.STRUCTURE_KEY]
            r.close()
            p = subprocess.run([sys.executable, __file__, "--child", path], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=ROOT))
            if p.returncode:
                rows.append((name, size, len(text), None, None, f"crashed: {p.stderr.strip()[-80:]}"))
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append((name, size, len(text), r["peak_growth"], r["cpu"], r["outcome"]))
    print(f"{'case':24} {'file':>9} {'struct':>9} {'peak +MiB':>9} {'x file':>7} {'cpu s':>6} {'s/MB':>7}  outcome")
    for name, size, text, grow, cpu, outcome in rows:
        if grow is None:
            print(f"{name:24} {size / MIB:8.2f}M {text / 1e3:8.1f}K {'-':>9} {'-':>7} {'-':>6} {'-':>7}  {outcome}")
            continue
        print(f"{name:24} {size / MIB:8.2f}M {text / 1e3:8.1f}K {grow / MIB:9.1f} {grow / size:7.1f} "
              f"{cpu:6.2f} {cpu / (text / 1e6):7.2f}  {outcome}")


if __name__ == "__main__":
    main()
