"""The load path's own overhead: torch.load of safetensors, per call, in-process.

What is timed is everything torch.load does around the C reader: argument binding,
deciding what ``f`` is (``_source.resolve``), the loader, rebuilding the dict. Two
workloads: 1 tensor (the overhead alone) and 20k tensors of 1 KiB (per-tensor cost),
from a path, an open file and a BytesIO. Best of N calls, so a busy machine inflates
the figures less.

Compare two checkouts in one run (each must have its C extension built in place):

    python benchmarks/bench_load_path.py --checkout OLD_DIR --checkout NEW_DIR
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import io, json, sys, time
import torch
import torch_safetensors  # noqa: F401
path1, path20k, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])

def best(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return min(out)

res = {}
for label, path, n in (("1 tensor", path1, reps * 20), ("20k x 1 KiB", path20k, reps)):
    data = open(path, "rb").read()
    res[label + ", path"] = best(lambda: torch.load(path), n)
    def from_file():
        with open(path, "rb") as f:
            torch.load(f)
    res[label + ", open file"] = best(from_file, n)
    res[label + ", BytesIO"] = best(lambda: torch.load(io.BytesIO(data)), n)
print(json.dumps({"module": torch_safetensors.__file__, "res": res}))
"""


def _make(dirname: str, count: int) -> str:
    import torch

    sd = {f"layer.{i}.weight": torch.full((256,), float(i)) for i in range(count)}
    path = os.path.join(dirname, f"w{count}.safetensors")
    import torch_safetensors  # noqa: F401

    torch.save(sd, path, format="safetensors")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", action="append", default=[],
                    help="a checkout to import torch_safetensors from (repeat to compare); "
                         "default: the installed one")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    checkouts = args.checkout or [""]
    with tempfile.TemporaryDirectory() as d:
        p1, p20k = _make(d, 1), _make(d, 20000)
        results = [None] * len(checkouts)
        # rounds alternate the checkouts, and each keeps its best: a machine busy in one
        # stretch of time inflates every checkout alike
        for _ in range(args.rounds):
            for i, co in enumerate(checkouts):
                env = dict(os.environ)
                if co:
                    env["PYTHONPATH"] = os.path.abspath(co)
                # run from the temporary directory: the current one would shadow PYTHONPATH
                out = subprocess.run([sys.executable, "-c", CHILD, p1, p20k, str(args.reps)], cwd=d,
                                     env=env, capture_output=True, text=True, check=True)
                got = json.loads(out.stdout.strip().splitlines()[-1])
                if results[i] is None:
                    results[i] = got
                else:
                    results[i]["res"] = {k: min(v, results[i]["res"][k]) for k, v in got["res"].items()}
    labels = list(results[0]["res"])
    head = f"{'workload':<26}" + "".join(f"{os.path.basename(os.path.dirname(os.path.dirname(r['module']))) or 'installed':>16}" for r in results)
    if len(results) == 2:
        head += f"{'new/old':>10}"
    print(head)
    for lab in labels:
        row = f"{lab:<26}" + "".join(f"{r['res'][lab] * 1e6:>14.1f}us" for r in results)
        if len(results) == 2:
            row += f"{results[1]['res'][lab] / results[0]['res'][lab]:>10.2f}"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
