"""Mutation fuzzer over the checkpoint structure decoder (torch_safetensors._checkpoint).

Usage: python fuzz/fuzz_structure.py SECONDS [SEED]

Seeds are the structure documents of real checkpoints (every data type, tensor kind and
allowlisted object the tests use). Each round mutates one document (replaces a node with
another seed's node or a hostile leaf, drops or duplicates a field, renames a tag, nests
it deeper) and decodes it, and describes it as the CLI's inspect does, with a few classes
allowlisted. Anything but a value or SafetensorError is a finding: the input is written
to fuzz/build/artifacts/ and the run exits 1. Decoding must also stay within its time and
memory bound (a timer per input; the decoder's own budget covers memory).

Beyond "no crash", each input checks the invariant (issue 22):
- verify's schema validator and the loader agree: what the validator refuses does not
  load, and what loads validates;
- what loads saves again, and loading that gives an exact copy (types, bits, ties, key
  order), whose structure validates;
- one round in four, a fresh checkpoint drawn from the property test's strategies over
  the type table goes through save, load, verify and the safetensors package.
"""
from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import enum
import json
import os
import pathlib
import random
import sys
import time
import warnings

import numpy as np
import torch

import torch_safetensors  # noqa: F401 - installs the wrappers
from torch_safetensors import _checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import test_structure_invariant as _invariant  # noqa: E402 - the property test's strategies and equality

SafetensorError = _checkpoint.SafetensorError


@dataclasses.dataclass
class Cfg:
    lr: float
    name: str = "x"


class Mode(enum.Enum):
    A = 1


def _seeds():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objs = [
            {"model": {"w": torch.ones(2), "tie": None}, "epoch": 3, "lr": [0.1, float("nan")]},
            {"np": np.arange(4, dtype=">i4"), "rng": np.random.get_state(), "s": np.float16(1)},
            {(1, 2): {1, 2}, None: frozenset({b"x"}), 1.5: bytearray(b"y"), torch.float16: 1j},
            {"p": pathlib.Path("a"), "ns": argparse.Namespace(a=range(3), b=slice(1, 2)),
             "c": collections.Counter("ab"), "d": collections.defaultdict(list, a=[1])},
            {"sp": torch.eye(3).to_sparse(), "csr": torch.eye(3).to_sparse_csr(),
             "q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
             "m": torch.empty(2, device="meta"), "c": torch.ones(2, dtype=torch.complex128),
             "n": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])},
            {"cfg": Cfg(0.1), "mode": Mode.A, "cls": Cfg, "dt": torch.bfloat16, "dev": torch.device("cpu")},
            _traceable(),
        ]
    seeds = []
    for obj in objs:
        tensors, meta = _checkpoint.flatten(obj)
        seeds.append((tensors, json.loads(meta[_checkpoint.STRUCTURE_KEY])))
    return seeds


def _traceable():
    """The "tsub" row: a traceable subclass (the property test's), tied, beside its inner tensor."""
    w = _invariant.scaled(2, 3, 0)
    return {"w": w, "tie": w, "bf": _invariant.scaled(1, 2, 1, torch.bfloat16), "codes": w.codes}


_LEAVES = [None, True, 0, -1, 2**80, 1e308, -0.0, "", "w", "os:system", f"{__name__}:Cfg", "float32",
           "<f4", "|O", "sparse_csr", "PosixPath", "AAAA", [], {}, [[]], {"t": "w"}, {"t": "nope"},
           {"tk": "complex"}, "9" * 50,
           # float nodes: a NaN's bits at each width, malformed, not a NaN's, upper case
           {"f": "nan"}, {"f": "nan:7c01"}, {"f": "nan:ffc00001"}, {"f": "nan:7ff0000000000001"},
           {"f": "nan:7ff0000000000000"}, {"f": "nan:7FF8000000000001"}, {"f": "nan:"}, {"f": "nan:zz"}]


def _nodes(doc, out, parent=None, key=None):
    out.append((parent, key, doc))
    if isinstance(doc, dict):
        for k, v in list(doc.items()):
            _nodes(v, out, doc, k)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            _nodes(v, out, doc, i)
    return out


def _mutate(rng: random.Random, doc, pool):
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 4)):
        nodes = _nodes(doc, [])
        parent, key, node = rng.choice(nodes[1:] or nodes)
        if parent is None:
            continue
        r = rng.random()
        if r < 0.35:
            parent[key] = copy.deepcopy(rng.choice(pool))
        elif r < 0.55:
            parent[key] = copy.deepcopy(rng.choice(_LEAVES))
        elif r < 0.65 and isinstance(parent, dict):
            del parent[key]
        elif r < 0.75 and isinstance(parent, dict):
            parent[rng.choice(list(_checkpoint._TAGS) + ["t", "tk", "o", "p", "g", "x"])] = node
        elif r < 0.85 and isinstance(parent, list):
            parent.append(copy.deepcopy(node))
        elif r < 0.95:
            parent[key] = {rng.choice(list(_checkpoint._TAGS)): node}
        else:
            parent[key] = [node] * rng.randint(0, 3)
    return doc


_NAMES = {v: k for k, v in _checkpoint.DTYPES.items() if v is not None}


def _held(tensors):
    """The file's tensors as verify sees them: (safetensors dtype, shape, bytes)."""
    out = {}
    for k, v in tensors.items():
        shape = list(v.shape)
        if _NAMES[v.dtype] == "F4":
            shape[-1] *= 2
        out[k] = (_NAMES[v.dtype], shape, v.numel() * v.element_size())
    return out


# what only building can tell: data-level tensor invariants, what an allowed class does
_LOADER_ONLY = ("cannot be rebuilt", "out of range", "rebuilding", "is not a class", "is not callable",
                "returned a", "is not a tensor subclass", "is not hashable", "unhashable", "factory is not callable",
                "did not give back")


def _invariant_holds(tensors, text) -> bool:
    """Validator and loader agree; what loads saves and reloads exactly. True if it loaded."""
    try:
        _checkpoint.validate(text, _held(tensors))
        valid = None
    except SafetensorError as e:
        valid = e
    try:
        value = _checkpoint.unflatten(dict(tensors), {_checkpoint.STRUCTURE_KEY: text})
    except SafetensorError as e:
        if valid is None and e.code == "structure" and not any(w in str(e) for w in _LOADER_ONLY):
            raise AssertionError(f"validated, then refused by the loader: {e}") from None
        return False
    if valid is not None:
        raise AssertionError(f"loaded, but the validator refuses it: {valid}")
    try:
        again, meta = _checkpoint.flatten({"v": value, "n": 1})
    except (TypeError, ValueError) as e:
        if "collide" in str(e) or "cannot be saved" in str(e):
            return True  # the mutation made keys that collide, or a value only a file can hold
        raise
    text2 = meta[_checkpoint.STRUCTURE_KEY]
    _checkpoint.validate(text2, _held(again))
    back = _checkpoint.unflatten(dict(again), meta)
    _invariant.same({"v": value, "n": 1}, back, {})
    return True


def _fresh(rng: random.Random) -> None:
    """A checkpoint from the property test's strategies, through the whole invariant."""
    import tempfile

    from hypothesis import HealthCheck, given, settings

    seed = rng.randrange(1 << 30)

    @settings(max_examples=1, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              derandomize=False)
    @given(_invariant.checkpoint())
    def one(obj):
        with tempfile.TemporaryDirectory() as d:
            _invariant.test_every_value_of_the_type_table_round_trips_exactly.hypothesis.inner_test(
                _Factory(d), obj)

    import hypothesis

    hypothesis.seed(seed)(one)()


class _Factory:
    def __init__(self, root: str) -> None:
        self.root = pathlib.Path(root)
        self.n = 0

    def mktemp(self, name: str) -> pathlib.Path:
        self.n += 1
        p = self.root / f"{name}{self.n}"
        p.mkdir()
        return p


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("seconds", type=float)
    ap.add_argument("seed", type=int, nargs="?", default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    seeds = _seeds()
    pool = [n for _, doc in seeds for _, _, n in _nodes(doc, [])]
    artifacts = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "artifacts")
    end = time.monotonic() + args.seconds
    runs = outcomes = 0
    slowest = 0.0
    with torch.serialization.safe_globals([Cfg, Mode, _invariant.Scaled]):
        while time.monotonic() < end:
            tensors, doc = rng.choice(seeds)
            mutated = _mutate(rng, doc, pool)
            text = json.dumps(mutated)
            start = time.monotonic()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if rng.random() < 0.25:
                        _fresh(rng)
                    elif _invariant_holds(tensors, text):
                        outcomes += 1
                    info = {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()}
                    try:
                        _checkpoint.tree_lines(_checkpoint.describe(text, info))
                    except SafetensorError:
                        pass
            except SafetensorError as e:
                if e.code not in ("structure", "budget", "not_allowed"):
                    raise AssertionError(f"unexpected error code {e.code!r}: {e}") from None
            except Exception as e:  # noqa: BLE001 - any other exception is a finding
                os.makedirs(artifacts, exist_ok=True)
                path = os.path.join(artifacts, f"structure-{args.seed}-{runs}.json")
                with open(path, "w") as f:
                    f.write(text)
                import traceback

                traceback.print_exc()
                print(f"FINDING: {type(e).__name__}: {e}\n  input: {path}", file=sys.stderr)
                return 1
            took = time.monotonic() - start
            slowest = max(slowest, took)
            if took > 5:
                print(f"FINDING: one input took {took:.1f} s", file=sys.stderr)
                return 1
            runs += 1
    print(f"structure fuzzer: {runs} inputs, {outcomes} decoded to a value, the rest refused; "
          f"slowest {slowest * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
