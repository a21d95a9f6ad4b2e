"""callbacks/progress.py: the progress bar reads the logged metrics (a host sync each) every N steps."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from {{cookiecutter.package}}.callbacks.progress import ProgressBar


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train/loss", loss, prog_bar=True)
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
