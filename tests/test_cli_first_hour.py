"""What a new user meets in the first hour with the command line (issue 18, point 3):
a closed output pipe, exit statuses that agree, wording, checksums on every save path,
the default-format switch misspelt, and cosmetic slips in inspect and verify.

Pipes and the switch run in real subprocesses; the rest calls the same main() in this
process.
"""
from __future__ import annotations

import enum
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


# ---- exit statuses and wording (3.7) ----


def _two_checkpoints(d):
    d.mkdir()
    ts.save_file({"a": torch.zeros(1)}, str(d / "a.safetensors"))
    ts.save_file({"b": torch.zeros(1)}, str(d / "b.safetensors"))


def test_inspect_and_verify_agree_on_a_directory_of_several_checkpoints(cli, tmp_path):
    _two_checkpoints(tmp_path / "multi")
    p = cli("inspect", "multi")
    assert p.returncode == _cli.EXIT_USAGE == 2
    assert "several checkpoints (a.safetensors, b.safetensors); name the one to inspect" in p.stderr
    p = cli("verify", "multi")
    assert p.returncode == 2
    assert p.stdout == "ERROR    multi: several checkpoints (a.safetensors, b.safetensors); name the one to verify\n"
    assert "INVALID" not in p.stdout and "failed verification" not in p.stderr
    assert "1 of 1 checkpoint is ambiguous (a directory of several checkpoints: name one)" in p.stderr
    # naming one works for both
    assert cli("inspect", "multi/a.safetensors").returncode == 0
    assert cli("verify", "multi/a.safetensors", "multi/b.safetensors").returncode == 0


def test_verify_says_a_missing_file_is_missing(cli):
    p = cli("verify", "missing.pt")
    assert p.returncode == _cli.EXIT_IO == 3
    assert p.stdout == "ERROR    missing.pt: no such file or directory\n"
    assert p.stderr == "torch-safetensors: error: 1 of 1 checkpoint is missing\n"


def test_verify_summary_counts_each_kind_and_the_worst_status_wins(cli, tmp_path):
    ts.save_file({"a": torch.zeros(3)}, str(tmp_path / "good.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "good.safetensors").read_bytes()[:-1])
    _two_checkpoints(tmp_path / "multi")
    p = cli("verify", "good.safetensors", "bad.safetensors", "gone1", "gone2", "multi")
    assert p.returncode == _cli.EXIT_INVALID
    assert p.stderr.strip() == ("torch-safetensors: error: 1 of 5 checkpoints failed verification; 2 are missing; "
                                "1 is ambiguous (a directory of several checkpoints: name one)")
    p = cli("verify", "good.safetensors", "gone1", "multi")
    assert p.returncode == 2  # ambiguous before missing, as documented
    assert "1 of 3 checkpoints is missing; 1 is ambiguous" in p.stderr


def test_verify_ok_line_reads_right(cli, tmp_path):
    ts.save_file({"a": torch.zeros(3)}, str(tmp_path / "one.safetensors"))
    ts.save_file({"a": torch.zeros(3), "b": torch.zeros(1)}, str(tmp_path / "two.safetensors"))
    p = cli("verify", "one.safetensors", "two.safetensors")
    assert p.returncode == 0
    one, two = p.stdout.splitlines()
    assert one == ("OK       one.safetensors (1 tensor, 12 B; header and layout checked; tensor data not read: "
                   "--data reads it)")
    assert "(2 tensors, 16 B;" in two
    assert "))" not in p.stdout and p.stdout.count("(") == p.stdout.count(")")


def test_help_documents_the_rules(cli):
    for command, fragment in (("inspect", "directory of several"), ("verify", "directory of several"),
                              ("convert", "DST exists (--force replaces it)")):
        p = cli(command, "--help")
        section = p.stdout.split("exit status:")[1]
        assert fragment in " ".join(section.split()), command


@pytest.fixture
def legacy(tmp_path):
    src = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, src, format="pickle")
    return src


def test_convert_refuses_an_existing_destination_without_force(cli, tmp_path, legacy):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"precious")
    p = cli("convert", "legacy.pt", "out.safetensors")
    assert p.returncode == 2
    assert p.stderr == ("torch-safetensors: error: out.safetensors already exists; pass --force to replace it "
                        "(the new checkpoint replaces it only once it is complete)\n")
    assert dst.read_bytes() == b"precious"
    p = cli("convert", "legacy.pt", "out.safetensors", "--force")
    assert p.returncode == 0, p.stderr
    assert ts.load_file(str(dst))["w"].tolist() == [1.0, 1.0, 1.0]
    # a fresh destination needs no --force
    assert cli("convert", "legacy.pt", "new.safetensors").returncode == 0


def test_convert_refuses_an_existing_sharded_checkpoint_without_force(cli, tmp_path, legacy):
    out = tmp_path / "ckpt"
    out.mkdir()
    # an empty directory (or one without safetensors files) is fine
    assert cli("convert", "legacy.pt", "ckpt", "--shard-size", "8").returncode == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    p = cli("convert", "legacy.pt", "ckpt", "--shard-size", "8")
    assert p.returncode == 2 and "ckpt already holds a safetensors checkpoint (model.safetensors)" in p.stderr
    assert "--force" in p.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert cli("convert", "legacy.pt", "ckpt", "--shard-size", "8", "--force").returncode == 0


# ---- checksums on every save path (3.6): verify --data says OK ----


def _verify_data(cli, path):
    p = cli("verify", "--data", path)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "recorded checksum" in p.stdout and "no checksums recorded" not in p.stdout, p.stdout
    return p.stdout


def _flip_last_byte(path):
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x01]))


def _state(n=6, size=64):
    torch.manual_seed(0)
    return {f"layer.{i}.weight": torch.randn(size) for i in range(n)}


def test_save_sharded_checksums(cli, tmp_path):
    ts.save_sharded(_state(), tmp_path / "ckpt", max_shard_size=600, checksums=True)
    shards = sorted(n for n in os.listdir(tmp_path / "ckpt") if n.endswith(".safetensors"))
    assert len(shards) == 3
    out = _verify_data(cli, "ckpt")
    assert "sharded, 3 files, 6 tensors" in out and "each file: data matches 2 recorded checksums" in out
    _flip_last_byte(tmp_path / "ckpt" / shards[-1])
    p = cli("verify", "--data", "ckpt")
    assert p.returncode == _cli.EXIT_INVALID and "does not match the checksums" in p.stdout
    # the default stays off, as for save_file
    ts.save_sharded(_state(), tmp_path / "plain", max_shard_size=600)
    assert "no checksums recorded" in cli("verify", "--data", "plain").stdout


def test_save_sharded_checksums_single_file(cli, tmp_path):
    ts.save_sharded(_state(), tmp_path / "one", checksums=True)
    assert "data matches 6 recorded checksums" in _verify_data(cli, "one")


def test_convert_shard_size_checksums(cli, tmp_path):
    torch.save(_state(), tmp_path / "legacy.pt", format="pickle")
    p = cli("convert", "legacy.pt", "out", "--shard-size", "600", "--checksums")
    assert p.returncode == 0, p.stderr
    assert "in 3 files" in p.stdout
    assert "data matches 2 recorded checksums" in _verify_data(cli, "out")


def test_async_save_checksums_are_of_the_values_at_the_call(cli, tmp_path):
    sd = _state()
    fut = ts.async_save(sd, tmp_path / "a.safetensors", checksums=True)
    for t in sd.values():
        t.add_(1)  # allowed once async_save returned: the file holds the old values
    fut.result()
    assert "data matches 6 recorded checksums" in _verify_data(cli, "a.safetensors")
    assert torch.equal(ts.load_file(str(tmp_path / "a.safetensors"))["layer.0.weight"] + 1, sd["layer.0.weight"])


def test_save_model_checksums(cli, tmp_path):
    model = torch.nn.Linear(4, 2)
    ts.save_model(model, tmp_path / "m.safetensors", checksums=True)
    assert "data matches 2 recorded checksums" in _verify_data(cli, "m.safetensors")


# ---- a misspelt TORCH_SAFETENSORS_FORMAT (3.8): one line, in a fresh process ----


@pytest.fixture
def startup_env(tmp_path):
    """Processes that run the installed startup .pth line (read from setup.py), as an
    installed package does, through a site directory added by sitecustomize."""
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    line = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "STARTUP_LINE" for t in node.targets))
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "torch_safetensors_startup.pth").write_text(line)
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "sitecustomize.py").write_text(f"import site\nsite.addsitedir({str(site_dir)!r})\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(custom), ROOT]))
    for name in ("TORCH_SAFETENSORS_FORMAT", "TORCH_SAFETENSORS_FALLBACK"):
        env.pop(name, None)
    return env


@pytest.mark.parametrize("variables,code,line", [
    ({"TORCH_SAFETENSORS_FORMAT": "safetensor"}, "import torch",
     "torch_safetensors: TORCH_SAFETENSORS_FORMAT='safetensor' is not a format: set it to 'safetensors' or "
     "'pickle', or unset it"),
    ({"TORCH_SAFETENSORS_FORMAT": "safetensors", "TORCH_SAFETENSORS_FALLBACK": "pickel"}, "import torch",
     "torch_safetensors: TORCH_SAFETENSORS_FALLBACK='pickel' is not a fallback: set it to 'pickle' or 'error', "
     "or unset it"),
    # the same line when the program imports torch_safetensors itself
    ({"TORCH_SAFETENSORS_FORMAT": "json"}, "import torch_safetensors",
     "torch_safetensors: TORCH_SAFETENSORS_FORMAT='json' is not a format: set it to 'safetensors' or "
     "'pickle', or unset it"),
], ids=["format-via-import-torch", "fallback-via-import-torch", "format-via-import-torch_safetensors"])
def test_misspelt_switch_is_one_line(startup_env, variables, code, line):
    r = subprocess.run([sys.executable, "-c", code + "; print('ran on')"], env=dict(startup_env, **variables),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stdout == ""  # stopped before the program ran on (and wrote pickle)
    assert r.stderr == line + "\n", r.stderr


# ---- cosmetics (3.10) ----


class Color(enum.Enum):
    RED = 1


def test_inspect_tree_counts_and_none(cli, tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), foreach=None)
    torch.save({"opt": opt.state_dict(), "one": [1], "w": torch.zeros(1)}, tmp_path / "ck.safetensors",
               format="safetensors")
    p = cli("inspect", "ck.safetensors")
    assert p.returncode == 0, p.stderr
    lines = [line.strip() for line in p.stdout.splitlines()]
    assert "one: list (1 item)" in lines
    assert "param_groups: list (1 item)" in lines
    assert "foreach: None" in lines
    assert "1 items" not in p.stdout and "None null" not in p.stdout
    assert "opt: dict (2 items)" in lines  # plural stays plural
    assert "total: 1 tensor, 4 bytes of data" in p.stdout


def test_saving_a_module_gives_one_hint(tmp_path):
    with pytest.raises(TypeError) as info:
        torch.save(torch.nn.Linear(2, 2), tmp_path / "m.safetensors", format="safetensors")
    message = str(info.value)
    assert message.count("(") == message.count(")") and message.count(" (") == 1, message
    assert "save its state_dict() and rebuild the module in code" in message
    assert "code is never stored" not in message
    # a value without a specific reason still gets the generic hint
    with pytest.raises(TypeError, match=r"^g: generator cannot be saved in safetensors format \(a running "
                                        r"generator is code; save the values it would produce\)$"):
        torch.save({"g": (x for x in [])}, tmp_path / "f.safetensors", format="safetensors")


def test_an_enum_is_named_a_class_or_function_not_a_callable(tmp_path):
    with torch.serialization.safe_globals([Color]):
        torch.save({"c": Color.RED, "w": torch.zeros(1)}, tmp_path / "e.safetensors", format="safetensors")
        assert torch.load(tmp_path / "e.safetensors")["c"] is Color.RED
    with pytest.raises(ts.SafetensorError) as info:
        torch.load(tmp_path / "e.safetensors")
    message = str(info.value)
    assert f"holds class or function {__name__}.Color, which this process has not allowed" in message
    assert "callable" not in message


# ---- errors name the file (3.9, the command line) ----


def test_every_command_names_the_file_it_failed_on(cli, tmp_path):
    ts.save_file({"a": torch.zeros(10)}, str(tmp_path / "good.safetensors"))
    raw = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[:-3])
    (tmp_path / "tiny.bin").write_bytes(b"abcd")
    (tmp_path / "empty.bin").write_bytes(b"")
    for name in ("trunc.safetensors", "tiny.bin", "empty.bin"):
        for args in (("inspect", name), ("convert", name, "out.safetensors")):
            p = cli(*args)
            assert p.returncode == _cli.EXIT_INVALID, (args, p.stderr)
            assert p.stderr.startswith(f"torch-safetensors: error: {name}: "), (args, p.stderr)
            assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
        p = cli("verify", name)
        assert p.stdout.startswith(f"INVALID  {name}: ")
    assert not (tmp_path / "out.safetensors").exists()
