"""What train.py and eval.py do with a composed Hydra config: build, fit or validate, report."""

import logging
from typing import Any

import lightning as L
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c is not None]


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [instantiate(c, _convert_="all") for c in (cfg.get("logger") or {}).values() if c is not None]


def build_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, dict):  # a strategy object with settings (FSDP, DeepSpeed)
        trainer_cfg["strategy"] = instantiate(strategy, _convert_="all")
    return instantiate(
        trainer_cfg, callbacks=build_callbacks(cfg), logger=build_loggers(cfg) or False, _convert_="all", **overrides
    )


def metrics_of(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model on the configured data; returns the last logged metrics."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    trainer = build_trainer(cfg)
    resolved = {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k != "hydra"
    }
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)  # the whole resolved config, as TensorBoard's HPARAMS
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = metrics_of(trainer)
    if trainer.is_global_zero:
        report(trainer, datamodule, metrics)
    return metrics


def report(trainer: L.Trainer, datamodule: L.LightningDataModule, metrics: dict[str, float]) -> None:
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
        log.info("results after %d steps:\n%s", trainer.global_step, "\n".join(lines))


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validate a checkpoint written by train.py on the configured data."""
    module_class = get_class(cfg.model._target_)
    model = module_class.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    trainer = build_trainer(cfg)
    trainer.validate(model, datamodule=datamodule)
    metrics = metrics_of(trainer)
    if trainer.is_global_zero:
        report(trainer, datamodule, metrics)
    return metrics
