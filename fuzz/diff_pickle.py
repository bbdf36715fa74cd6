"""Differential fuzzing of the legacy reader against torch's weights_only loader.

    python fuzz/diff_pickle.py SECONDS [SEED]

Mutates torch checkpoints (the zip's data.pkl, the whole zip file, the whole pre-1.6
file) and loads each mutant with our C reader (torch_safetensors._C.legacy_load, both
mmap modes). Whenever our reader accepts a mutant, plain torch.load(weights_only=True)
must accept it too and give an equal result; a mutant our reader hands over to torch
needs no check (torch decides). Prints counts; exits 1 on the first disagreement, saving
the mutant under fuzz/build/diff-artifacts/.
"""
from __future__ import annotations

import io
import os
import random
import sys
import tempfile
import time
import warnings
import zipfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import torch_safetensors  # noqa: E402,F401
from torch_safetensors import _C, _torch  # noqa: E402
from test_legacy_reader import CASES, _mutate, assert_same  # noqa: E402


def seeds() -> list:
    out = []
    for name in ("training", "views", "params", "values", "requires_grad"):
        for zipped in (True, False):
            buf = io.BytesIO()
            torch.save(CASES[name], buf, _use_new_zipfile_serialization=zipped)
            out.append((name, zipped, buf.getvalue()))
    return out


def mutate_pkl(data: bytes, rnd: random.Random) -> bytes:
    z = zipfile.ZipFile(io.BytesIO(data))
    members = {i.filename: z.read(i.filename) for i in z.infolist()}
    pkl = next(n for n in members if n.endswith("/data.pkl"))
    members[pkl] = _mutate(members[pkl], rnd)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for n, d in members.items():
            out.writestr(n, d)
    return buf.getvalue()


def main() -> None:
    secs = float(sys.argv[1])
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    rnd = random.Random(seed)
    base = seeds()
    counts = {"runs": 0, "ours_ok": 0, "ours_refused": 0, "to_torch": 0}
    deadline = time.monotonic() + secs
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.pt")
        while time.monotonic() < deadline:
            name, zipped, data = rnd.choice(base)
            kind = rnd.choice(["pkl", "file"]) if zipped else "file"
            mutant = mutate_pkl(data, rnd) if kind == "pkl" else _mutate(data, rnd)
            with open(path, "wb") as f:
                f.write(mutant)
            mmap = rnd.random() < 0.5
            counts["runs"] += 1
            fd = os.open(path, os.O_RDONLY)
            try:
                ours = _C.legacy_load(fd, mmap, lambda loc: loc == "cpu", True)
            except (RuntimeError, OSError) as e:
                # only mmap=True refuses what torch would map wrongly; otherwise torch decides
                counts["ours_refused"] += 1
                if not mmap:
                    print(f"REFUSED without mmap ({e}); torch decides such files", flush=True)
                    sys.exit(1)
                continue
            finally:
                os.close(fd)
            if ours[0] != "ok":
                counts["to_torch"] += 1
                continue
            counts["ours_ok"] += 1
            try:
                # pre-1.6 files: plain torch refuses mmap, so compare with its in-memory load
                want = _torch._orig_load(path, weights_only=True, mmap=mmap and zipped)
                assert_same(want, ours[1])
            except BaseException as e:
                art = os.path.join(HERE, "build", "diff-artifacts")
                os.makedirs(art, exist_ok=True)
                out = os.path.join(art, f"{name}-{kind}-{counts['runs']}.pt")
                with open(out, "wb") as f:
                    f.write(mutant)
                print(f"DISAGREEMENT ({type(e).__name__}: {e}); mutant saved to {out}", flush=True)
                print(counts)
                sys.exit(1)
    print(counts)


if __name__ == "__main__":
    main()
