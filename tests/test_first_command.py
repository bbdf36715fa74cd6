"""The first minutes: the README's first command, the message of an unbuilt source tree,
the version, and a demo that says where it writes and cleans up. The command itself runs
from a fresh clone in a fresh virtualenv in .ci/first_command.sh (called by .ci/run)."""
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

import torch_safetensors as ts
from torch_safetensors import _cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_first_command_builds_in_place_and_installs_numpy_through_an_extra():
    first = re.search(r"```sh\n(.*?)```", _readme(), re.S).group(1).strip()
    assert first == 'pip install torch==2.13.0 -e ".[demo]" && python -m torch_safetensors demo'
    project = _pyproject()["project"]
    assert project["optional-dependencies"]["demo"] == ["numpy"]
    # numpy is never a runtime dependency
    assert not any(d.startswith("numpy") for d in project["dependencies"])


def test_version_matches_pyproject():
    assert ts.__version__ == _pyproject()["project"]["version"]


def test_cli_version(capsys):
    assert _cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"torch-safetensors {ts.__version__} (torch ")


# An editable install (CI's, the README's test command) adds a finder that would find the
# clone's built _C for any package named torch_safetensors: these tests stand for a user
# without one, so the subprocess drops it first.
_NO_EDITABLE = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "


def test_unbuilt_source_tree_says_so(tmp_path):
    # a source tree without the C extension, imported from its root
    tree = tmp_path / "clone"
    shutil.copytree(os.path.join(ROOT, "torch_safetensors"), tree / "torch_safetensors",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(os.path.join(ROOT, "setup.py"), tree / "setup.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (_NO_EDITABLE + "import runpy; sys.argv = ['torch_safetensors', 'demo']; "
            "runpy.run_module('torch_safetensors', run_name='__main__', alter_sys=True)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: torch_safetensors: the C extension torch_safetensors._C is not built")
    assert "pip install -e ." in last and "build_ext --inplace" in last
    assert "circular import" not in r.stderr


def test_unbuilt_installed_copy_says_reinstall(tmp_path):
    pkg = tmp_path / "site" / "torch_safetensors"
    shutil.copytree(os.path.join(ROOT, "torch_safetensors"), pkg,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    r = subprocess.run([sys.executable, "-c", _NO_EDITABLE + "import torch_safetensors"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "is not built" in r.stderr and "reinstall" in r.stderr


def test_demo_says_where_it_writes_and_cleans_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert _cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    where = re.search(r"^writing the demo's files into (\S+) \(removed at the end\)$", out, re.M).group(1)
    assert where.startswith(str(tmp_path))
    assert f"removed {where}" in out and "demo passed" in out
    assert not os.path.exists(where)
    assert [n for n in os.listdir(tmp_path) if not n.startswith("torchinductor_")] == []


def test_demo_with_out_keeps_its_files(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert _cli.main(["demo", "--out", str(out_dir)]) == 0
    assert f"writing the demo's files into {out_dir} (kept afterwards)" in capsys.readouterr().out
    assert (out_dir / "model.pt").exists()


def test_first_command_script_is_called_by_ci():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert ".ci/first_command.sh" in f.read()
    assert os.access(os.path.join(ROOT, ".ci", "first_command.sh"), os.X_OK)


@pytest.mark.skipif(not os.environ.get("TORCH_SAFETENSORS_SLOW"), reason="minutes: set TORCH_SAFETENSORS_SLOW=1 (CI runs it)")
def test_first_command_from_a_fresh_clone():
    r = subprocess.run([os.path.join(ROOT, ".ci", "first_command.sh"), ROOT], capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:]
