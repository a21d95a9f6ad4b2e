"""LightningModule for next-token language modelling with the GPT in models/gpt.py."""

from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from ..models.gpt import GPT, GPTConfig
from ..parallel import compile_units
from .optim import configure_adamw_cosine

DEFAULT_OPTIMIZER = {"lr": 6e-4, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8, "fused": False}
DEFAULT_SCHEDULER = {"warmup_steps": 100, "min_lr_ratio": 0.1, "total_steps": None}


class GPTModule(L.LightningModule):
    """Hyperparameters are plain dicts, so checkpoints load with torch.load(weights_only=True).

    net: GPTConfig fields (configs/model/net/*.yaml). optimizer: AdamW settings. scheduler:
    warmup + cosine. compile: torch.compile each transformer block (parallel.compile_units).
    qat: quantization-aware training for a quantize.py method (int8_weight_only, int8_dynamic): the
    Linear layers train through torchao's fake quantization (quantize.prepare_qat).
    """

    work_unit = "tokens"  # what the throughput callback counts

    def __init__(
        self,
        net: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        compile: bool = False,
        qat: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = GPTConfig.from_dict(dict(net))
        self.optimizer_cfg = {**DEFAULT_OPTIMIZER, **(optimizer or {})}
        self.scheduler_cfg = {**DEFAULT_SCHEDULER, **(scheduler or {})}
        self.net: GPT | None = None
        with torch.device("meta"):  # counted once, before any strategy shards or partitions the weights
            self.num_params = GPT(self.config).num_params()
        self.val_loss = MeanMetric()

    def configure_model(self) -> None:
        # Built here, not in __init__, so sharded strategies can create the weights already partitioned.
        if self.net is not None:
            return
        self.net = GPT(self.config)
        if self.hparams.qat:
            from ..quantize import prepare_qat  # torchao is imported only when QAT is asked for

            prepare_qat(self.net, self.hparams.qat)
        if self.hparams.compile:
            compile_units(self.net)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # (B, T), (B, T)
        loss = self.net.loss(x, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        # DeepSpeed moves only the engine's parameters to the GPU; the metric's state must follow.
        self.val_loss.to(self.device)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_loss.update(self.net.loss(x, y), weight=y.numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # token-weighted mean over every rank's batches
        self.val_loss.reset()
        # Already equal on every rank; sync_dist only tells Lightning so (a no-op average).
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", loss.exp(), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        # trainer.model is what the strategy wrapped (DDP, FSDP): its parameters are the ones that train.
        return configure_adamw_cosine(self, self.trainer.model.parameters(), self.optimizer_cfg, self.scheduler_cfg)

    def count_work(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, float]:
        """(tokens in the batch, training FLOPs): 6N per token for the matmuls forward and backward,
        plus 12*L*d*T for attention scores (PaLM appendix B; N excludes the position table)."""
        x, _ = batch
        c = self.config
        flops_per_token = 6 * self.num_params + 12 * c.num_layers * c.d_model * x.shape[1]
        return x.numel(), float(flops_per_token * x.numel())
