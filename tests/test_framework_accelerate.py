"""accelerate's Accelerator.save_state / load_state with the default format switched to
safetensors and no change to its code: optimizer, scheduler and random_states_0.pkl are
safetensors, and load_state restores everything exactly (the RNG streams too, which
accelerate would otherwise skip silently: it ignores any error while loading them)."""
from __future__ import annotations

import random

import pytest
import torch

import torch_safetensors  # noqa: F401 - installs the torch.save/torch.load wrappers
from conftest import is_safetensors_file

accelerate = pytest.importorskip("accelerate")
np = pytest.importorskip("numpy")

TORCH_SAVED = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")


pytestmark = pytest.mark.usefixtures("environment_restored")


def _setup():
    accelerate.utils.set_seed(0)
    acc = accelerate.Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model, opt, sched = acc.prepare(model, opt, sched)
    return acc, model, opt, sched


def _step(acc, model, opt, sched):
    x = torch.randn(8, 4)
    noise = float(np.random.rand()) + random.random()
    loss = (model(x) - noise).pow(2).mean()
    acc.backward(loss)
    opt.step()
    sched.step()
    opt.zero_grad()


def _run(out):
    """Two steps, save_state, two more steps; then a fresh setup perturbed by other
    steps, load_state, two steps. Returns (the weights both ways, the RNG draws right
    after save_state and right after load_state)."""
    acc, model, opt, sched = _setup()
    for _ in range(2):
        _step(acc, model, opt, sched)
    acc.save_state(str(out))
    draws_after_save = (random.random(), float(np.random.rand()), torch.rand(2))
    # restore the streams the draws used, then continue
    acc.load_state(str(out))
    for _ in range(2):
        _step(acc, model, opt, sched)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    acc, model, opt, sched = _setup()
    for _ in range(3):
        _step(acc, model, opt, sched)  # a different state to overwrite
    acc.load_state(str(out))
    draws_after_load = (random.random(), float(np.random.rand()), torch.rand(2))
    acc.load_state(str(out))
    assert opt.state_dict()["param_groups"][0]["lr"] == sched.get_last_lr()[0] == 1e-2 * 0.25
    for _ in range(2):
        _step(acc, model, opt, sched)
    resumed = {k: v.clone() for k, v in model.state_dict().items()}
    return straight, resumed, draws_after_save, draws_after_load


def _same_draws(a, b):
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_save_state_is_safetensors_and_load_state_is_exact(tmp_path, default_format):
    default_format("pickle")
    p_straight, p_resumed, p_saved, p_loaded = _run(tmp_path / "pickle")
    for name in TORCH_SAVED:
        assert not is_safetensors_file(tmp_path / "pickle" / name), name

    default_format("safetensors")  # unstorable values raise: no silent pickle
    straight, resumed, saved, loaded = _run(tmp_path / "st")
    for name in (*TORCH_SAVED, "model.safetensors"):
        assert is_safetensors_file(tmp_path / "st" / name), name

    _same_draws(loaded, saved)  # random, numpy and torch streams restored
    _same_draws(loaded, p_loaded)
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k
        assert torch.equal(resumed[k], p_resumed[k]), k
        assert torch.equal(straight[k], p_straight[k]), k


def test_random_states_file_holds_the_rng_states(tmp_path, default_format):
    default_format("safetensors")
    acc, model, opt, sched = _setup()
    _step(acc, model, opt, sched)
    acc.save_state(str(tmp_path))
    want = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    states = torch.load(tmp_path / "random_states_0.pkl")  # no allowlist: data only
    assert states["random_state"] == want[0]
    got_np = states["numpy_random_seed"]
    assert got_np[0] == want[1][0] and (got_np[1] == want[1][1]).all() and tuple(got_np[2:]) == tuple(want[1][2:])
    assert torch.equal(states["torch_manual_seed"], want[2])
    assert states["step"] == acc.step


def test_grad_scaler_stateis_safetensors_file(tmp_path, default_format):
    default_format("safetensors")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    torch.save(scaler.state_dict(), tmp_path / "scaler.pt")  # as both frameworks do
    assert is_safetensors_file(tmp_path / "scaler.pt")
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(torch.load(tmp_path / "scaler.pt"))
    assert fresh.state_dict() == scaler.state_dict()
