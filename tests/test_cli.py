"""The command line, run as ``python -m torch_safetensors``: inspect, convert (with the
refusal of malicious legacy files), verify, usage errors and exit statuses.

Each command runs at least once in a subprocess (they start together, once the fixture
files exist); the finer cases call the same ``main()`` in this process, to keep the
module fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch " + self.marker,))


def _model_sd():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)).state_dict()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    sd = _model_sd()
    torch.save(sd, d / "model.safetensors")
    raw = (d / "model.safetensors").read_bytes()
    (d / "corrupt.safetensors").write_bytes(raw[:-7])  # truncated data
    torch.save(sd, d / "legacy.pt", format="pickle")
    torch.save(sd, d / "legacy_old.pt", format="pickle", _use_new_zipfile_serialization=False)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}
    torch.save(ckpt, d / "ckpt.pt", format="pickle")
    marker = str(d / "PAYLOAD_RAN")
    evil = {"weight": torch.zeros(2), "extra": _Payload(marker)}
    torch.save(evil, d / "evil.pt", format="pickle")
    torch.save(evil, d / "evil_old.pt", format="pickle", _use_new_zipfile_serialization=False)
    torch.save({"weight": torch.zeros(2), "tags": torch.ones(2).untyped_storage()}, d / "set.pt", format="pickle")
    ts.save_sharded(sd, d / "shards", max_shard_size=600)
    ts.save_sharded(sd, d / "broken", max_shard_size=600)
    (d / "garbage.bin").write_bytes(bytes(range(256)) * 4)
    os.unlink(d / "broken" / "model-00002-of-00003.safetensors")
    return {"dir": d, "sd": sd, "ckpt": ckpt, "marker": marker}


def _commands(d):
    """What runs in subprocesses: the real entry point, once per command."""
    j = lambda *p: str(d.joinpath(*p))  # noqa: E731
    return {
        "help": ["--help"],
        "inspect_json": ["inspect", "--json", j("shards")],
        "convert_shards": ["convert", j("legacy.pt"), j("out_shards"), "--shard-size", "2KB", "--progress"],
        "convert_evil": ["convert", j("evil.pt"), j("evil.safetensors")],
        "verify_bad": ["verify", j("model.safetensors"), j("corrupt.safetensors"), j("legacy.pt")],
    }


@pytest.fixture(scope="module")
def runs(work):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def run(args):
        return subprocess.run([sys.executable, "-m", "torch_safetensors", *args], capture_output=True,
                              text=True, env=env, cwd=str(work["dir"]), timeout=120)

    cmds = _commands(work["dir"])
    with ThreadPoolExecutor(max_workers=len(cmds)) as pool:
        results = dict(zip(cmds, pool.map(run, cmds.values())))
    return results


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys, monkeypatch, work):
    """Runs the command line in this process (the same main() as the subprocesses),
    in the fixture directory."""
    monkeypatch.chdir(work["dir"])

    def call(*args):
        capsys.readouterr()
        status = _cli.main(list(args), prog="python -m torch_safetensors")
        out, err = capsys.readouterr()
        return _Result(status, out, err)

    return call


def _one_error_line(proc):
    """The single stderr line of a failed command: no traceback, named program."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("python -m torch_safetensors: error: ")
    return lines[0]


# ---- help and usage ----


def test_help_documents_exit_statuses(runs):
    p = runs["help"]
    assert p.returncode == 0
    for cmd in ("inspect", "convert", "verify", "demo"):
        assert cmd in p.stdout
    for status in ("0  success", "1  invalid input", "2  usage error", "3  I/O error", "4  refused"):
        assert status in p.stdout


def test_usage_errors_exit_2_with_one_line(cli):
    for p in (cli(), cli("inspect"), cli("frobnicate"),
              cli("convert", "legacy.pt", "model.safetensors", "--bogus")):
        assert p.returncode == _cli.EXIT_USAGE == 2, p.stderr
        _one_error_line(p)
    p = cli("convert", "legacy.pt", "new_y", "--shard-size", "5XB")
    assert p.returncode == 2 and "5XB" in _one_error_line(p)
    p = cli("convert", "legacy.pt", "legacy.pt")
    assert p.returncode == 2 and "same file" in _one_error_line(p)
    p = cli("convert", "legacy.pt", "shards")
    assert p.returncode == 2 and "--shard-size" in _one_error_line(p)


# ---- inspect ----


def test_inspect_table(cli):
    p = cli("inspect", "model.safetensors")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[2].split() == ["name", "dtype", "shape", "bytes", "offset"]
    row = next(line for line in lines if line.startswith("0.weight "))
    assert row.split()[:2] == ["0.weight", "F32"] and "[32, 32]" in row and "4,096" in row
    assert "total: 4 tensors, 4,752 bytes of data" in p.stdout
    assert "format: pt" in p.stdout


def test_inspect_json_sharded(runs, work):
    p = runs["inspect_json"]
    assert p.returncode == 0, p.stderr
    desc = json.loads(p.stdout)
    assert desc["format"] == "sharded" and desc["index"].endswith("model.safetensors.index.json")
    assert len(desc["files"]) == 3 and desc["total_tensors"] == 4 and desc["total_bytes"] == 4752
    by_name = {t["name"]: t for t in desc["tensors"]}
    assert by_name["0.weight"]["shape"] == [32, 32] and by_name["0.weight"]["dtype"] == "F32"
    assert by_name["0.weight"]["bytes"] == 4096
    # offsets are from the file's start: they locate the bytes exactly
    t = by_name["1.weight"]
    with open(t["file"], "rb") as f:
        f.seek(t["offset"])
        data = f.read(t["bytes"])
    assert data == work["sd"]["1.weight"].numpy().tobytes()
    assert all(f["metadata"] == {"format": "pt"} for f in desc["files"])


def test_inspect_errors(cli):
    p = cli("inspect", "nothere.safetensors")
    assert p.returncode == _cli.EXIT_IO == 3
    assert "nothere.safetensors" in _one_error_line(p)
    p = cli("inspect", "corrupt.safetensors")
    assert p.returncode == _cli.EXIT_INVALID
    assert "corrupt.safetensors" in _one_error_line(p)
    p = cli("inspect", "legacy.pt")
    assert p.returncode == _cli.EXIT_INVALID == 1
    assert "legacy.pt: a legacy PyTorch checkpoint (torch.save's zip format), not safetensors; convert it:" in _one_error_line(p)


# ---- convert ----


def test_convert_zip_and_pre_1_6(cli, work):
    for src, out in (("legacy.pt", "new_zip.safetensors"), ("legacy_old.pt", "new_old.pt")):
        p = cli("convert", src, out)
        assert p.returncode == 0, p.stderr
        assert "4 tensors" in p.stdout
        path = work["dir"] / out
        assert ts.safe_open(str(path), framework="pt").metadata() == {"format": "pt"}
        back = torch.load(path)
        assert sorted(back) == sorted(work["sd"])
        assert all(torch.equal(back[k], work["sd"][k]) for k in back)


def test_convert_whole_checkpoint(cli, work):
    p = cli("convert", "ckpt.pt", "new_ckpt.safetensors")
    assert p.returncode == 0, p.stderr
    assert "whole checkpoint" in p.stdout
    back = torch.load(work["dir"] / "new_ckpt.safetensors")
    assert back["epoch"] == 3
    model = torch.nn.Linear(8, 2)
    model.load_state_dict(back["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt.load_state_dict(back["optimizer"])
    want = work["ckpt"]["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], want)


def test_convert_sharded_with_progress(runs, work):
    p = runs["convert_shards"]
    assert p.returncode == 0, p.stderr
    d = work["dir"] / "out_shards"
    assert sorted(os.listdir(d)) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    back = torch.load(d)
    assert all(torch.equal(back[k], work["sd"][k]) for k in work["sd"])
    assert "converting [" in p.stderr and "100.0%" in p.stderr


def test_convert_refuses_malicious_files_without_running_them(runs, cli, work):
    for p in (runs["convert_evil"], cli("convert", "evil_old.pt", "new_evil_old.safetensors"),
              cli("convert", "evil.pt", "new_evil", "--shard-size", "1MB")):
        assert p.returncode == _cli.EXIT_REFUSED == 4, p.stderr
        line = _one_error_line(p)
        assert "refused" in line and "posix.system" in line and "nothing in it was run" in line
    assert not os.path.exists(work["marker"])
    assert not os.path.exists(work["dir"] / "evil.safetensors")
    assert not os.path.exists(work["dir"] / "new_evil_old.safetensors")
    assert not os.path.exists(work["dir"] / "new_evil")


def test_convert_refuses_objects_safetensors_cannot_store(cli, work):
    p = cli("convert", "set.pt", "new_set.safetensors")
    assert p.returncode == _cli.EXIT_INVALID
    assert "tags: torch.storage.TypedStorage" in _one_error_line(p)
    assert not os.path.exists(work["dir"] / "new_set.safetensors")
    p = cli("convert", "ckpt.pt", "new_ckpt_shards", "--shard-size", "1MB")
    assert p.returncode == _cli.EXIT_INVALID
    assert "needs a state dict (a flat dict of names to tensors)" in _one_error_line(p)
    p = cli("convert", "garbage.bin", "new_garbage.safetensors")
    assert p.returncode in (_cli.EXIT_INVALID, _cli.EXIT_REFUSED)
    _one_error_line(p)


def test_convert_missing_source(cli):
    p = cli("convert", "nothere.pt", "new_x.safetensors")
    assert p.returncode == _cli.EXIT_IO
    assert "nothere.pt" in _one_error_line(p)


# ---- verify ----


def test_verify_all_valid(cli):
    p = cli("verify", "model.safetensors", "shards", "shards/model.safetensors.index.json")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("OK ") for line in lines)
    assert "sharded, 3 files, 4 tensors" in lines[1]
    assert p.stderr == ""


def test_verify_reports_each_file(runs):
    p = runs["verify_bad"]
    assert p.returncode == _cli.EXIT_INVALID
    ok, corrupt, legacy = p.stdout.splitlines()
    assert ok.startswith("OK ") and "model.safetensors" in ok
    assert corrupt.startswith("INVALID ") and "corrupt.safetensors" in corrupt and "data bytes" in corrupt
    assert legacy.startswith("INVALID ") and "a legacy PyTorch checkpoint" in legacy
    assert "2 of 3 checkpoints failed verification" in _one_error_line(p)


def test_verify_missing_shard(cli):
    p = cli("verify", "broken")
    assert p.returncode == _cli.EXIT_IO
    assert "model-00002-of-00003.safetensors" in p.stdout and "missing" in p.stdout


# ---- in-process details ----


def test_verify_structure_and_index_disagreement_in_process(tmp_path, capsys):
    ts.save_sharded(_model_sd(), tmp_path / "s", max_shard_size=600)
    index = tmp_path / "s" / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["ghost"] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(doc))
    assert _cli.main(["verify", str(tmp_path / "s")]) == _cli.EXIT_INVALID
    assert "'ghost'" in capsys.readouterr().out


def test_console_script_declared():
    tomllib = pytest.importorskip("tomllib")

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    module, func = scripts["torch-safetensors"].split(":")
    assert module == "torch_safetensors._cli" and getattr(_cli, func) is _cli.main
