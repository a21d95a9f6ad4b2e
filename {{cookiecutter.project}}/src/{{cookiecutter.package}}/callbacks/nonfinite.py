"""Non-finite losses: stop the run naming the step and the loss parts, or skip the step and count it.

The losses of every micro-batch of an optimizer step are checked on the device, and with several
ranks the flag is all-reduced (max) so that every rank decides alike. `stop` ends the run before
the bad step has changed the weights, with the checkpoints on disk the last good ones; `skip`
leaves every weight and moment as it was (the step counter and LR schedule move on), logs
`train/skipped_steps`, and stops once more than `max_skips` steps were skipped.

Without a host sync in the step, with torch's fused optimizers (AdamW, Adam, SGD with
`fused=True`, the default on GPUs): the flag goes to the optimizer as `found_inf`, GradScaler's
mechanism, so a bad step changes nothing on the device, and the host reads the flag one step later
(long since computed), or before any checkpoint is written and when training ends. Other
optimizers (DeepSpeed's, fp16 with a GradScaler, CPU runs) read it before the step: one host sync
per optimizer step, which lets the GPU run dry while the CPU launches the optimizer step.
"""

import logging
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from ..errors import ConfigError, NonFiniteLossError

log = logging.getLogger(__name__)

ACTIONS = ("stop", "skip")


@dataclass
class _Flag:
    """One optimizer step's flag, on its way to the host: read it once `ready` has passed."""

    step: int  # counted from 1
    host: torch.Tensor
    ready: torch.cuda.Event | None
    parts: dict[str, torch.Tensor]  # the step's logged train/ values, not yet read

    def read(self) -> bool:
        if self.ready is not None:
            self.ready.synchronize()  # waits for this step's flag only, not for the steps queued after it
        return bool(self.host.item())


class NonFiniteLoss(L.Callback):
    def __init__(self, action: str = "stop", max_skips: int = 10) -> None:
        if action not in ACTIONS:
            raise ConfigError(f"callbacks.non_finite.action={action!r}; expected one of {list(ACTIONS)}")
        if max_skips < 0:
            raise ConfigError(f"callbacks.non_finite.max_skips must be >= 0, got {max_skips}")
        self.action, self.max_skips = action, max_skips
        self.skipped = 0
        self._losses: list[torch.Tensor] = []
        self._pending: _Flag | None = None

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
        if losses:
            step = trainer.global_step + 1  # the step being taken, counted from 1
            flag = non_finite_flag(losses, trainer.world_size)
            if skips_on_device(optimizer, trainer):
                optimizer.found_inf = flag.float()  # 1: the fused kernel leaves weights, moments and counts
                self._check_pending(trainer)  # the previous step's flag
                self._pending = _send_to_host(flag, step, train_parts(trainer))
            elif flag.item():
                self._non_finite(trainer, step, train_parts(trainer))
                optimizer.zero_grad(set_to_none=True)  # skipped: no gradients, the optimizer changes nothing
        if self.action == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._check_pending(trainer)  # raises before a checkpoint of a bad step is written
        if self.state_key in checkpoint.get("callbacks", {}):
            checkpoint["callbacks"][self.state_key] = self.state_dict()  # the count includes that step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            self._check_pending(trainer)
        finally:
            _release_found_inf(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._pending = None
        _release_found_inf(trainer)

    def _check_pending(self, trainer: L.Trainer) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and pending.read():
            self._non_finite(trainer, pending.step, pending.parts)

    def _non_finite(self, trainer: L.Trainer, step: int, parts: dict[str, torch.Tensor]) -> None:
        """Count a skipped step, or raise NonFiniteLossError (the step's weights are unchanged either way)."""
        named = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(parts.items())) or "train/loss not logged"
        if self.action == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            log.warning("non-finite loss in step %d (%s): step skipped (%d skipped so far)", step, named, self.skipped)
            return
        ckpt = trainer.checkpoint_callback
        last = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
        skipped = f" after skipping {self.skipped} steps (callbacks.non_finite.max_skips)" if self.skipped else ""
        raise NonFiniteLossError(
            f"non-finite loss in step {step}{skipped}: {named}; training stopped before the step changed the "
            f"weights and {kept}. Lower model.optimizer.lr, check the data, or set callbacks.non_finite.action=skip"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict.get("skipped", 0)


def non_finite_flag(losses: list[torch.Tensor], world_size: int) -> torch.Tensor:
    """1 (int32, on the losses' device) when any of these losses, on any rank, is inf or NaN, else 0:
    all-reduced (max) across ranks on the device, nothing read on the host. (Lightning's
    reduce_boolean_decision adds a barrier and two host reads.)"""
    flag = (~torch.isfinite(torch.stack(losses)).all()).to(torch.int32)
    if world_size > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag


def skips_on_device(optimizer: torch.optim.Optimizer, trainer: L.Trainer) -> bool:
    """Whether this optimizer's step skips itself on the device when given `found_inf` = 1: torch's
    fused Adam(W) and SGD do, unless a GradScaler (fp16) sets that flag itself."""
    fused = isinstance(optimizer, torch.optim.Adam | torch.optim.SGD) and optimizer.defaults.get("fused")
    return bool(fused) and getattr(trainer.precision_plugin, "scaler", None) is None


def train_parts(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """The logged scalar train/ values of the step in progress (tensors: nothing is read here)."""
    return {
        k: v
        for k, v in trainer.callback_metrics.items()
        if k.startswith("train/") and k != "train/skipped_steps" and v.numel() == 1
    }


def _release_found_inf(trainer: L.Trainer) -> None:
    """The run is over: its optimizers step unflagged again (GradScaler sets and removes its own)."""
    for optimizer in trainer.optimizers:
        optimizer.__dict__.pop("found_inf", None)


def _send_to_host(flag: torch.Tensor, step: int, parts: dict[str, torch.Tensor]) -> _Flag:
    if flag.device.type != "cuda":
        return _Flag(step, flag, None, parts)
    host = flag.to("cpu", non_blocking=True)  # into pinned memory, in stream order
    ready = torch.cuda.Event()
    ready.record()
    return _Flag(step, host, ready, parts)
