"""Lightning's ModelCheckpoint, with last.ckpt always holding the newest state.

With `save_top_k` and `save_last: true`, Lightning 2.6 rewrites last.ckpt only at a validation
where it also wrote a top-k file, i.e. when the monitored value improved. After a run whose
val/loss stopped improving, last.ckpt held an older step than the run ended at, and eval.py,
generate.py and a resume from it silently used older weights. Here last.ckpt is also written at
every other validation and once more when training ends (a run whose length is not a multiple of
trainer.val_check_interval ends between validations).
"""

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class ModelCheckpoint(LightningModelCheckpoint):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_written_step: int | None = None  # the global step last.ckpt holds

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _refresh_last(self, trainer: L.Trainer) -> None:
        stale = self.save_last and self._last_written_step != trainer.global_step
        # The same conditions under which Lightning saves at all: not in fast_dev_run (checkpoints
        # are off there), not in the sanity check, only while fitting.
        if stale and not trainer.fast_dev_run and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # top-k, and last.ckpt when it saved one
        self._refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)
