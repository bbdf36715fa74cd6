"""torchao's quantized weights and low-bit optimizer states, for real, on the CPU (issue 20).

torchao is a test-only dependency (installed with ``--no-deps`` so that the pinned torch
stays); these tests are skipped only where it cannot be imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _checkpoint

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torchao = pytest.importorskip("torchao", reason="torchao is not installed (pip install --no-deps torchao)")
    from torchao.quantization import (  # noqa: E402
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )
    import torchao.optim  # noqa: E402

STRUCTURE = _checkpoint.STRUCTURE_KEY
# what importing torchao allowlisted, seen before any test runs: another test may clear
# torch's safe globals (tests/test_checkpoint_types.py does), and torchao registers only once
REGISTERED_ON_IMPORT = [g for g in torch.serialization.get_safe_globals()
                        if not isinstance(g, tuple) and (getattr(g, "__module__", "") or "").startswith("torchao")]


@pytest.fixture(autouse=True)
def _torchao_allowlisted():
    with torch.serialization.safe_globals(REGISTERED_ON_IMPORT):
        yield

CONFIGS = {
    "int8_weight_only": (Int8WeightOnlyConfig, "Int8Tensor", {"qdata": torch.int8, "scale": torch.float32}),
    "int8_dynamic_activation_int8_weight": (Int8DynamicActivationInt8WeightConfig, "Int8Tensor",
                                            {"qdata": torch.int8, "scale": torch.float32}),
    "float8_weight_only": (Float8WeightOnlyConfig, "Float8Tensor",
                           {"qdata": torch.float8_e4m3fn, "scale": torch.float32}),
}


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))


def _quantized(config, seed: int) -> torch.nn.Module:
    m = _model(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(m, config())
    return m


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantized_model_round_trip_is_bit_exact(tmp_path, name):
    config, cls_name, inner = CONFIGS[name]
    m = _quantized(config, 0)
    assert type(m[0].weight).__name__ == cls_name
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m(x)
    p = tmp_path / "q.safetensors"
    torch.save(m.state_dict(), p, format="safetensors")

    sd = torch.load(p)  # torchao allowlisted its classes on import: no weights_only=False
    assert type(sd["0.weight"]).__name__ == cls_name
    fresh = _quantized(config, 123)  # other weights, same layout
    with torch.no_grad():
        assert not torch.equal(fresh(x), y)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)  # bit for bit
    for layer in ("0", "2"):
        for attr in ("qdata", "scale"):
            assert torch.equal(getattr(fresh[int(layer)].weight, attr), getattr(m[int(layer)].weight, attr))

    # the file is plain safetensors: inner tensors by name, for every reader
    with ts.safe_open(str(p), "pt") as f:
        keys = set(f.keys())
        for attr, dtype in inner.items():
            t = f.get_tensor(f"0.weight.{attr}")
            assert t.dtype == dtype and type(t) is torch.Tensor
            assert torch.equal(t, getattr(m[0].weight, attr))
        root = json.loads(f.metadata()[STRUCTURE])["root"]
        node = (root["oda"][0] if "oda" in root else root["od"])["0.weight"]  # with its _metadata, or not
    assert {"0.bias", "2.bias", "0.weight.qdata", "0.weight.scale"} <= keys
    assert node["tk"] == "tsub" and node["cls"].endswith(f":{cls_name}") and node["size"] == [32, 64]
    safetensors_torch = pytest.importorskip("safetensors.torch")
    plain = safetensors_torch.load_file(str(p))
    assert set(plain) == keys and torch.equal(plain["0.weight.qdata"], m[0].weight.qdata)

    out = subprocess.run([sys.executable, "-m", "torch_safetensors", "verify", "--data", str(p)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout + out.stderr


def test_assign_and_mmap_free_loading(tmp_path):
    m = _quantized(Int8WeightOnlyConfig, 0)
    p = tmp_path / "q.safetensors"
    torch.save(m.state_dict(), p, format="safetensors")
    x = torch.randn(2, 64)
    fresh = _quantized(Int8WeightOnlyConfig, 5)
    fresh.load_state_dict(torch.load(p, mmap=False), assign=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


# the classes the tests above need, registered by torchao itself on import; the README's
# table of what a user must add for the others comes from the same check
REGISTERED = [
    "torchao.quantization.Int8Tensor",
    "torchao.quantization.Float8Tensor",
    "torchao.quantization.quantize_.workflows.int8.int8_tensor.QuantizeTensorToInt8Kwargs",
    "torchao.quantization.quantize_.common.kernel_preference.KernelPreference",
    "torchao.quantization.granularity.PerRow",
    "torchao.quantization.quant_primitives.MappingType",
    "torchao.optim.subclass_8bit.OptimState8bit",
    "torchao.optim.subclass_4bit.OptimState4bit",
    "torchao.optim.subclass_fp8.OptimStateFp8",
]


def test_torchao_registers_the_classes_it_needs():
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in REGISTERED_ON_IMPORT}
    missing = [n for n in REGISTERED if n not in allowed]
    assert not missing, missing


def test_without_torchao_imported_the_load_is_refused_and_imports_nothing(tmp_path):
    p = tmp_path / "q.safetensors"
    torch.save(_quantized(Int8WeightOnlyConfig, 0).state_dict(), p, format="safetensors")
    script = textwrap.dedent(
        f"""
        import sys, torch, torch_safetensors as ts
        try:
            torch.load({str(p)!r})
        except ts.SafetensorError as e:
            print("CODE", e.code)
            print("MSG", e)
        print("IMPORTED", sorted(m for m in sys.modules if m.startswith("torchao")))
        print("PLAIN", sorted(ts.load_file({str(p)!r})))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "CODE not_allowed" in out.stdout, out.stdout + out.stderr
    assert "torchao.quantization.Int8Tensor" in out.stdout
    assert "IMPORTED []" in out.stdout
    assert "'0.weight.qdata'" in out.stdout  # the flat reader still gives every tensor


# ---- low-bit optimizers: checkpointed by an unchanged training loop ----

TRAIN = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("ignore")
    import torch, torchao.optim
    opt_name, phase, ckpt, out = sys.argv[1:]
    Opt = getattr(torchao.optim, opt_name)

    def setup():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
        return m, Opt(m.parameters(), lr=1e-2)

    def step(m, opt, i):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
        loss = torch.nn.functional.mse_loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    if phase == "first" and out != "-":  # the uninterrupted run, for reference
        m, opt = setup()
        for i in range(6):
            step(m, opt, i)
        torch.save([p.detach() for p in m.parameters()], out)
    m, opt = setup()
    start = 0
    if phase == "resume":
        ck = torch.load(ckpt)
        m.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        start = ck["step"]
    for i in range(start, 3 if phase == "first" else 6):  # the loop, unchanged by the format
        step(m, opt, i)
    if phase == "first":
        torch.save({"model": m.state_dict(), "optim": opt.state_dict(), "step": 3}, ckpt)
        print("STATE", sorted(type(v).__name__ for v in opt.state_dict()["state"][0].values()))
    else:
        torch.save([p.detach() for p in m.parameters()], out)
    """
)


def _train(tmp_path, opt_name, phase, ckpt, out, fmt):
    env = dict(os.environ)
    env.pop("TORCH_SAFETENSORS_FORMAT", None)
    env.pop("TORCH_SAFETENSORS_FALLBACK", None)
    if fmt:
        env["TORCH_SAFETENSORS_FORMAT"] = fmt
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    r = subprocess.run([sys.executable, str(script), opt_name, phase, str(ckpt), str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("opt_name, state_cls", [("AdamW8bit", "OptimState8bit"), ("AdamW4bit", "OptimState4bit")])
def test_low_bit_optimizer_resumes_bit_exact(tmp_path, opt_name, state_cls):
    full = tmp_path / "full.pt"
    finals = {}
    for fmt in ("safetensors", None):
        ckpt = tmp_path / f"ckpt-{fmt}.pt"  # the loop's own name: the format comes from the environment
        out = _train(tmp_path, opt_name, "first", ckpt, full if fmt else "-", fmt)
        assert f"'{state_cls}'" in out
        head = ckpt.read_bytes()[:2]
        assert (head != b"PK") if fmt else (head == b"PK")
        if fmt:
            with ts.safe_open(str(ckpt), "pt") as f:
                names = list(f.keys())
            assert any(n.startswith("optim.state.0.exp_avg.") for n in names), names
        final = tmp_path / f"final-{fmt}.pt"
        _train(tmp_path, opt_name, "resume", ckpt, final, fmt)
        finals[fmt] = torch.load(final)
    reference = torch.load(full)
    for fmt, params in finals.items():
        assert len(params) == len(reference)
        for a, b in zip(params, reference):
            assert torch.equal(a, b), fmt
