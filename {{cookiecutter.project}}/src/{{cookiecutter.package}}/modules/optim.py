"""AdamW with weight decay on matrices only, and a linear-warmup + cosine learning-rate schedule."""

import math
from collections.abc import Iterable
from typing import Any

import torch


def build_adamw(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """Decay only tensors with >= 2 dims (matmul weights, embeddings); biases and norm gains keep
    their scale. `fused=None` picks the fused CUDA kernel when every parameter is on a GPU."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters reach the optimizer")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    if fused is None:
        fused = all(p.is_cuda for p in params)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: 0 -> 1 linearly over warmup_steps, then cosine down to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def configure_adamw_cosine(
    module: Any, params: Iterable[torch.nn.Parameter], optimizer: dict[str, Any], scheduler: dict[str, Any]
) -> dict[str, Any]:
    """What a LightningModule's configure_optimizers returns, stepping the schedule every optimizer step."""
    opt = build_adamw(params, **optimizer)
    total = scheduler.get("total_steps") or module.trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError("the LR schedule needs a length: set trainer.max_steps or model.scheduler.total_steps")
    warmup, min_ratio = scheduler.get("warmup_steps", 0), scheduler.get("min_lr_ratio", 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, int(total), min_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
