"""The optimizer and LR schedule every module shares, built from `_partial_` config nodes
(configs/model/optimizer/, configs/model/scheduler/): weight decay on matrices only, and a
linear-warmup + cosine schedule. A paper's optimizer is its class + one YAML file there."""

import inspect
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import ConfigError
from ..networks import build


def weight_decay_groups(params: Iterable[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """Two parameter groups: tensors with >= 2 dims (matmul weights, embeddings) decay at the
    optimizer's weight_decay; biases and norm gains (1 dim) keep their scale (weight_decay 0)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters reach the optimizer")
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


log = logging.getLogger(__name__)


def build_adamw(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
    loss_scaling: bool = False,
) -> torch.optim.AdamW:
    """Decay only tensors with >= 2 dims (matmul weights, embeddings); biases and norm gains keep
    their scale. `fused=None` picks the fused CUDA kernel when every parameter is on a GPU, unless
    fp16 loss scaling is on (`loss_scaling`: the fused step unscales internally, too late to clip)."""
    groups = weight_decay_groups(params)
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"]) and not loss_scaling
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, fused=fused)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: 0 -> 1 linearly over warmup_steps, then cosine down to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Sets every parameter group's LR to peak_lr * warmup_cosine(step), peak_lr being the
    optimizer's `lr`. It reads the optimizer's groups at each step, so it survives strategies that
    regroup parameters (DeepSpeed ZeRO-3)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float
    ) -> None:
        if warmup_steps < 0 or total_steps <= 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(
                f"warmup_steps={warmup_steps} must be >= 0, total_steps={total_steps} > 0 and "
                f"min_lr_ratio={min_lr_ratio} in [0, 1]"
            )
        self.peak_lr, self.warmup_steps = optimizer.defaults["lr"], warmup_steps
        self.total_steps, self.min_lr_ratio = total_steps, min_lr_ratio
        super().__init__(optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume the checkpoint's schedule wins: its length, warmup, peak and floor. When this
        run's settings (trainer.max_steps, model.scheduler.*, model.optimizer.lr) planned another,
        say so once: the cosine keeps its original shape."""
        planned = {k: getattr(self, k) for k in ("total_steps", "warmup_steps", "peak_lr", "min_lr_ratio")}
        super().load_state_dict(state_dict)
        changed = [f"{k} {state_dict[k]} (this run: {v})" for k, v in planned.items() if state_dict.get(k, v) != v]
        if changed:
            log.warning(
                "resuming keeps the checkpoint's LR schedule: %s; the cosine ends at step %d and the LR stays at "
                "its floor after it; to plan a new schedule, start a new run from these weights instead of resuming",
                ", ".join(changed),
                self.total_steps,
            )

    def get_lr(self) -> list[float]:
        lr = self.peak_lr * warmup_cosine(self.last_epoch, self.warmup_steps, self.total_steps, self.min_lr_ratio)
        return [lr] * len(self.optimizer.param_groups)


def configure_optimizers(
    module: Any, params: Iterable[torch.nn.Parameter], optimizer: Mapping[str, Any], scheduler: Mapping[str, Any]
) -> dict[str, Any]:
    """What a LightningModule's configure_optimizers returns: the `model.optimizer` node called on the
    weight-decay groups of `params` (the wrapped model's: DDP, FSDP), the `model.scheduler` node on
    that optimizer, stepped every optimizer step. `fused: null` picks the fused CUDA kernel when every
    parameter is on a GPU and no fp16 loss scaler runs; `total_steps: null` is the trainer's length."""
    for key, node in (("model.optimizer", optimizer), ("model.scheduler", scheduler)):
        if not node.get("_partial_"):
            raise ConfigError(f"{key} needs `_partial_: true`: it is called later, on the model's parameters")
    groups = weight_decay_groups(params)
    # fp16 keeps a GradScaler; bf16 and fp32 never scale the loss.
    loss_scaling = getattr(module.trainer.precision_plugin, "scaler", None) is not None
    make_optimizer = build(optimizer, "model.optimizer")
    if "fused" in inspect.signature(make_optimizer.func).parameters:
        fused = make_optimizer.keywords.get("fused")
        if fused and loss_scaling and module.trainer.gradient_clip_val:
            raise ConfigError(
                "model.optimizer.fused=true cannot clip gradients (trainer.gradient_clip_val) under fp16 loss "
                "scaling: the fused step unscales them internally. Use model.optimizer.fused=null or bf16"
            )
        if fused is None:
            fused = all(p.is_cuda for g in groups for p in g["params"]) and not loss_scaling
        make_optimizer.keywords["fused"] = fused
    opt = make_optimizer(groups)
    if opt.defaults.get("fused") and not loss_scaling:
        # The fused step announces that it can unscale gradients itself, and Lightning then refuses
        # to clip them under autocast. With no loss scaler nothing is ever scaled, so the flag is moot.
        opt._step_supports_amp_scaling = False
    make_scheduler = build(scheduler, "model.scheduler")
    if "total_steps" in make_scheduler.keywords and make_scheduler.keywords["total_steps"] is None:
        total = module.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError("the LR schedule needs a length: set trainer.max_steps or model.scheduler.total_steps")
        make_scheduler.keywords["total_steps"] = int(total)
    try:
        sched = make_scheduler(opt)
    except ValueError as e:
        raise ConfigError(f"model.scheduler: {e}") from None
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
