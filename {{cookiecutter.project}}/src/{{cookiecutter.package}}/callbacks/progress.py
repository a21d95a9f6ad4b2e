"""The progress bar, without a host sync in every training step.

Lightning's rich progress bar reads the logged metrics after every batch, and reading them turns
each tensor (the loss) into a Python number: the CPU waits there for the GPU to finish the step,
so it cannot queue the next step's kernels while the GPU works. This bar reads them every
`metrics_every` optimizer steps and shows the last values in between; the bar itself still moves
every batch.
"""

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    def __init__(self, metrics_every: int = 10, **kwargs: Any) -> None:
        if metrics_every < 1:
            raise ValueError(f"callbacks.progress_bar.metrics_every must be at least 1, got {metrics_every}")
        super().__init__(**kwargs)
        self.metrics_every = metrics_every
        self._shown: dict[str, Any] | None = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        stale = self._shown is None or not trainer.training or trainer.global_step % self.metrics_every == 0
        if stale:  # outside training steps (validation, epoch ends) always read afresh
            self._shown = super().get_metrics(trainer, pl_module)
        return self._shown
