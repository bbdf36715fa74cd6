"""Lightning with the default format switched to safetensors and no change to its code:
ModelCheckpoint writes .ckpt files that are safetensors (Lightning saves into a BytesIO
first), fit(ckpt_path=...) resumes exactly, and load_from_checkpoint rebuilds a module
whose save_hyperparameters() hold a Path and a torch.dtype."""
from __future__ import annotations

import os
import pathlib
import warnings

import pytest
import torch

import torch_safetensors  # noqa: F401 - installs the torch.save/torch.load wrappers
from conftest import is_safetensors_file

pl = pytest.importorskip("lightning.pytorch")


pytestmark = pytest.mark.usefixtures("environment_restored")


@pytest.fixture(autouse=True)
def _global_state_restored():
    """Lightning sets process-wide switches (seed variables, deterministic algorithms):
    none may leak into other tests."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


class TinyModule(pl.LightningModule):
    def __init__(self, data_dir: pathlib.Path, dtype: torch.dtype = torch.float32, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x.to(self.hparams.dtype)), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    def train_dataloader(self):
        g = torch.Generator().manual_seed(3)
        ds = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
        return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(4))


def _trainer(out, max_epochs):
    return pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(out),
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(out), save_top_k=-1, every_n_epochs=1)],
    )


def _module(out):
    pl.seed_everything(0, verbose=False)
    return TinyModule(data_dir=pathlib.Path(out) / "data", dtype=torch.float32)


def _fit_then_resume(out):
    """3 epochs (a checkpoint per epoch); then a fresh module resumed from epoch 0's
    checkpoint to epoch 3. Returns (uninterrupted weights, resumed weights)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and logging
        model = _module(out)
        _trainer(out, 3).fit(model)
        straight = {k: v.clone() for k, v in model.state_dict().items()}
        resumed = _module(out)
        _trainer(out / "resumed", 3).fit(resumed, ckpt_path=str(out / "epoch=0-step=4.ckpt"))
    return straight, {k: v.clone() for k, v in resumed.state_dict().items()}


def test_checkpoints_are_safetensors_and_resume_exactly(tmp_path, default_format):
    default_format("pickle")
    # torch's weights_only loader refuses a pickled Path: the pickle baseline needs it allowlisted
    with torch.serialization.safe_globals([type(pathlib.Path())]):
        p_straight, p_resumed = _fit_then_resume(tmp_path / "pickle")
    assert not is_safetensors_file(tmp_path / "pickle" / "epoch=0-step=4.ckpt")

    default_format("safetensors")  # unstorable values raise: no silent pickle
    straight, resumed = _fit_then_resume(tmp_path / "st")
    ckpts = sorted(p.name for p in (tmp_path / "st").glob("*.ckpt"))
    assert ckpts == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt"]
    for name in ckpts:
        assert is_safetensors_file(tmp_path / "st" / name), name
    # Lightning does not checkpoint the global RNG (dropout, shuffling), so a resumed run
    # differs from an uninterrupted one; it must equal the run resumed from pickle
    for k in straight:
        assert torch.equal(resumed[k], p_resumed[k]), k
        assert torch.equal(straight[k], p_straight[k]), k
    assert any(not torch.equal(resumed[k], _module(tmp_path).state_dict()[k]) for k in resumed)


def test_load_from_checkpoint_with_path_and_dtype_hyperparameters(tmp_path, default_format):
    default_format("safetensors")
    model = _module(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, 1).fit(model)
    path = tmp_path / "epoch=0-step=4.ckpt"
    assert is_safetensors_file(path)
    ck = torch.load(path)  # the whole checkpoint, no allowlist
    assert ck["hyper_parameters"] == {"data_dir": tmp_path / "data", "dtype": torch.float32, "lr": 0.05}
    assert ck["epoch"] == 0 and ck["global_step"] == 4

    loaded = TinyModule.load_from_checkpoint(path)
    assert loaded.hparams.data_dir == tmp_path / "data"
    assert isinstance(loaded.hparams.data_dir, pathlib.PurePath)
    assert loaded.hparams.dtype is torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert os.path.getsize(path) > 0
