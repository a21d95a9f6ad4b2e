"""The progress bar, without a host sync in every training step; progress lines for the run's log file.

Lightning turns every metric logged with `prog_bar=True` into a Python number after every batch
(whether a bar is shown or not): the CPU waits there for the GPU to finish the step, so it cannot
queue the next step's kernels while the GPU works. So the modules log their training losses
without `prog_bar`, and this bar reads the ones named in `show` from the callback metrics every
`metrics_every` optimizer steps, showing the last values in between; the bar itself still moves
every batch.
"""

import logging
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    def __init__(self, metrics_every: int = 10, show: Sequence[str] = ("train/loss",), **kwargs: Any) -> None:
        if metrics_every < 1:
            raise ValueError(f"callbacks.progress_bar.metrics_every must be at least 1, got {metrics_every}")
        super().__init__(**kwargs)
        self.metrics_every, self.show = metrics_every, tuple(show)
        self._shown: dict[str, Any] | None = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        stale = self._shown is None or not trainer.training or trainer.global_step % self.metrics_every == 0
        if stale:  # outside training steps (validation, epoch ends) always read afresh
            logged = trainer.callback_metrics
            shown = {k: float(logged[k]) for k in self.show if k in logged and logged[k].numel() == 1}
            self._shown = {**super().get_metrics(trainer, pl_module), **shown}
        return self._shown

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning writes "Epoch 4/{max_epochs - 1}": "Epoch 4/-2" when the run's length is
        # trainer.max_steps (max_epochs -1: no epoch limit). Then the epoch stands alone.
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch}".ljust(len(self.validation_description))


class LogProgress(L.Callback):
    """Every `every_n_steps` optimizer steps, one line to the `<package>.progress` logger: step,
    epoch, the latest logged metrics and the time left. configs/hydra/default.yaml sends that logger
    to the run's log file only, so the file shows how training goes while the terminal keeps the bar.
    Reading the metrics syncs with the GPU, so not every step."""

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.log_progress.every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.progress_log = logging.getLogger(__name__.rsplit(".", 2)[0] + ".progress")
        self._start: tuple[float, int] | None = None  # (time, step) when fitting started

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or not trainer.is_global_zero or self._start is None:
            return
        if getattr(self, "_logged_step", None) == step:  # gradient accumulation: several batches per step
            return
        self._logged_step = step
        metrics = " ".join(f"{k} {float(v):.4g}" for k, v in sorted(trainer.callback_metrics.items()) if v.numel() == 1)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        line = f"step {step}/{total}" if total else f"step {step}"
        elapsed, done = time.monotonic() - self._start[0], step - self._start[1]
        if total and done > 0:
            line += f" (ETA {(total - step) * elapsed / done:.0f} s)"
        self.progress_log.info("%s | epoch %d | %s", line, trainer.current_epoch, metrics)
