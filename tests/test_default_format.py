"""The default-format switch: set_default_format, TORCH_SAFETENSORS_FORMAT and
TORCH_SAFETENSORS_FALLBACK, and the startup hook that applies them to processes that
never import torch_safetensors (plain scripts, torchrun workers)."""
from __future__ import annotations

import ast
import io
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _C, _default

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _unstorable():
    """A value pickle stores and safetensors refuses (a documented limit): a numpy
    object array."""
    np = pytest.importorskip("numpy")
    return np.array(["a", None], dtype=object)


def _is_safetensors(data: bytes) -> bool:
    return len(data) >= 8 and _C.sniff(data[:4096], len(data))


def _is_torch_zip(data: bytes) -> bool:
    return data[:2] == b"PK"


@pytest.fixture
def default_safetensors():
    """The default format is safetensors for one test, and restored after it."""
    saved = (_default._format, _default._fallback)
    ts.set_default_format("safetensors")
    yield
    _default._format, _default._fallback = saved


def _checkpoint():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": lin.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}


def _assert_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert type(a) is type(b) and a == b, (a, b)


# ---- from code ----


def test_default_is_pickle_and_setter_validates():
    assert ts.get_default_format() in ("pickle", "safetensors")
    with pytest.raises(ValueError, match="default format must be one of"):
        ts.set_default_format("safetensor")
    with pytest.raises(ValueError, match="fallback must be None or 'pickle'"):
        ts.set_default_format("safetensors", fallback="json")


def test_without_the_switch_torch_keeps_its_format(tmp_path):
    saved = (_default._format, _default._fallback)
    try:
        ts.set_default_format("pickle")
        torch.save(_checkpoint(), tmp_path / "a.pt")
        assert _is_torch_zip((tmp_path / "a.pt").read_bytes())
    finally:
        _default._format, _default._fallback = saved


def test_paths_and_file_objects_write_safetensors(default_safetensors, tmp_path):
    ck = _checkpoint()
    torch.save(ck, tmp_path / "ck.pt")
    torch.save(ck, str(tmp_path / "ck.bin"))
    with open(tmp_path / "ck.fobj", "wb") as f:
        torch.save(ck, f)
    buf = io.BytesIO()
    torch.save(ck, buf)  # as Lightning does before writing the bytes out
    for name in ("ck.pt", "ck.bin", "ck.fobj"):
        data = (tmp_path / name).read_bytes()
        assert _is_safetensors(data), name
        assert b"PK\x03\x04" not in data and b"\x80\x02" not in data[:2]
        _assert_equal(torch.load(tmp_path / name), ck)
    assert _is_safetensors(buf.getvalue())
    buf.seek(0)
    _assert_equal(torch.load(buf), ck)
    # torch.serialization.save is the same function
    torch.serialization.save({"t": torch.ones(2)}, tmp_path / "ser.pt")
    assert _is_safetensors((tmp_path / "ser.pt").read_bytes())


def test_format_pickle_on_one_call_still_wins(default_safetensors, tmp_path):
    torch.save({"t": torch.ones(2)}, tmp_path / "p.pt", format="pickle")
    assert _is_torch_zip((tmp_path / "p.pt").read_bytes())
    buf = io.BytesIO()
    torch.save({"t": torch.ones(2)}, buf, format="pickle")
    assert _is_torch_zip(buf.getvalue())
    assert torch.equal(torch.load(tmp_path / "p.pt")["t"], torch.ones(2))


def test_torch_save_arguments_are_still_checked(default_safetensors, tmp_path):
    with pytest.raises(TypeError):
        torch.save({"t": torch.ones(1)}, tmp_path / "x.pt", no_such_argument=1)
    assert not (tmp_path / "x.pt").exists()


def test_unstorable_object_raises_naming_its_path_and_writes_nothing(default_safetensors, tmp_path):
    ck = {"model": {"w": torch.ones(2)}, "hooks": {"fn": _unstorable()}}
    with pytest.raises(TypeError) as info:
        torch.save(ck, tmp_path / "bad.pt")
    msg = str(info.value)
    assert "hooks.fn" in msg and "TORCH_SAFETENSORS_FALLBACK=pickle" in msg and "format='pickle'" in msg
    assert not (tmp_path / "bad.pt").exists()
    assert os.listdir(tmp_path) == []  # no temporary file left either
    buf = io.BytesIO(b"keep")
    buf.seek(4)
    with pytest.raises(TypeError, match="hooks.fn"):
        torch.save(ck, buf)
    assert buf.getvalue() == b"keep"


def test_unstorable_object_does_not_damage_the_previous_file(default_safetensors, tmp_path):
    target = tmp_path / "ck.pt"
    torch.save({"w": torch.ones(2)}, target)
    before = target.read_bytes()
    with pytest.raises(TypeError):
        torch.save({"w": torch.zeros(2), "fn": _unstorable()}, target)
    assert target.read_bytes() == before


def test_fallback_writes_pickle_for_that_call_only_with_a_warning(tmp_path):
    saved = (_default._format, _default._fallback)
    try:
        ts.set_default_format("safetensors", fallback="pickle")
        ck = {"model": {"w": torch.ones(2)}, "hooks": {"fn": _unstorable()}}
        with pytest.warns(ts.PickleFallbackWarning) as rec:
            torch.save(ck, tmp_path / "fb.pt")
        msg = str(rec[0].message)
        assert "hooks.fn" in msg and "fb.pt" in msg and "pickle" in msg
        assert rec[0].filename == __file__  # points at the caller's torch.save line
        assert _is_torch_zip((tmp_path / "fb.pt").read_bytes())
        got = torch.load(tmp_path / "fb.pt", weights_only=False)
        assert got["hooks"]["fn"].tolist() == ["a", None]
        buf = io.BytesIO()
        with pytest.warns(ts.PickleFallbackWarning, match="BytesIO"):
            torch.save(ck, buf)
        assert _is_torch_zip(buf.getvalue())
        # the next storable object is safetensors again, silently
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
        assert _is_safetensors((tmp_path / "ok.pt").read_bytes())
    finally:
        _default._format, _default._fallback = saved


def test_an_invalid_target_is_not_a_fallback_case(tmp_path):
    saved = (_default._format, _default._fallback)
    try:
        ts.set_default_format("safetensors", fallback="pickle")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises((TypeError, AttributeError)):
                torch.save({"fn": _unstorable()}, 42)
    finally:
        _default._format, _default._fallback = saved


# ---- from the environment, in fresh processes ----


def _startup_line() -> str:
    """The .pth line that setup.py installs, read from setup.py itself."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "STARTUP_LINE" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no STARTUP_LINE")


@pytest.fixture
def site_env(tmp_path):
    """An environment whose processes run the startup .pth through site, as an installed
    package does: a site directory holding the .pth, added by a sitecustomize module."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "torch_safetensors_startup.pth").write_text(_startup_line())
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "sitecustomize.py").write_text(f"import site\nsite.addsitedir({str(site_dir)!r})\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(custom), str(ROOT)])
    for name in (_default.ENV_FORMAT, _default.ENV_FALLBACK):
        env.pop(name, None)
    return env


# a user's script: it never imports torch_safetensors
PLAIN_SCRIPT = textwrap.dedent(
    """
    import io, sys
    before = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torch_safetensors", "numpy"))
    import torch
    out = sys.argv[1]
    torch.save({"w": torch.arange(4.0), "step": 7}, out + ".pt")
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    with open(out + ".buf", "wb") as f:
        f.write(buf.getvalue())
    print("BEFORE", before)
    """
)


def _run(env, *args, timeout=120):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_environment_switches_a_process_that_never_imports_it(site_env, tmp_path):
    script = tmp_path / "user.py"
    script.write_text(PLAIN_SCRIPT)
    env = dict(site_env, TORCH_SAFETENSORS_FORMAT="safetensors")
    r = _run(env, str(script), str(tmp_path / "on"))
    assert r.returncode == 0, r.stderr
    assert "BEFORE []" in r.stdout  # nothing heavy before the program imports torch
    for suffix in (".pt", ".buf"):
        assert _is_safetensors((tmp_path / ("on" + suffix)).read_bytes()), suffix
    got = torch.load(tmp_path / "on.pt")
    assert got["step"] == 7 and torch.equal(got["w"], torch.arange(4.0))

    r = _run(site_env, str(script), str(tmp_path / "off"))
    assert r.returncode == 0, r.stderr
    for suffix in (".pt", ".buf"):
        assert _is_torch_zip((tmp_path / ("off" + suffix)).read_bytes()), suffix


def test_environment_unset_imports_nothing(site_env):
    ours = ("torch", "torch_safetensors", "_torch_safetensors_startup", "numpy", "safetensors")
    code = f"import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {ours!r}))"
    r = _run(site_env, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    # set: only the stdlib-only hook module until torch is imported
    r = _run(dict(site_env, TORCH_SAFETENSORS_FORMAT="safetensors"), "-c", code)
    assert r.stdout.strip() == "['_torch_safetensors_startup']", r.stderr


def test_environment_pickle_installs_the_loader_only(site_env, tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "st.pt", format="safetensors")
    code = textwrap.dedent(
        f"""
        import torch
        print(torch.load({str(tmp_path / 'st.pt')!r})["w"].tolist())
        torch.save({{"w": torch.ones(1)}}, {str(tmp_path / 'p.pt')!r})
        """
    )
    r = _run(dict(site_env, TORCH_SAFETENSORS_FORMAT="pickle"), "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[1.0, 1.0, 1.0]"
    assert _is_torch_zip((tmp_path / "p.pt").read_bytes())


def test_environment_fallback(site_env, tmp_path):
    _unstorable()  # numpy is needed
    code = textwrap.dedent(
        f"""
        import numpy, torch
        torch.save({{"w": torch.ones(1), "fn": numpy.array([None], dtype=object)}}, {str(tmp_path / 'fb.pt')!r})
        """
    )
    env = dict(site_env, TORCH_SAFETENSORS_FORMAT="safetensors")
    r = _run(env, "-c", code)
    assert r.returncode != 0 and "TypeError: fn: " in r.stderr
    assert not (tmp_path / "fb.pt").exists()
    r = _run(dict(env, TORCH_SAFETENSORS_FALLBACK="pickle"), "-c", code)
    assert r.returncode == 0, r.stderr
    assert "PickleFallbackWarning" in r.stderr and "fb.pt" in r.stderr and "fn: " in r.stderr
    assert _is_torch_zip((tmp_path / "fb.pt").read_bytes())


def test_environment_typo_is_an_error(site_env):
    r = _run(dict(site_env, TORCH_SAFETENSORS_FORMAT="safetensor"), "-c", "import torch")
    assert r.returncode != 0
    assert "TORCH_SAFETENSORS_FORMAT" in r.stderr and "'safetensor'" in r.stderr


def test_importing_torch_safetensors_first_also_works(site_env, tmp_path):
    code = f"import torch_safetensors, torch; torch.save({{'w': torch.ones(1)}}, {str(tmp_path / 'a.pt')!r})"
    r = _run(dict(site_env, TORCH_SAFETENSORS_FORMAT="safetensors"), "-c", code)
    assert r.returncode == 0, r.stderr
    assert _is_safetensors((tmp_path / "a.pt").read_bytes())


def test_a_probe_for_torch_before_importing_it_does_not_disarm_the_hook(site_env, tmp_path):
    """transformers and others call importlib.util.find_spec("torch") before importing it."""
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        for _ in range(2):
            assert importlib.util.find_spec("torch") is not None
        assert "torch" not in sys.modules
        import torch
        torch.save({{"w": torch.ones(1)}}, {str(tmp_path / 'a.pt')!r})
        """
    )
    r = _run(dict(site_env, TORCH_SAFETENSORS_FORMAT="safetensors"), "-c", code)
    assert r.returncode == 0, r.stderr
    assert _is_safetensors((tmp_path / "a.pt").read_bytes())


def test_torch_keeps_its_real_loader(site_env):
    code = "import torch, torch_safetensors; print(type(torch.__loader__).__name__, torch.save.__module__)"
    r = _run(dict(site_env, TORCH_SAFETENSORS_FORMAT="safetensors"), "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["SourceFileLoader", "torch.serialization"]


TORCHRUN_SCRIPT = textwrap.dedent(
    """
    import io, os, sys
    import torch
    rank = os.environ["RANK"]
    buf = io.BytesIO()
    torch.save({"rank": int(rank), "w": torch.full((2,), float(rank))}, buf)
    with open(os.path.join(sys.argv[1], f"rank{rank}.pt"), "wb") as f:
        f.write(buf.getvalue())
    """
)


def test_every_torchrun_worker_is_switched(site_env, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(site_env, TORCH_SAFETENSORS_FORMAT="safetensors", OMP_NUM_THREADS="1")
    r = _run(env, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(script), str(tmp_path), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        data = (tmp_path / f"rank{rank}.pt").read_bytes()
        assert _is_safetensors(data), rank
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["rank"] == rank and torch.equal(got["w"], torch.full((2,), float(rank)))


# ---- packaging: the .pth really is installed ----


def test_installed_distribution_carries_the_startup_hook():
    """Where the package is installed (pip install . or -e ., as CI does), its files
    include the .pth in site-packages, with the line setup.py defines."""
    from importlib import metadata

    # installed by pip: a RECORD (a source tree's egg-info from pip install -e has none)
    installed = [d for d in metadata.distributions(name="torch_safetensors") if d.read_text("RECORD")]
    if not installed:
        pytest.skip("torch_safetensors is not installed (tests run from the source tree)")
    files = [f for f in (installed[0].files or []) if f.name == "torch_safetensors_startup.pth"]
    assert files, "the installed distribution has no torch_safetensors_startup.pth"
    assert files[0].read_text() == _startup_line()
    site_packages = {os.path.realpath(p) for p in __import__("site").getsitepackages()}
    assert os.path.realpath(os.path.dirname(str(files[0].locate()))) in site_packages


def _build(tmp_path, hook: str) -> zipfile.ZipFile:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", "*.so", "__pycache__", ".ci-venv*", ".git", "fuzz", "benchmarks"))
    out = tmp_path / "out"
    out.mkdir()
    code = f"from setuptools import build_meta as b; print(b.{hook}({str(out)!r}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return zipfile.ZipFile(out / r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("hook", ["build_wheel", "build_editable"])
def test_wheels_install_the_startup_hook(tmp_path, hook):
    """pip install . and pip install -e . both put the .pth at the wheel's root (so it
    lands in site-packages) and list it in RECORD (so pip uninstall removes it)."""
    with _build(tmp_path, hook) as whl:
        names = whl.namelist()
        assert "torch_safetensors_startup.pth" in names
        assert whl.read("torch_safetensors_startup.pth").decode() == _startup_line()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        assert "torch_safetensors_startup.pth," in whl.read(record).decode()
        if hook == "build_wheel":
            assert "_torch_safetensors_startup.py" in names
