"""Writes fuzz/corpus_pickle/: seeds for fuzz_pickle.c covering every opcode and global
the legacy engine handles (data.pkl of torch.save files, whole small zip checkpoints for
the directory parser, and hand-written pickles). Run from the repository root."""
import io
import os
import pickle
import zipfile
from collections import OrderedDict

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_pickle")


def data_pkl(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    return z.read([n for n in z.namelist() if n.endswith("/data.pkl")][0]), buf.getvalue()


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    x = torch.arange(12.0).view(3, 4)
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.ones(1, 2)).sum().backward()
    opt.step()
    objs = {
        "state_dict": lin.state_dict(),
        "optimizer": opt.state_dict(),
        "views": {"x": x, "t": x.t(), "s": x[1:, 1:3], "e": x[:0], "scalar": x[1, 1]},
        "param": {"p": torch.nn.Parameter(torch.ones(2)), "g": torch.ones(2, requires_grad=True)},
        "values": {"i": 7, "n": -300, "b": 70000, "big": 2**80, "f": 1.5, "s": "é", "y": b"\x00\xff",
                   "none": None, "t": True, "l": [1, (2, 3)], "size": torch.Size([2, 3]),
                   "dt": torch.float16, "dev": torch.device("cuda", 0)},
        "v3": {"u16": torch.zeros(3, dtype=torch.uint16), "f8": torch.zeros(2, dtype=torch.float8_e4m3fn)},
        "dtypes": {str(d): torch.zeros(2, dtype=d) for d in (torch.float64, torch.bfloat16, torch.int8,
                                                           torch.bool, torch.complex64, torch.int64)},
    }
    for name, obj in objs.items():
        pkl, whole = data_pkl(obj)
        open(os.path.join(OUT, f"{name}.pkl"), "wb").write(pkl)
        if name in ("state_dict", "views"):
            open(os.path.join(OUT, f"{name}.zip"), "wb").write(whole)
    hand = {
        "memo_long.pkl": b"\x80\x02]r\x00\x00\x01\x00j\x00\x00\x01\x00a.",
        "short_binstring.pkl": b"\x80\x02U\x03abc.",
        "marks.pkl": b"\x80\x02](K\x01K\x02e}(K\x01K\x02us.",
        "odict_build.pkl": b"\x80\x02ccollections\nOrderedDict\n)R}X\x09\x00\x00\x00_metadata}sb.",
        "tuple_ops.pkl": b"\x80\x02K\x01\x85K\x01K\x02\x86K\x01K\x02K\x03\x87(t)\x87.",
        "bad_proto.pkl": b"\x80\x04N.",
        "bad_global.pkl": b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.",
        "empty.pkl": b"",
    }
    for name, data in hand.items():
        open(os.path.join(OUT, name), "wb").write(data)
    # pre-1.6 files, and their object pickles (persistent ids with a sixth item)
    import pickletools

    x = torch.arange(6.0).view(2, 3)
    for name, obj in {"legacy_views": {"a": x, "b": x[1]},
                      "legacy_param": {"p": torch.nn.Parameter(torch.ones(2))},
                      "legacy_sd": torch.nn.Linear(2, 2).state_dict()}.items():
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
        f = io.BytesIO(buf.getvalue())
        for _ in range(3):
            pickletools.dis(f, out=io.StringIO())
        start = f.tell()
        pickletools.dis(f, out=io.StringIO())
        open(os.path.join(OUT, f"{name}.pkl"), "wb").write(buf.getvalue()[start : f.tell()])
        open(os.path.join(OUT, f"{name}.pt"), "wb").write(buf.getvalue())
    # a pickle torch itself writes for a plain dict, by the standard pickler
    open(os.path.join(OUT, "std_pickle.pkl"), "wb").write(pickle.dumps(OrderedDict(a=[1, 2.0, "x"]), protocol=2))


if __name__ == "__main__":
    main()
