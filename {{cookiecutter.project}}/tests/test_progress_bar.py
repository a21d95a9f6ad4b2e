"""callbacks/progress.py: the progress bar reads the logged metrics (a host sync each) every N steps."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from {{cookiecutter.package}}.callbacks.progress import LogProgress, ProgressBar


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train/loss", loss)  # as the project's modules: no prog_bar, which would read it every step
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def reads_in_20_steps(bar: RichProgressBar, monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict]:
    reads = []
    read = RichProgressBar.get_metrics

    def counted(self: RichProgressBar, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        reads.append(trainer.global_step)
        return read(self, trainer, pl_module)

    monkeypatch.setattr(RichProgressBar, "get_metrics", counted)
    data = DataLoader(TensorDataset(torch.randn(80, 4), torch.randn(80, 1)), batch_size=4)  # 20 batches
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=20,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(), data)
    return len(reads), bar.get_metrics(trainer, trainer.lightning_module)


def test_metrics_are_read_every_n_steps_not_every_step(monkeypatch):
    plain, _ = reads_in_20_steps(RichProgressBar(), monkeypatch)
    ours, shown = reads_in_20_steps(ProgressBar(metrics_every=5), monkeypatch)
    assert plain >= 20  # Lightning's bar: every batch
    assert ours <= 1 + 20 // 5 + 1  # the first batch, steps 5, 10, 15, 20, and the epoch's end
    assert "train/loss" in shown


def test_metrics_every_must_be_positive():
    with pytest.raises(ValueError, match="metrics_every must be at least 1"):
        ProgressBar(metrics_every=0)


@pytest.mark.parametrize("max_epochs, expected", [(-1, "Epoch 4"), (None, "Epoch 4"), (10, "Epoch 4/9")])
def test_the_bar_names_the_epoch_without_a_negative_total(max_epochs, expected):
    """A run whose length is trainer.max_steps has max_epochs -1 (no epoch limit): Lightning's bar
    then read "Epoch 4/-2"."""
    bar = ProgressBar()
    trainer = L.Trainer(accelerator="cpu", max_steps=10, max_epochs=max_epochs, callbacks=[bar], logger=False)
    bar.setup(trainer, Regression(), stage="fit")
    description = bar._get_train_description(4)
    assert description.strip() == expected
    if max_epochs == -1:
        assert RichProgressBar._get_train_description(bar, 4).strip() == "Epoch 4/-2"  # Lightning's own


def test_progress_lines_go_to_the_log_every_n_steps(caplog):
    log_progress = LogProgress(every_n_steps=5)
    data = DataLoader(TensorDataset(torch.randn(80, 4), torch.randn(80, 1)), batch_size=4)  # 20 batches
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=20,
        callbacks=[log_progress],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    with caplog.at_level("INFO", logger="{{cookiecutter.package}}.progress"):
        trainer.fit(Regression(), data)
    lines = [r.getMessage() for r in caplog.records if r.name == "{{cookiecutter.package}}.progress"]
    assert [line.split(" |")[0].split(" (ETA")[0] for line in lines] == [f"step {s}/20" for s in (5, 10, 15, 20)]
    assert all("train/loss" in line and "| epoch 0 |" in line for line in lines)
