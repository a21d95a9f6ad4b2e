"""LightningModule for next-token language modelling with any network that follows the causal-LM
protocol (networks.CausalLM): the GPT in models/gpt.py, or a class of yours chosen by model/net=."""

from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from ..networks import CausalLM, build_causal_lm, compile_units
from .optim import configure_optimizers


class GPTModule(L.LightningModule):
    """Hyperparameters are plain dicts, so checkpoints load with torch.load(weights_only=True) and
    rebuild their network in a fresh process from the `_target_` node alone.

    net: the network's `_target_` node (configs/model/net/*.yaml). optimizer, scheduler: `_partial_`
    nodes (configs/model/optimizer/, configs/model/scheduler/). compile: torch.compile each of the
    network's shard units (networks.compile_units). qat: quantization-aware training for a
    quantize.py method (int8_weight_only, int8_dynamic): the Linear layers train through torchao's
    fake quantization (quantize.prepare_qat).
    """

    work_unit = "tokens"  # what the throughput callback counts
    # The network method every training and validation step runs through: trainer=deepspeed_compile
    # compiles it whole with DeepSpeed's DeepCompile (parallel.compile_with_deepcompile).
    step_entry_points = ("net.loss",)

    def __init__(
        self,
        net: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        compile: bool,
        qat: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: CausalLM | None = None
        with torch.device("meta"):  # checked and counted once, before any strategy shards the weights
            meta = build_causal_lm(net, "model.net")
        self.config = meta.config
        self.flops_per_token = meta.flops_per_token
        self.val_loss = MeanMetric()

    def configure_model(self) -> None:
        # Built here, not in __init__, so sharded strategies can create the weights already partitioned.
        if self.net is not None:
            return
        self.net = build_causal_lm(self.hparams.net, "model.net")
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
        self.log("train/loss", loss)
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
        params = self.trainer.model.parameters()
        return configure_optimizers(self, params, self.hparams.optimizer, self.hparams.scheduler)

    def count_work(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, float]:
        """(tokens in the batch, training FLOPs), from the network's flops_per_token."""
        x, _ = batch
        return x.numel(), float(self.flops_per_token(x.shape[1]) * x.numel())
