"""Command line: ``python -m torch_safetensors demo``."""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
from typing import Callable, List, Optional, Sequence

import torch

import torch_safetensors  # noqa: F401  (wraps torch.save / torch.load)

from . import _torch


class _Marker:
    """A harmless stand-in for a malicious payload: it would create a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _timed(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f} MiB"


def demo(out: Optional[str] = None) -> int:
    """Trains a tiny model, saves and loads it both ways, and shows a refused payload."""
    torch.manual_seed(0)
    work = out or tempfile.mkdtemp(prefix="torch_safetensors_demo_")
    os.makedirs(work, exist_ok=True)
    print(f"torch {torch.__version__}, torch_safetensors {torch_safetensors.__version__}")
    print(f"working in {work}\n")

    # 1. train a tiny model for a few steps
    def make_model() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
            torch.nn.ReLU(), torch.nn.Linear(1024, 10),
        )

    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(512, 256), torch.randint(0, 10, (512,))
    for step in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"1. trained a {sum(p.numel() for p in model.parameters()):,}-parameter MLP "
          f"for 20 steps (loss {loss.item():.3f})")

    # 2. save it as safetensors, through plain torch.save
    st_path = os.path.join(work, "model.pt")  # the name does not matter: content decides
    sd = model.state_dict()
    torch.save(sd, st_path, format="safetensors")
    with open(st_path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        print(f"2. torch.save(..., format='safetensors') wrote {os.path.getsize(st_path):,} bytes; "
              f"header: {f.read(min(header_len, 90)).decode()}...")

    # 3. load it back with plain torch.load and check it is the same model
    loaded = torch.load(st_path)
    fresh = make_model()
    fresh.load_state_dict(loaded)
    same = torch.equal(fresh(x), model(x))
    print(f"3. torch.load read it back zero-copy ({len(loaded)} tensors); "
          f"outputs identical: {same}")

    # 4. a legacy pickle checkpoint still loads, through the weights_only unpickler
    legacy = os.path.join(work, "legacy.pt")
    torch.save({"model": sd, "step": 20}, legacy, format="pickle")
    back = torch.load(legacy)
    print(f"4. legacy checkpoint loaded transparently (weights_only=True): "
          f"step={back['step']}, {len(back['model'])} tensors")

    # 5. a malicious legacy checkpoint is refused and its payload never runs
    marker = os.path.join(work, "PWNED")
    evil = os.path.join(work, "evil.pt")
    torch.save({"weight": torch.zeros(2), "payload": _Marker(marker)}, evil, format="pickle")
    try:
        torch.load(evil)
        refused = False
    except pickle.UnpicklingError as e:
        refused = True
        lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln] or str(e).splitlines()
        reason = lines[0].strip()[:120]
    ran = os.path.exists(marker)
    print(f"5. malicious checkpoint refused: {refused}; payload ran: {ran}")
    if refused:
        print(f"   ({reason})")

    # 6. sizes and timings against pickle
    pk_path = os.path.join(work, "model_pickle.pt")
    t_save_st = _timed(lambda: torch.save(sd, st_path, format="safetensors"))
    t_save_pk = _timed(lambda: torch.save(sd, pk_path))
    t_load_st = _timed(lambda: torch.load(st_path))
    t_load_pk = _timed(lambda: torch.load(pk_path))
    t_load_mm = _timed(lambda: torch.load(pk_path, mmap=True))
    rows = [
        ("file size", _mib(os.path.getsize(st_path)), _mib(os.path.getsize(pk_path))),
        ("save", f"{t_save_st * 1e3:8.2f} ms", f"{t_save_pk * 1e3:8.2f} ms"),
        ("load", f"{t_load_st * 1e3:8.2f} ms", f"{t_load_pk * 1e3:8.2f} ms"),
        ("load (pickle mmap=True)", "", f"{t_load_mm * 1e3:8.2f} ms"),
    ]
    print("\n6. medians of 5 runs      safetensors        pickle")
    for name, a, b in rows:
        print(f"   {name:24s}{a:>13s}{b:>14s}")
    ok = same and refused and not ran
    print("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_safetensors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train, save, load and refuse a payload on a built-in example")
    p.add_argument("--out", help="directory for the demo's files (default: a new temp dir)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.out)
    return 2


if __name__ == "__main__":
    sys.exit(main())
