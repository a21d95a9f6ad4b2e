"""Non-finite losses: stop the run naming the step and the loss parts, or skip the step and count it.

The losses of every micro-batch of an optimizer step are checked before the optimizer touches the
weights (one host sync per optimizer step, and with several ranks one tiny all-reduce before it,
so that all ranks decide alike). `stop` raises before the step: the weights and the checkpoints on disk
are the last good ones. `skip` drops the step's gradients (the optimizer then leaves every
weight and moment as it was; the step counter and LR schedule move on), logs
`train/skipped_steps`, and stops once more than `max_skips` steps were skipped.
"""

import logging
from typing import Any

import lightning as L
import torch

from ..errors import ConfigError, NonFiniteLossError

log = logging.getLogger(__name__)

ACTIONS = ("stop", "skip")


class NonFiniteLoss(L.Callback):
    def __init__(self, action: str = "stop", max_skips: int = 10) -> None:
        if action not in ACTIONS:
            raise ConfigError(f"callbacks.non_finite.action={action!r}; expected one of {list(ACTIONS)}")
        if max_skips < 0:
            raise ConfigError(f"callbacks.non_finite.max_skips must be >= 0, got {max_skips}")
        self.action, self.max_skips = action, max_skips
        self.skipped = 0
        self._losses: list[torch.Tensor] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.action == "skip" and type(trainer.strategy).__name__ == "DeepSpeedStrategy":
            raise ConfigError(
                "callbacks.non_finite.action=skip cannot drop a step under DeepSpeed (it keeps the gradients "
                "in its own buffers); use action=stop"
            )

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        losses, self._losses = self._losses, []
        if losses and any_non_finite(losses, trainer.world_size):
            self._non_finite(trainer, optimizer)
        if self.action == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped))

    def _non_finite(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step + 1  # the step being taken, counted from 1
        parts = (
            ", ".join(
                f"{k}={float(v):.4g}"
                for k, v in sorted(trainer.callback_metrics.items())
                if k.startswith("train/") and k != "train/skipped_steps" and v.numel() == 1
            )
            or "train/loss not logged"
        )
        if self.action == "skip" and self.skipped < self.max_skips:
            optimizer.zero_grad(set_to_none=True)  # no gradients: the optimizer changes nothing
            self.skipped += 1
            log.warning("non-finite loss in step %d (%s): step skipped (%d skipped so far)", step, parts, self.skipped)
            return
        ckpt = trainer.checkpoint_callback
        last = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
        skipped = f" after skipping {self.skipped} steps (callbacks.non_finite.max_skips)" if self.skipped else ""
        raise NonFiniteLossError(
            f"non-finite loss in step {step}{skipped}: {parts}; training stopped before the step changed the "
            f"weights and {kept}. Lower model.optimizer.lr, check the data, or set callbacks.non_finite.action=skip"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict.get("skipped", 0)


def any_non_finite(losses: list[torch.Tensor], world_size: int) -> bool:
    """Whether any of these losses, on any rank, is inf or NaN: one flag on the device, all-reduced
    (max) across ranks, then read once. (Lightning's reduce_boolean_decision adds a barrier and a
    second read to every step.)"""
    flag = (~torch.isfinite(torch.stack(losses)).all()).to(torch.int32)
    if world_size > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
