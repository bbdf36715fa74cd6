"""transformers' Trainer with the default format switched to safetensors and no change to
its code: every file it writes with torch.save is safetensors, and resuming from those
checkpoints continues exactly as resuming from pickle ones. A tiny random Llama built
from a config, on CPU, offline."""
from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import torch_safetensors as ts  # noqa: E402
from conftest import is_safetensors_file  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

# what the Trainer writes with torch.save into a checkpoint (CPU, no fp16: no scaler.pt)
TORCH_SAVED = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")


pytestmark = pytest.mark.usefixtures("environment_restored")


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        attention_dropout=0.1,  # so the restored RNG state matters
    )
    return transformers.LlamaForCausalLM(config)


def _data():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": x, "labels": x} for x in torch.randint(0, 64, (16, 8), generator=g)]


def _trainer(out, max_steps):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=2, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        logging_steps=1000, dataloader_num_workers=0,
    )
    return transformers.Trainer(model=_model(), args=args, train_dataset=_data())


def _train_then_resume(out):
    """Trains 4 steps (checkpoints at 2 and 4), then resumes a fresh Trainer from the
    step-2 checkpoint to step 4. Returns (uninterrupted weights, resumed weights)."""
    first = _trainer(out, 4)
    first.train()
    straight = {k: v.detach().clone() for k, v in first.model.state_dict().items()}
    second = _trainer(out / "resumed", 4)
    second.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    return straight, {k: v.detach().clone() for k, v in second.model.state_dict().items()}


def _bitwise_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(-1).view(torch.uint8),
                                                       b[k].view(-1).view(torch.uint8)), k


def test_trainer_checkpoints_are_safetensors_and_resume_exactly(tmp_path, default_format):
    default_format("pickle")
    _, from_pickle = _train_then_resume(tmp_path / "pickle")
    for name in TORCH_SAVED:
        assert not is_safetensors_file(tmp_path / "pickle" / "checkpoint-2" / name), name

    default_format("safetensors")  # unstorable values raise: no silent pickle
    straight, from_st = _train_then_resume(tmp_path / "st")
    for step in (2, 4):
        ckpt = tmp_path / "st" / f"checkpoint-{step}"
        for name in TORCH_SAVED:
            assert is_safetensors_file(ckpt / name), (step, name)
        assert is_safetensors_file(ckpt / "model.safetensors")
    for name in TORCH_SAVED:  # the resumed run's own checkpoint
        assert is_safetensors_file(tmp_path / "st" / "resumed" / "checkpoint-4" / name), name

    _bitwise_equal(from_st, from_pickle)
    _bitwise_equal(from_st, straight)  # and resuming loses nothing


def test_trainer_rng_state_and_args_load_back(tmp_path, default_format):
    default_format("safetensors")
    trainer = _trainer(tmp_path, 2)
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    rng = torch.load(ckpt / "rng_state.pth")  # data only: no allowlist needed
    np = pytest.importorskip("numpy")
    assert set(rng) >= {"python", "numpy", "cpu"}
    state = np.random.get_state()
    np.random.set_state(rng["numpy"])
    want = np.random.random_sample(3)
    np.random.set_state(rng["numpy"])
    assert (np.random.random_sample(3) == want).all()
    np.random.set_state(state)
    import random

    saved = random.getstate()
    random.setstate(rng["python"])
    want = [random.random() for _ in range(3)]
    random.setstate(rng["python"])
    assert [random.random() for _ in range(3)] == want
    random.setstate(saved)
    assert isinstance(rng["cpu"], torch.Tensor) and rng["cpu"].dtype == torch.uint8

    # TrainingArguments is a class: rebuilt only when the user allows it
    with pytest.raises(ts.SafetensorError, match="TrainingArguments"):
        torch.load(ckpt / "training_args.bin")
    allow = _training_args_globals(trainer.args)
    with torch.serialization.safe_globals(allow[1:]):  # one class short: still refused
        with pytest.raises(ts.SafetensorError, match=allow[0].__qualname__):
            torch.load(ckpt / "training_args.bin")
    with torch.serialization.safe_globals(allow):
        args = torch.load(ckpt / "training_args.bin")
    assert type(args) is transformers.TrainingArguments
    assert args.save_steps == 2 and args.learning_rate == 1e-2 and args.output_dir == str(tmp_path)
    assert args.to_dict() == trainer.args.to_dict()
    # a caller who trusts the file needs no list, as with pickle
    assert torch.load(ckpt / "training_args.bin", weights_only=False).to_dict() == trainer.args.to_dict()


def _training_args_globals(args):
    """What a user allowlists to read training_args.bin back: every class among the
    values it holds (transformers 5.24 with accelerate 1.15: TrainingArguments,
    AcceleratorConfig, the enums IntervalStrategy, SaveStrategy, HubStrategy,
    SchedulerType, OptimizerNames, DistributedType, and accelerate's PartialState,
    which TrainingArguments caches once the device is set up)."""
    import enum

    found = set()

    def walk(value):
        kind = type(value)
        if isinstance(value, enum.Enum):
            found.add(kind)
        elif kind.__module__.split(".")[0] in ("transformers", "accelerate") and hasattr(value, "__dict__"):
            if kind not in found:
                found.add(kind)
                for v in vars(value).values():
                    walk(v)
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    walk(args)
    return sorted(found, key=lambda c: c.__qualname__)
