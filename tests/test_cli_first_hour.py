"""What a new user meets in the first hour with the command line (issue 18, point 3):
a closed output pipe, exit statuses that agree, wording, checksums on every save path,
the default-format switch misspelt, and cosmetic slips in inspect and verify.

Pipes and the switch run in real subprocesses; the rest calls the same main() in this
process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys, tmp_path, monkeypatch):
    """main() in this process, in a fresh directory."""
    monkeypatch.chdir(tmp_path)

    def call(*args):
        capsys.readouterr()
        status = _cli.main([str(a) for a in args], prog="torch-safetensors")
        out, err = capsys.readouterr()
        return _Result(status, out, err)

    return call


# ---- a reader that leaves early (| head -1) ----


@pytest.fixture(scope="module")
def pipe_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    # about 300 KB of inspect output: far more than a pipe holds, so the writer meets
    # the closed pipe while it writes, not only at exit
    ts.save_file({f"layers.{i}.attention.weight": torch.zeros(1) for i in range(4000)}, str(d / "many.safetensors"))
    ts.save_file({"a": torch.zeros(1)}, str(d / "one.safetensors"))
    return d


def _first_line_then_close(args):
    p = subprocess.Popen([sys.executable, "-m", "torch_safetensors", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV)
    first = p.stdout.readline()
    p.stdout.close()
    try:
        status = p.wait(timeout=120)
    finally:
        err = p.stderr.read()
        p.stderr.close()
    return first, status, err


PIPE_CASES = {
    "inspect": ["inspect", "{d}/many.safetensors"],
    "inspect-json": ["inspect", "--json", "{d}/many.safetensors"],
    "inspect-small": ["inspect", "{d}/one.safetensors"],  # fits the pipe: fails, if at all, at exit
    "verify-many": ["verify", *["{d}/one.safetensors"] * 300],
    "help": ["--help"],
}


@pytest.fixture(scope="module")
def pipe_runs(pipe_files):
    with ThreadPoolExecutor(max_workers=len(PIPE_CASES)) as pool:
        return dict(zip(PIPE_CASES, pool.map(lambda args: _first_line_then_close(
            [a.format(d=pipe_files) for a in args]), PIPE_CASES.values())))


@pytest.mark.parametrize("case", sorted(PIPE_CASES))
def test_closed_pipe_is_quiet(pipe_runs, case):
    first, status, err = pipe_runs[case]
    assert first  # the reader got its line
    assert err == b"", err  # no "error: Broken pipe", no "Exception ignored", no traceback
    assert status in (0, _cli.EXIT_PIPE), status


def test_closed_pipe_through_a_shell_head(pipe_files):
    """As typed: `... | head -1` under pipefail reports 141 (as for `yes | head -1`) or 0."""
    script = (f"set -o pipefail; {sys.executable} -m torch_safetensors inspect "
              f"{pipe_files}/many.safetensors | head -1")
    p = subprocess.run(["bash", "-c", script], capture_output=True, env=ENV, timeout=120)
    assert p.stdout.decode().startswith(f"{pipe_files}/many.safetensors: safetensors file")
    assert p.stdout.count(b"\n") == 1
    assert p.stderr == b"", p.stderr
    assert p.returncode in (0, 141)


def test_pipe_status_is_documented():
    text = _cli.build_parser().format_help()
    assert "141" in text and "| head" in text
