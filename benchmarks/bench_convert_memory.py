"""Peak memory of ``torch-safetensors convert`` on a legacy checkpoint, side by side
with the obvious alternative (torch.load, then save_file) and an import-only baseline,
for the zip and the pre-1.6 formats. Each runs in its own process, sampled every 5 ms
from /proc/PID/status: VmRSS (everything resident), RssAnon (private memory: what
convert itself allocates) and RssFile (pages of mapped files: the source as the writer
reads it, and the libraries).

    python benchmarks/bench_convert_memory.py [--mib 320]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("VmRSS", "RssAnon", "RssFile")


def peak(cmd: list) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    top = dict.fromkeys(FIELDS, 0)
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in top:
                        top[key] = max(top[key], int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.005)
    if p.returncode:
        raise SystemExit(f"{cmd} failed with {p.returncode}")
    return {k: v / 1024 for k, v in top.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=320, help="checkpoint size (16 MiB tensors)")
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        make = (f"import torch; torch.manual_seed(0); sd={{f'l{{i}}': torch.randn(2048, 2048) "
                f"for i in range({max(1, args.mib // 16)})}}; "
                f"torch.save(sd, '{d}/zip.pt'); torch.save(sd, '{d}/old.pt', _use_new_zipfile_serialization=False)")
        subprocess.run([py, "-c", make], check=True)
        size = os.path.getsize(f"{d}/zip.pt") / 2**20
        rows = [("import torch_safetensors (baseline)", peak([py, "-c", "import torch_safetensors, time; time.sleep(0.3)"]))]
        for fmt in ("zip", "old"):
            src = f"{d}/{fmt}.pt"
            rows.append((f"convert ({fmt})", peak([py, "-m", "torch_safetensors", "convert", src, f"{d}/out.safetensors"])))
            alt = (f"import torch, torch_safetensors as ts; "
                   f"ts.save_file(torch.load('{src}', weights_only=True), '{d}/alt.safetensors')")
            rows.append((f"torch.load + save_file ({fmt})", peak([py, "-c", alt])))
    print(f"checkpoint: {size:.0f} MiB of 16 MiB tensors; peaks in MiB")
    print(f"{'':40s}" + "".join(f"{k:>10s}" for k in FIELDS))
    for name, r in rows:
        print(f"{name:40s}" + "".join(f"{r[k]:10.0f}" for k in FIELDS))


if __name__ == "__main__":
    main()
