"""Issue 5, point 4: malicious legacy checkpoints that tests/test_malicious_legacy.py does not
build: payloads hidden after or inside a valid pickle in a torch zip, duplicate zip members, a
legacy tar, TorchScript archives (as saved, and with a payload in their code), a zip whose
storage record is shorter than its pickle claims, raw pickles with exec/eval/subprocess
payloads read from file objects, and a safetensors/zip polyglot.

Every payload only creates a marker file in tmp_path. torch.load (as wrapped on import) must
refuse each one, or load only the weights, and the marker must never exist afterwards, with
mmap=True too wherever torch accepts it. weights_only=False appears only in the tests that
prove a fixture is live (that its payload really runs when unpickled unsafely).
"""
from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess
import tarfile
import zipfile

import pytest
import torch

import torch_safetensors as ts

pytestmark = [
    pytest.mark.filterwarnings("ignore:'torch.load' received a zip file that looks like"),
    pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol"),
]

# ---- payloads ----


class _Reduce:
    """Pickles as fn(*args): what a malicious checkpoint hides."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def payload(kind: str, marker: str):
    """An object whose unpickling creates `marker`, one way per kind."""
    if kind == "os_system":
        return _Reduce(os.system, (f"touch '{marker}'",))
    if kind == "exec":
        return _Reduce(builtins.exec, (f"open({marker!r}, 'w').close()",))
    if kind == "eval":
        return _Reduce(builtins.eval, (f"__import__('pathlib').Path({marker!r}).touch()",))
    if kind == "subprocess_call":
        return _Reduce(subprocess.call, (["touch", marker],))
    if kind == "subprocess_run":
        return _Reduce(subprocess.run, (["touch", marker],))
    if kind == "subprocess_check_output":
        return _Reduce(subprocess.check_output, (["touch", marker],))
    raise ValueError(kind)


KINDS = ["os_system", "exec", "eval", "subprocess_call", "subprocess_run",
         "subprocess_check_output"]


def spliced_call(module: str, name: str, arg: str) -> bytes:
    """Protocol-0 opcodes that call module.name(arg) and POP the result: spliced into a
    pickle before its STOP, the stack (and so the loaded object) is unchanged."""
    assert "\n" not in arg
    return (b"c" + module.encode() + b"\n" + name.encode() + b"\n(V" + arg.encode()
            + b"\ntR0")


# ---- torch zip fixtures ----


def _state():
    return {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5)}


def _torch_zip(path) -> str:
    torch.save(_state(), path)  # a .pt path: torch's own zip format
    with zipfile.ZipFile(path) as z:
        assert any(n.endswith("/data.pkl") for n in z.namelist())
    return str(path)


def _rewrite_zip(src, dst, edit=None, extra=(), order=None):
    """Copies a zip member by member (stored), letting edit(name, bytes) change data;
    extra: (name, bytes) pairs appended; order: key function over member names."""
    with zipfile.ZipFile(src) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    if order is not None:
        members.sort(key=lambda m: order(m[0]))
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as out:
        for name, data in list(members) + list(extra):
            if edit is not None:
                data = edit(name, data)
            out.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return str(dst)


def _data_pkl(path) -> bytes:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        return z.read(name)


def _assert_state(obj):
    want = _state()
    assert isinstance(obj, dict) and sorted(obj) == sorted(want), obj
    for k in want:
        assert torch.equal(obj[k], want[k]), k


def _load_ways(path):
    """torch.load by path, path with mmap=True, open file, BytesIO."""
    yield "path", lambda: torch.load(path)
    yield "mmap", lambda: torch.load(path, mmap=True)

    def fileobj():
        with open(path, "rb") as f:
            return torch.load(f)
    yield "fileobj", fileobj
    with open(path, "rb") as f:
        data = f.read()
    yield "bytesio", lambda: torch.load(io.BytesIO(data))


@pytest.fixture
def marker(tmp_path) -> str:
    """Where a payload would leave its mark; absent at the start of each test."""
    m = tmp_path / "MARKER"
    assert not m.exists()
    return str(m)


# ---- a payload after the pickle's STOP, inside data.pkl ----


def _zip_with_tail(tmp_path, marker, kind="os_system"):
    good = _torch_zip(tmp_path / "good.pt")
    tail = pickle.dumps(payload(kind, marker), protocol=2)
    dst = _rewrite_zip(good, tmp_path / "tail.pt",
                       edit=lambda n, d: d + tail if n.endswith("/data.pkl") else d)
    return dst, tail


@pytest.mark.parametrize("kind", ["os_system", "exec", "subprocess_call"])
def test_payload_after_stop_loads_only_the_weights(tmp_path, marker, kind):
    path, _ = _zip_with_tail(tmp_path, marker, kind)
    for way, load in _load_ways(path):
        _assert_state(load())
        assert not os.path.exists(marker), way


def test_payload_after_stop_fixture_is_live(tmp_path, marker):
    # the bytes after STOP are a working payload: unpickled on their own they run
    path, tail = _zip_with_tail(tmp_path, marker)
    assert _data_pkl(path).endswith(tail)
    pickle.loads(tail)
    assert os.path.exists(marker)


# ---- a payload spliced in before STOP: the result is still the weights dict ----


def _zip_with_splice(tmp_path, marker, module="os", name="system", arg=None):
    good = _torch_zip(tmp_path / "good.pt")
    arg = arg if arg is not None else f"touch '{marker}'"

    def edit(n, d):
        if not n.endswith("/data.pkl"):
            return d
        assert d.endswith(b".")
        return d[:-1] + spliced_call(module, name, arg) + b"."
    return _rewrite_zip(good, tmp_path / "spliced.pt", edit=edit)


SPLICES = [
    ("os", "system", "touch '{m}'"),
    ("posix", "system", "touch '{m}'"),
    ("builtins", "exec", "open({m!r}, 'w').close()"),
    ("builtins", "eval", "__import__('pathlib').Path({m!r}).touch()"),
    ("subprocess", "getoutput", "touch '{m}'"),
]


@pytest.mark.parametrize("module,name,arg", SPLICES)
def test_payload_spliced_before_stop_is_refused(tmp_path, marker, module, name, arg):
    path = _zip_with_splice(tmp_path, marker, module, name, arg.format(m=marker))
    for way, load in _load_ways(path):
        with pytest.raises(pickle.UnpicklingError) as info:
            load()
        assert f"{module}.{name}" in str(info.value) or name in str(info.value), way
        assert not os.path.exists(marker), way


def test_payload_spliced_before_stop_fixture_is_live(tmp_path, marker):
    path = _zip_with_splice(tmp_path, marker)
    _assert_state(torch.load(path, weights_only=False))  # the weights, and the payload ran
    assert os.path.exists(marker)


# ---- two members named data.pkl, and stray pickles in the archive ----


@pytest.mark.parametrize("evil_first", [True, False])
def test_duplicate_data_pkl_members(tmp_path, marker, evil_first):
    # zip readers disagree on which of two same-named members wins; whichever torch
    # picks, the payload must not run
    good = _torch_zip(tmp_path / "good.pt")
    real = _data_pkl(good)
    evil = pickle.dumps(payload("os_system", marker), protocol=2)
    with zipfile.ZipFile(good) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    pkl_name = next(n for n, _ in members if n.endswith("/data.pkl"))
    dst = tmp_path / "dup.pt"
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as out:
        for name, data in members:
            if name == pkl_name:
                first, second = (evil, real) if evil_first else (real, evil)
                out.writestr(name, first)
                with pytest.warns(UserWarning, match="Duplicate name"):
                    out.writestr(name, second)
            else:
                out.writestr(name, data)
    for way, load in _load_ways(str(dst)):
        try:
            _assert_state(load())
        except pickle.UnpicklingError as e:
            assert "system" in str(e), (way, str(e))
        assert not os.path.exists(marker), way


def test_stray_malicious_members_are_never_read(tmp_path, marker):
    good = _torch_zip(tmp_path / "good.pt")
    evil = pickle.dumps(payload("exec", marker), protocol=2)
    prefix = next(n for n in zipfile.ZipFile(good).namelist() if n.endswith("/data.pkl"))[:-8]
    path = _rewrite_zip(good, tmp_path / "stray.pt",
                        extra=[(prefix + "evil.pkl", evil), (prefix + "data/evil", evil),
                               (prefix + "data.pkl.bak", evil)])
    for way, load in _load_ways(path):
        _assert_state(load())
        assert not os.path.exists(marker), way


# ---- the legacy tar format (torch < 0.4) ----


def _tar_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _legacy_tar(path, marker, member="pickle"):
    """torch's oldest format: a tar of sys_info, pickle, storages, tensors; `member`
    carries the payload, the others are valid and empty."""
    evil = pickle.dumps(payload("os_system", marker), protocol=2)
    parts = {
        "sys_info": pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                  "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2),
        "pickle": pickle.dumps({}, protocol=2),
        "storages": pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2),
        "tensors": pickle.dumps(0, protocol=2),
    }
    parts[member] = evil if member != "storages" else evil + pickle.dumps([], protocol=2)
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in parts.items():
            _tar_member(tar, name, data)
    return str(path)


@pytest.mark.parametrize("member", ["pickle", "storages", "tensors", "sys_info"])
def test_legacy_tar_is_refused(tmp_path, marker, member):
    path = _legacy_tar(tmp_path / "legacy.tar", marker, member)
    for way, load in _load_ways(path):
        if way == "bytesio":
            # torch only tries the tar reader on real files; a BytesIO is unpickled as a
            # pre-1.6 stream by the weights_only unpickler, which chokes on the tar header
            # (torch 2.13 raises IndexError from its opcode loop here, not UnpicklingError)
            with pytest.raises(Exception):
                load()
        elif way == "mmap":
            with pytest.raises(RuntimeError, match="mmap"):
                load()
        else:
            with pytest.raises(RuntimeError, match="legacy .tar format"):
                load()
        assert not os.path.exists(marker), way
    # the refusal comes before anything is extracted beside the file
    assert sorted(os.listdir(tmp_path)) == ["legacy.tar"]


def test_legacy_tar_fixture_is_live(tmp_path, marker):
    path = _legacy_tar(tmp_path / "legacy.tar", marker)
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


# ---- TorchScript archives ----


class _Scriptable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.arange(3.0))

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        self.w = state[0]
        self.training = state[1]


def _torchscript(path):
    torch.jit.save(torch.jit.script(_Scriptable()), str(path))
    return str(path)


def _torchscript_with_payload(tmp_path, marker):
    """A TorchScript archive whose __setstate__ (run by torch.jit.load) creates the marker:
    torch.from_file(path, shared=True, size=1) creates the file it maps."""
    src = _torchscript(tmp_path / "plain.pt")
    line = "    self.training = (state)[1]\n"
    edited = []
    evil_line = (f"    self.w = torch.add(self.w, torch.mul(torch.from_file({marker!r}, True, 1),"
                 " 0))\n")

    def edit(name, data):
        if "/code/" in name and name.endswith(".py") and line.encode() in data:
            edited.append(name)
            return data.decode().replace(line, line + evil_line).encode()
        return data
    # debug info maps source ranges of the original code: drop it with the edit
    dst = tmp_path / "evil_script.pt"
    with zipfile.ZipFile(src) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()
                   if not i.filename.endswith(".debug_pkl")]
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as out:
        for name, data in members:
            out.writestr(name, edit(name, data))
    assert len(edited) == 1, [n for n, _ in members]
    return str(dst)


def test_torchscript_archive_is_refused(tmp_path):
    path = _torchscript(tmp_path / "script.pt")
    for way, load in _load_ways(path):
        with pytest.raises(RuntimeError, match="TorchScript"):
            load()


def test_torchscript_with_payload_in_code_is_refused(tmp_path, marker):
    path = _torchscript_with_payload(tmp_path, marker)
    for way, load in _load_ways(path):
        with pytest.raises(RuntimeError, match="TorchScript"):
            load()
        assert not os.path.exists(marker), way
    # also under a .safetensors name, which the wrapper hands to torch by descriptor
    named = tmp_path / "evil.safetensors"
    os.rename(path, named)
    for mmap in (None, True, False):
        with pytest.raises(RuntimeError, match="TorchScript"):
            torch.load(named, mmap=mmap)
    assert not os.path.exists(marker)


def test_torchscript_payload_fixture_is_live(tmp_path, marker):
    path = _torchscript_with_payload(tmp_path, marker)
    module = torch.load(path, weights_only=False)  # dispatches to torch.jit.load
    assert os.path.exists(marker)
    assert torch.equal(module.w, torch.arange(3.0))


# ---- a storage record shorter than the pickle says ----


@pytest.mark.parametrize("numel,cut,last", [(100, 0, False), (100, 399, True),
                                            (10_000, 100, False), (10_000, 100, True)])
def test_short_storage_record_raises(tmp_path, numel, cut, last):
    # the pickle claims 4*numel bytes for storage 0; its record holds only `cut` bytes.
    # numel=100: the claimed bytes still end inside the file (the next members and the
    # central directory follow); numel=10,000: they run past the end of the file.
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(numel, dtype=torch.float32)}, good)
    with zipfile.ZipFile(good) as z:
        record = next(n for n in z.namelist() if n.endswith("/data/0"))
        assert len(z.read(record)) == 4 * numel
    # last: the short record is the archive's last member
    path = _rewrite_zip(good, tmp_path / "short.pt",
                        edit=lambda n, d: d[:cut] if n == record else d,
                        order=(lambda n: n == record) if last else None)
    for way, load in _load_ways(path):
        try:
            got = load()
        except RuntimeError as e:
            msg = str(e)
            assert "record size" in msg or "not resizable" in msg, (way, msg)
            continue
        pytest.fail(f"torch.load ({way}) accepted a {cut}-byte record for a "
                    f"{4 * numel}-byte storage: the tensor was filled from the bytes after "
                    f"the record (other zip members and headers); last value "
                    f"{got['w'][-1].item()!r}")


def test_truncated_zip_raises(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, good)
    data = good.read_bytes()
    for size in (4, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{size}.pt"
        p.write_bytes(data[:size])
        for way, load in _load_ways(str(p)):
            # torch's zip reader reports truncations as RuntimeError, OSError(EINVAL) or
            # ValueError("negative seek value") depending on where the cut falls: any
            # exception will do, a crash or a load would not
            with pytest.raises(Exception):
                load()


# ---- raw pickles through file objects ----


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_raw_pickle_from_file_objects_is_refused(tmp_path, marker, kind, protocol):
    data = pickle.dumps(payload(kind, marker), protocol=protocol)
    path = tmp_path / "raw.pkl"
    path.write_bytes(data)
    with open(path, "rb") as f:
        with pytest.raises(pickle.UnpicklingError):
            torch.load(f)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(data))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BufferedReader(io.BytesIO(data)))
    with pytest.raises(RuntimeError, match="mmap"):
        torch.load(path, mmap=True)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("kind", KINDS)
def test_raw_pickle_fixture_is_live(tmp_path, marker, kind):
    data = pickle.dumps(payload(kind, marker), protocol=2)
    # torch reads a raw stream as pre-1.6: the payload runs as the "magic number"
    with pytest.raises(RuntimeError, match="magic number"):
        torch.load(io.BytesIO(data), weights_only=False)
    assert os.path.exists(marker)


# ---- a safetensors header in front of a malicious zip ----


def test_safetensors_polyglot_never_falls_back_to_pickle(tmp_path, marker):
    # a file that sniffs as safetensors but fails to parse (the zip is trailing bytes):
    # the wrapper reports SafetensorError and never hands the file to torch's unpickler,
    # even when the caller allows unsafe loading
    spliced = _zip_with_splice(tmp_path, marker)
    header = b'{"__metadata__":{"format":"pt"}}'
    path = tmp_path / "polyglot.pt"
    path.write_bytes(len(header).to_bytes(8, "little") + header
                     + open(spliced, "rb").read())
    assert zipfile.is_zipfile(path)  # zip readers find it by its end record
    for kwargs in ({}, {"mmap": True}, {"mmap": False}, {"weights_only": False}):
        with pytest.raises(ts.SafetensorError, match="trailing bytes"):
            torch.load(path, **kwargs)
        with open(path, "rb") as f:
            with pytest.raises(ts.SafetensorError):
                torch.load(f, **kwargs)
    assert not os.path.exists(marker)
