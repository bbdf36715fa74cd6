"""The command line, continued: help per subcommand, what convert says (the refused
global, one count, state dict or whole checkpoint), inspect on legacy files, legacy
shard directories and ties, no terminal injection, and verify --data with checksums.

Everything runs main() in this process (the entry point itself is covered by
test_cli.py's subprocesses)."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _cli

CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # every control but the newline


def run(capsys, *argv):
    status = _cli.main(list(map(str, argv)), prog="torch-safetensors")
    out, err = capsys.readouterr()
    return status, out, err


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


class Custom:
    pass


# ---- help ----


@pytest.mark.parametrize("command,codes", [("inspect", {0, 1, 2, 3, 130, 141}), ("convert", {0, 1, 2, 3, 4, 130, 141}),
                                           ("verify", {0, 1, 2, 3, 130, 141}), ("demo", {0, 1, 2, 3, 130, 141})])
def test_help_lists_only_the_statuses_a_command_returns(capsys, command, codes):
    status, out, _ = run(capsys, command, "--help")
    assert status == 0
    section = out.split("exit status:")[1]
    listed = {int(m) for m in re.findall(r"^  (\d+) ", section, re.M)}
    assert listed == codes


def test_every_positional_has_help():
    parser = _cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.help
    for name, p in sub.choices.items():
        for action in p._actions:
            if not action.option_strings:
                assert action.help, f"{name} {action.dest}"


def test_verify_help_says_plain_verify_reads_headers_only(capsys):
    _, out, _ = run(capsys, "verify", "--help")
    assert "Without --data only headers are read" in " ".join(out.split())


# ---- convert ----


def test_convert_refusal_names_the_global(tmp_path, capsys):
    torch.save({"w": torch.ones(2), "x": Custom()}, tmp_path / "c.pt")
    status, _, err = run(capsys, "convert", tmp_path / "c.pt", tmp_path / "c.safetensors")
    assert status == 4
    assert f"it needs {__name__}.Custom, a class or function outside torch's weights_only allowlist" in err
    torch.save({"w": torch.ones(2), "x": Evil()}, tmp_path / "e.pt")
    status, _, err = run(capsys, "convert", tmp_path / "e.pt", tmp_path / "e.safetensors")
    assert status == 4 and re.search(r"it needs (posix|os)\.system", err), err
    assert not (tmp_path / "e.safetensors").exists()
    assert "\x1b" not in err  # torch's own message has ANSI bold in it


def _tied_sd():
    emb = torch.randn(6, 4)
    return {"embed.weight": emb, "head.weight": emb, "bias": torch.zeros(6)}


def test_convert_counts_the_same_way_in_every_mode(tmp_path, capsys):
    torch.save(_tied_sd(), tmp_path / "t.pt", format="pickle")
    _, one, _ = run(capsys, "convert", tmp_path / "t.pt", tmp_path / "t.safetensors")
    _, sharded, _ = run(capsys, "convert", tmp_path / "t.pt", tmp_path / "shards", "--shard-size", "100")
    expected = "state dict, 3 tensors (1 tied, stored once), 120 B"
    assert f"-> {tmp_path / 't.safetensors'}: {expected}\n" in one
    assert f"-> {tmp_path / 'shards'}: {expected} in 2 files" in sharded
    back = torch.load(tmp_path / "t.safetensors")
    assert back["head.weight"].data_ptr() == back["embed.weight"].data_ptr()


def test_convert_wording_matches_what_was_converted(tmp_path, capsys):
    torch.save({"a": torch.ones(2)}, tmp_path / "sd.pt")
    torch.save({"model": {"a": torch.ones(2)}, "step": 3}, tmp_path / "ck.pt")
    _, out, _ = run(capsys, "convert", tmp_path / "sd.pt", tmp_path / "sd.safetensors")
    assert ": state dict, 1 tensor, 8 B" in out
    _, out, _ = run(capsys, "convert", tmp_path / "ck.pt", tmp_path / "ck.safetensors")
    assert ": whole checkpoint, 1 tensor, 8 B" in out


def test_convert_with_checksums(tmp_path, capsys):
    torch.save({"a": torch.arange(10.0)}, tmp_path / "a.pt")
    assert run(capsys, "convert", tmp_path / "a.pt", tmp_path / "a.safetensors", "--checksums")[0] == 0
    status, out, _ = run(capsys, "verify", "--data", tmp_path / "a.safetensors")
    assert status == 0 and "data matches 1 recorded checksum" in out


# ---- legacy shard directories ----


def _legacy_shards(d, *, index=True):
    d.mkdir()
    a = {"a.weight": torch.randn(3, 3), "a.bias": torch.randn(3)}
    b = {"b.weight": torch.randn(2, 3)}
    torch.save(a, d / "pytorch_model-00001-of-00002.bin")
    torch.save(b, d / "pytorch_model-00002-of-00002.bin")
    if index:
        wm = {**{k: "pytorch_model-00001-of-00002.bin" for k in a}, **{k: "pytorch_model-00002-of-00002.bin" for k in b}}
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 60}, "weight_map": wm}))
    return {**a, **b}


def test_inspect_and_verify_recognise_a_legacy_shard_directory(tmp_path, capsys):
    _legacy_shards(tmp_path / "hf")
    status, _, err = run(capsys, "inspect", tmp_path / "hf")
    assert status == 1
    assert err.startswith(f"torch-safetensors: error: {tmp_path / 'hf'}: a Hugging Face checkpoint of 2 legacy "
                          "(pickle) shards (index pytorch_model.bin.index.json), not safetensors; convert it: "
                          f"torch-safetensors convert {tmp_path / 'hf'} {tmp_path / 'hf'}-safetensors")
    status, out, _ = run(capsys, "verify", tmp_path / "hf" / "pytorch_model.bin.index.json")
    assert status == 1 and "legacy (pickle) shards" in out


@pytest.mark.parametrize("via_index", [False, True])
def test_convert_a_legacy_shard_directory(tmp_path, capsys, via_index):
    sd = _legacy_shards(tmp_path / "hf")
    src = tmp_path / "hf" / "pytorch_model.bin.index.json" if via_index else tmp_path / "hf"
    status, out, _ = run(capsys, "convert", src, tmp_path / "out", "--shard-size", "50")
    assert status == 0, out
    assert "state dict, 3 tensors" in out
    back = torch.load(tmp_path / "out")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert run(capsys, "verify", tmp_path / "out")[0] == 0


def test_convert_a_legacy_shard_directory_with_a_missing_shard(tmp_path, capsys):
    _legacy_shards(tmp_path / "hf")
    os.unlink(tmp_path / "hf" / "pytorch_model-00002-of-00002.bin")
    status, _, err = run(capsys, "convert", tmp_path / "hf", tmp_path / "out")
    assert status == 3 and "pytorch_model-00002-of-00002.bin" in err
    assert not (tmp_path / "out").exists()


def test_legacy_shards_without_their_index(tmp_path, capsys):
    _legacy_shards(tmp_path / "hf", index=False)
    status, _, err = run(capsys, "inspect", tmp_path / "hf")
    assert status == 1 and "no pytorch_model.bin.index.json" in err


def test_a_directory_with_both_kinds_is_safetensors(tmp_path, capsys):
    _legacy_shards(tmp_path / "hf")
    ts.save_file({"x": torch.ones(1)}, tmp_path / "hf" / "model.safetensors")
    status, out, _ = run(capsys, "inspect", tmp_path / "hf")
    assert status == 0 and "safetensors file" in out


def test_inspect_a_pre_1_6_file_and_a_plain_pickle(tmp_path, capsys):
    torch.save({"a": torch.ones(1)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    status, _, err = run(capsys, "inspect", tmp_path / "old.pt")
    assert status == 1 and "a legacy PyTorch checkpoint (the pre-1.6 pickle format), not safetensors" in err
    import pickle

    (tmp_path / "p.pkl").write_bytes(pickle.dumps([1, 2], protocol=4))
    status, _, err = run(capsys, "inspect", tmp_path / "p.pkl")
    assert status == 1 and "a pickle file, not safetensors" in err


# ---- ties ----


def test_inspect_shows_tied_names(tmp_path, capsys):
    torch.save(_tied_sd(), tmp_path / "t.safetensors")
    status, out, _ = run(capsys, "inspect", tmp_path / "t.safetensors")
    assert status == 0
    assert "tie: embed.weight is referenced at embed.weight, head.weight" in out  # the checkpoint tree
    _, out, _ = run(capsys, "inspect", "--json", tmp_path / "t.safetensors")
    assert json.loads(out)["aliases"] == {"head.weight": "embed.weight"}


def test_inspect_shows_save_model_aliases(tmp_path, capsys):
    m = torch.nn.Module()
    m.a = torch.nn.Linear(2, 2)
    m.b = m.a
    ts.save_model(m, tmp_path / "m.safetensors")
    _, out, _ = run(capsys, "inspect", tmp_path / "m.safetensors")
    assert "tied: 2 names stored once under another name:\n  b.bias -> a.bias\n  b.weight -> a.weight\n" in out
    _, out, _ = run(capsys, "inspect", "--json", tmp_path / "m.safetensors")
    assert json.loads(out)["aliases"] == {"b.bias": "a.bias", "b.weight": "a.weight"}


def test_inspect_shows_nested_ties(tmp_path, capsys):
    w = torch.ones(3)
    torch.save({"model": {"w": w}, "ema": [w]}, tmp_path / "n.safetensors")
    _, out, _ = run(capsys, "inspect", "--json", tmp_path / "n.safetensors")
    assert json.loads(out)["aliases"] == {"ema[0]": "model.w"}


# ---- no terminal injection (hardening issue, point 17) ----

HOSTILE = "evil\x1b]0;pwned\x07\x1b[2J\rname\x9b31m\x7f\u0085"


def _assert_clean(text):
    assert not CONTROL.search(text), repr(text)


def test_hostile_names_and_metadata_are_escaped(tmp_path, capsys):
    p = tmp_path / "h.safetensors"
    ts.save_file({HOSTILE: torch.ones(1), "ok": torch.ones(1)}, p, metadata={HOSTILE: HOSTILE, "k": HOSTILE})
    status, out, err = run(capsys, "inspect", p)
    assert status == 0
    _assert_clean(out + err)
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J\\x0dname\\x9b31m\\x7f\\x85" in out
    for cmd in (["verify", p], ["verify", "--data", p]):
        status, out, err = run(capsys, *cmd)
        assert status == 0
        _assert_clean(out + err)


def test_json_stays_exact(tmp_path, capsys):
    p = tmp_path / "h.safetensors"
    ts.save_file({HOSTILE: torch.ones(1)}, p, metadata={"m": HOSTILE})
    status, out, _ = run(capsys, "inspect", "--json", p)
    assert status == 0
    _assert_clean(out)
    doc = json.loads(out)
    assert doc["tensors"][0]["name"] == HOSTILE
    assert doc["files"][0]["metadata"] == {"m": HOSTILE}


def test_hostile_shard_file_names_are_escaped(tmp_path, capsys):
    d = tmp_path / "ck"
    d.mkdir()
    shard = "model\x1b[31m-00001-of-00001.safetensors"
    ts.save_file({"a": torch.ones(1)}, d / shard)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    status, out, err = run(capsys, "inspect", d)
    assert status == 0
    _assert_clean(out + err)
    assert "model\\x1b[31m-00001-of-00001.safetensors" in out
    os.unlink(d / shard)
    status, out, err = run(capsys, "verify", d)
    assert status == 3
    _assert_clean(out + err)


def test_hostile_names_in_errors_are_escaped(tmp_path, capsys):
    torch.save({HOSTILE: torch.eye(2).to_sparse()}, tmp_path / "s.pt")
    status, out, err = run(capsys, "convert", tmp_path / "s.pt", tmp_path / "s.safetensors")
    assert status in (1, 4)
    _assert_clean(out + err)


# ---- verify --data ----


def _corrupt_tensor_byte(path, name):
    with ts.safe_open(path) as f:
        reader = f._reader
        _dtype, _shape, begin, _end = reader.info(name)
    data = bytearray(path.read_bytes())
    data[begin] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_data_tells_a_corrupted_file_from_a_good_one(tmp_path, capsys):
    p = tmp_path / "m.safetensors"
    torch.save({"a": torch.randn(100), "b": torch.randn(7, 3)}, p, format="safetensors", checksums=True)
    status, out, _ = run(capsys, "verify", "--data", p)
    assert status == 0 and "data matches 2 recorded checksums" in out
    _corrupt_tensor_byte(p, "b")
    # the header is intact: plain verify cannot tell, and says it did not read the data
    status, out, _ = run(capsys, "verify", p)
    assert status == 0 and "tensor data not read: --data reads it)" in out and "))" not in out
    status, out, err = run(capsys, "verify", "--data", p)
    assert status == 1
    assert out.startswith(f"INVALID  {p}: tensor data does not match the checksums recorded at save time: 'b' "
                          "(1 of 2 tensors): the file is corrupt")


def test_verify_data_without_checksums(tmp_path, capsys):
    p = tmp_path / "n.safetensors"
    ts.save_file({"a": torch.ones(3)}, p)
    status, out, _ = run(capsys, "verify", "--data", p)
    assert status == 0 and "no checksums recorded (save with checksums=True to record them)" in out


def test_verify_data_malformed_checksums(tmp_path, capsys):
    p = tmp_path / "x.safetensors"
    ts.save_file({"a": torch.ones(3)}, p, metadata={"torch_safetensors.checksums": '{"algorithm":"md5","tensors":{}}'})
    status, out, _ = run(capsys, "verify", "--data", p)
    assert status == 1 and "unknown algorithm 'md5'" in out


def test_checksums_are_ignored_by_other_readers(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    p = tmp_path / "c.safetensors"
    ts.save_file({"a": torch.arange(5.0)}, p, checksums=True)
    assert torch.equal(safetensors.load_file(str(p))["a"], torch.arange(5.0))
    assert torch.equal(torch.load(p)["a"], torch.arange(5.0))


def test_convert_a_legacy_shard_directory_refuses_a_payload_shard(tmp_path, capsys):
    _legacy_shards(tmp_path / "hf")
    torch.save({"b.weight": torch.ones(2, 3), "x": Evil()}, tmp_path / "hf" / "pytorch_model-00002-of-00002.bin")
    status, _, err = run(capsys, "convert", tmp_path / "hf", tmp_path / "out")
    assert status == 4 and re.search(r"it needs (posix|os)\.system", err), err
    assert not (tmp_path / "out").exists()


def test_convert_a_legacy_shard_directory_that_disagrees_with_its_index(tmp_path, capsys):
    _legacy_shards(tmp_path / "hf")
    torch.save({"b.weight": torch.ones(2, 3), "extra": torch.ones(1)}, tmp_path / "hf" / "pytorch_model-00002-of-00002.bin")
    status, _, err = run(capsys, "convert", tmp_path / "hf", tmp_path / "out")
    assert status == 1 and "extra" in err


def test_our_own_line_breaks_are_not_escaped(tmp_path, capsys):
    p = tmp_path / "s.safetensors"
    ts.save_file({"a": torch.ones(1)}, p, metadata={"torch_safetensors.structure": "not json\nat all"})
    status, out, _ = run(capsys, "inspect", p)
    assert status == 0
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("checkpoint tree: "))
    assert not lines[i].endswith("\\x0a") and lines[i + 1] == ""  # a real blank line after it
    _assert_clean(out)
