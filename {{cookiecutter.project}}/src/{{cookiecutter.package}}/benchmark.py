"""What bench.py does: train a few steps exactly as train.py would, time them, print a table.

Steps are timed with CUDA events on GPUs (host clocks on CPUs) after `warmup` untimed steps, which
absorb torch.compile, cuDNN autotuning and allocator growth. The table reports the median step.
"""

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from .callbacks.throughput import peak_flops
from .training import build_trainer

log = logging.getLogger(__name__)


class StepTimer(L.Callback):
    """Records each training step's duration and work (items, FLOPs) from the module's count_work."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times_ms: list[float] = []
        self.items: list[int] = []
        self.flops: list[float] = []
        self._pending: list[tuple[Any, Any]] = []
        self._t0 = 0.0
        self.device = torch.device("cpu")  # where training ran (Lightning moves the module back after fit)
        self.max_memory_gib: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        if pl_module.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._pending.append((start, None))
        else:
            self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, batch: Any, i: int
    ) -> None:
        timed = i >= self.warmup
        if pl_module.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            start, _ = self._pending.pop()
            if timed:
                self._pending.insert(0, (start, end))  # read after the run: no host sync per step
        elif timed:
            self.times_ms.append((time.perf_counter() - self._t0) * 1e3)
        if timed:
            items, flops = pl_module.count_work(batch)
            self.items.append(items)
            self.flops.append(flops)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.device = pl_module.device
        if self.device.type == "cuda":
            self.max_memory_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self._pending:
            torch.cuda.synchronize()
            self.times_ms = [s.elapsed_time(e) for s, e in reversed(self._pending)]
            self._pending.clear()


def median_step_ms(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Run `step` `steps` times; the median duration in ms. On GPUs each step is bracketed by CUDA
    events on the stream, read once at the end (no host sync inside the loop); elsewhere host clocks."""
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    events = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events)


def check_step_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The shared argument checks of the step benchmarks in benchmarks/: a usable --device, and a
    positive --batch, --seq-len and --steps. Exits through parser.error, naming the argument."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    for name in ("batch", "seq_len", "steps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
{%- if cookiecutter.gpt %}


def add_net_argument(parser: argparse.ArgumentParser, help: str = "configs/model/net/ preset") -> None:
    """The GPT benchmarks' --net argument: a configs/model/net/ preset whose `_target_` is the
    project's GPT, tiny by default (a script builds it with networks.net_preset and build_causal_lm)."""
    from .models.gpt import GPT
    from .networks import net_presets

    parser.add_argument("--net", default="tiny", choices=net_presets(f"{GPT.__module__}.{GPT.__qualname__}"), help=help)
{%- endif %}


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Returns (and logs as a table) median step time, throughput, MFU and peak memory per device."""
    L.seed_everything(cfg.seed)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    timer = StepTimer(cfg.bench.warmup)
    trainer = build_trainer(cfg, max_steps=cfg.bench.warmup + cfg.bench.steps)
    trainer.callbacks.append(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    profiler = None
    if cfg.bench.profile:
        profiler = torch.profiler.profile(
            schedule=torch.profiler.schedule(wait=cfg.bench.warmup, warmup=2, active=5, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(f"{cfg.paths.output_dir}/profile"),
            record_shapes=True,
            with_stack=False,
        )
        trainer.callbacks.append(_ProfilerStep(profiler))
        profiler.start()
    trainer.fit(model, datamodule=datamodule)
    if profiler is not None:
        profiler.stop()
        if trainer.is_global_zero:  # the 5 profiled steps, most expensive first (the trace has the timeline)
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            print(profiler.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60), flush=True)

    step_ms = statistics.median(timer.times_ms)
    items = statistics.median(timer.items)
    flops = statistics.median(timer.flops)
    device = timer.device
    peak = peak_flops(device, str(trainer.precision))
    result = {
        "module": type(model).__name__,
        "params_M": parameter_count(getattr(model, "net", model)) / 1e6,  # the trained network (a student)
        "batch_per_device": cfg.data.batch_size,
        "precision": str(trainer.precision),
        "strategy": type(trainer.strategy).__name__,
        "devices": trainer.world_size,
        "step_ms": step_ms,
        f"{model.work_unit}_per_sec": items * trainer.world_size / (step_ms / 1e3),
        f"{model.work_unit}_per_sec_per_device": items / (step_ms / 1e3),
        "mfu": flops / (step_ms / 1e3) / peak if peak else None,
        "max_memory_GiB": timer.max_memory_gib,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "timed_steps": len(timer.times_ms),
    }
    if trainer.is_global_zero:
        width = max(map(len, result))
        lines = [f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in result.items()]
        print("\n".join(["benchmark", *lines]), flush=True)
    return result


def parameter_count(network: torch.nn.Module) -> int:
    """Parameters of the whole network on any strategy: a DTensor (FSDP2) counts its global shape,
    a ZeRO-3 parameter (DeepSpeed; an empty placeholder outside its forward) its `ds_numel`."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in network.parameters())


class _ProfilerStep(L.Callback):
    def __init__(self, profiler: torch.profiler.profile) -> None:
        self.profiler = profiler

    def on_train_batch_end(self, *args: Any) -> None:
        self.profiler.step()
