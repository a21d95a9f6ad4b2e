"""What train.py and eval.py do with a composed Hydra config: build, fit or validate, report."""

import inspect
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from .callbacks.hparams import HParamsSession
from .callbacks.preemption import EXIT_STATUS
from .checkpoints import checkpoint_step, read_checkpoint, resolve_ckpt_path
from .errors import ConfigError

log = logging.getLogger(__name__)


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c is not None]


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [instantiate(c, _convert_="all") for c in (cfg.get("logger") or {}).values() if c is not None]


# Strategies that run only on CUDA GPUs, and what to use instead.
CUDA_ONLY = {
    "DeepSpeedStrategy": "trainer=ddp (or trainer=fsdp, whose FSDP2 also runs on CPUs)",
    "FSDPStrategy": "trainer=fsdp (FSDP2), which also runs on CPUs",
}


def check_accelerator(cfg: DictConfig) -> None:
    """A GPU preset (trainer=gpu/ddp/fsdp/bf16...) on a machine without CUDA: say what runs instead."""
    accelerator = str(cfg.trainer.get("accelerator"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        preset = choice("trainer") or "this trainer preset"
        # devices=-1 means every GPU; on the CPU it must be a count: 2 processes check a multi-process strategy.
        fix = "trainer.accelerator=cpu" + (" trainer.devices=2" if cfg.trainer.get("devices") == -1 else "")
        raise ConfigError(
            f"trainer={preset} runs on CUDA GPUs (trainer.accelerator={accelerator}) and this machine has none: "
            f"add {fix} to run it on the CPU, or use trainer=cpu"
        )


def choice(group: str) -> str | None:
    """The option picked for a config group (`trainer=ddp` -> "ddp"), when run through Hydra."""
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback] | None = None, **overrides: Any) -> L.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, dict):  # a strategy object with settings (FSDP, DeepSpeed)
        name = strategy["_target_"].rsplit(".", 1)[-1]
        if name in CUDA_ONLY and not torch.cuda.is_available():
            raise ConfigError(f"trainer.strategy {name} needs CUDA GPUs and none is available; use {CUDA_ONLY[name]}")
    check_accelerator(cfg)  # after: a CUDA-only strategy is not helped by trainer.accelerator=cpu
    if isinstance(strategy, dict):
        trainer_cfg["strategy"] = instantiate(strategy, _convert_="all")
    callbacks = build_callbacks(cfg) + list(callbacks or [])
    return instantiate(
        trainer_cfg, callbacks=callbacks, logger=build_loggers(cfg) or False, _convert_="all", **overrides
    )


def metrics_of(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model on the configured data; returns the last logged metrics. Stopped by
    SIGTERM, it exits with status 143 after saving last.ckpt (callbacks/preemption.py)."""
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name)
    if ckpt_path:  # a missing, broken or foreign file fails here, before anything is built
        check_checkpoint_fits(get_class(cfg.model._target_), ckpt_path)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    if ckpt_path:
        check_data_matches(datamodule, ckpt_path)
    resolved = {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k != "hydra"
    }
    # The resolved config with the run's metrics in TensorBoard's HPARAMS tab (callbacks/hparams.py).
    trainer = build_trainer(cfg, callbacks=[HParamsSession(resolved)])
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)  # hparams.yaml beside the events
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        raise SystemExit(EXIT_STATUS) from None
    metrics = metrics_of(trainer)
    if trainer.is_global_zero:
        report(trainer.global_step, trainer, datamodule, metrics)
    return metrics


def check_data_matches(datamodule: L.LightningDataModule, ckpt_path: str) -> None:
    """Before resuming: give the DataModule the checkpoint's state (its tokenizer) now, so data that
    does not match the checkpoint is one clear error instead of a shape error while the weights load,
    or, with a vocabulary of the same size, silently wrong token ids."""
    path = Path(ckpt_path)
    source = path / "meta.pt" if path.is_dir() else path  # FSDP2 folders keep the non-tensor state there
    if not source.is_file():
        return
    checkpoint = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    state = checkpoint.get(type(datamodule).__qualname__)
    if state:
        datamodule.prepare_data()
        datamodule.setup("fit")
        datamodule.load_state_dict(state)


def report(step: int, trainer: L.Trainer, datamodule: L.LightningDataModule, metrics: dict[str, float]) -> None:
    """Log the validation metrics of the weights at optimizer step `step`, and where the checkpoints are."""
    lines = [f"{k:>28s}  {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("val/")]
    baseline = getattr(datamodule, "unigram_loss", None)
    if baseline is not None and "val/loss" in metrics:
        lines.append(f"{'unigram baseline val/loss':>28s}  {baseline:.4f}")
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.best_model_path:
        lines.append(f"{'best checkpoint':>28s}  {ckpt.best_model_path}")
    if ckpt is not None and ckpt.last_model_path:
        lines.append(f"{'last checkpoint':>28s}  {ckpt.last_model_path}")
    if lines:
        log.info("results after %d steps:\n%s", step, "\n".join(lines))


def check_checkpoint_fits(module_class: type, ckpt_path: str) -> None:
    """A checkpoint of another module (eval.py model=distill on a GPT run, say) is a user error, not a
    TypeError from deep inside Lightning: name what the module needs and what the file holds."""
    checkpoint = read_checkpoint(ckpt_path)
    if checkpoint is None:
        return  # a sharded folder: Lightning reads it
    hparams = checkpoint.get("hyper_parameters", {})
    required = [
        name
        for name, p in inspect.signature(module_class.__init__).parameters.items()
        if name != "self" and p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    missing = [name for name in required if name not in hparams]
    if missing:
        raise ConfigError(
            f"checkpoint {ckpt_path} was not written by {module_class.__name__} (it needs hyper-parameters "
            f"{missing}; the file has {sorted(hparams)}): pass the model= option of the run that wrote it"
        )


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validate a checkpoint written by train.py on the configured data."""
    module_class = get_class(cfg.model._target_)
    check_checkpoint_fits(module_class, cfg.ckpt_path)
    try:
        model = module_class.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=True)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # its network config or weights fit another module
        raise ConfigError(
            f"checkpoint {cfg.ckpt_path} does not fit model={choice('model') or module_class.__name__} "
            f"({str(e).splitlines()[0]}): pass the model= option of the run that wrote it"
        ) from None
    datamodule = instantiate(cfg.data, _convert_="all")
    trainer = build_trainer(cfg)
    # ckpt_path again: Lightning restores the DataModule's state too, which checks the tokenizer.
    trainer.validate(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = metrics_of(trainer)
    if trainer.is_global_zero:
        report(checkpoint_step(cfg.ckpt_path), trainer, datamodule, metrics)
    return metrics
