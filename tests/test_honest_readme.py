"""What the README promises about legacy loading and what it claims, checked: torch's
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is not honoured and the error says so; the README
names it, claims only the torch versions CI tests, and describes refusals as the code
does."""
import os
import pickle
import re

import pytest
import torch

import torch_safetensors  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NotAllowed:
    def __init__(self):
        self.x = 1


def _readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return " ".join(f.read().split())


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_force_no_weights_only_is_not_honoured_and_the_error_says_so(tmp_path, monkeypatch, value):
    p = tmp_path / "c.pt"
    torch.save({"x": NotAllowed()}, p, format="pickle")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", value)
    with pytest.raises(pickle.UnpicklingError) as e:
        torch.load(p)
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set in this environment: torch_safetensors deliberately does " \
           "not honour it" in str(e.value)
    # the call itself can still opt out, for a trusted file
    assert torch.load(p, weights_only=False)["x"].x == 1


def test_no_note_when_the_variable_is_not_set(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    torch.save({"x": NotAllowed()}, p, format="pickle")
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    with pytest.raises(pickle.UnpicklingError) as e:
        torch.load(p)
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in str(e.value)


def test_readme_names_the_variable_and_the_tested_versions():
    text = _readme()
    assert "`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` environment variable is deliberately **not** honoured" in text
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    tested = set(re.findall(r"torch==(\d+\.\d+\.\d+)", ci))
    claimed = set(re.findall(r"\*\*(\d+\.\d+\.\d+)\*\*", text))
    assert claimed == tested == {"2.13.0", "2.14.1"}
    assert "should work" not in text  # no untested claims


def test_readme_describes_refusals_as_the_code_does(tmp_path):
    text = _readme()
    # plain values and objects are stored; only code without a name is refused
    assert "Objects that are not tensors are refused" not in text
    assert "Code without an importable name (a lambda, a local class) is refused with a `TypeError`" in text
    torch.save({"n": None, "s": "x", "set": {1, 2}}, tmp_path / "ok.safetensors")
    with pytest.raises(TypeError, match="^v: function '.*<lambda>' cannot be saved"):
        torch.save({"v": lambda: 1}, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
