"""Logs throughput (tokens/s or samples/s), model FLOP utilisation and peak GPU memory.

The LightningModule reports its work per batch through `count_work(batch) -> (items, flops)` and
names the unit in `work_unit`. Times are host clocks over a window of steps, synchronised with the
GPU only at the window's ends, so the callback adds no per-step host sync.
"""

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops

# Dense (no sparsity) peak TFLOP/s by device name, for the datasheet numbers Lightning's table lacks
# or names differently ("NVIDIA H200" is not in it). Order matters: first substring match wins.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("h200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 66.9}),
    ("h100 pcie", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("h100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 66.9}),
    ("a100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def precision_dtype(precision: str) -> str:
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device at this precision, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name, kind = torch.cuda.get_device_name(device).lower(), precision_dtype(precision)
    for key, table in PEAK_TFLOPS:
        if key in name:
            return table[kind] * 1e12
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32}[kind]
    return get_available_flops(device, dtype)


class Throughput(L.Callback):
    def __init__(self, log_every_n_steps: int = 50) -> None:
        self.every = log_every_n_steps
        self._start: float | None = None
        self._items = 0
        self._flops = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        items, flops = pl_module.count_work(batch)
        self._items += items
        self._flops += flops
        if (batch_idx + 1) % self.every:
            return
        self._sync(pl_module)
        elapsed = time.perf_counter() - self._start
        world = trainer.world_size
        unit = pl_module.work_unit
        metrics = {
            f"perf/{unit}_per_sec": self._items * world / elapsed,  # global, all devices
            f"perf/{unit}_per_sec_per_device": self._items / elapsed,
        }
        peak = peak_flops(pl_module.device, str(trainer.precision))
        if peak:
            metrics["perf/mfu"] = self._flops / elapsed / peak
        if pl_module.device.type == "cuda":
            metrics["perf/max_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True)
        self._start, self._items, self._flops = time.perf_counter(), 0, 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = None  # validation time is not training throughput
        self._items, self._flops = 0, 0.0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
