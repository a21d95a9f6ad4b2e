"""Every config composes, and what it describes instantiates."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from {{cookiecutter.package}}.training import build_callbacks, build_loggers, build_trainer

from .conftest import CONFIGS


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_presets_compose_and_instantiate(compose_cfg, option):
    cfg = compose_cfg(overrides=[f"trainer={option}"], tiny=True)
    assert cfg.trainer.precision in ("32-true", "16-mixed", "bf16-mixed", "bf16-true")
    if "DeepSpeed" in str(cfg.trainer.strategy) and not torch.cuda.is_available():
        return  # CUDA-only: test_strategies.py checks that it stops with a clear message instead
    # GPU presets are built on the CPU (this machine may have no GPU): the rest of what they say must work.
    cfg.trainer.accelerator, cfg.trainer.devices = "cpu", 2 if cfg.trainer.strategy != "auto" else 1
    assert isinstance(build_trainer(cfg), L.Trainer)


@pytest.mark.parametrize(
    "group", ["model", "data", "callbacks", "logger", "debug", "experiment", "hparams_search", "launcher"]
)
def test_every_option_composes_and_instantiates(compose_cfg, group):
    for option in options(group):
        # Options that pick their own data (the Shakespeare corpus) are composed without the test corpus.
        own_data = (group == "data" and option != "text") or group == "experiment"
        cfg = compose_cfg(overrides=[f"{group}={option}"], tiny=not own_data)
        if group == "model":
            for net in options("model/net"):
                model = instantiate(
                    compose_cfg(overrides=[f"model={option}", f"model/net={net}"]).model, _convert_="all"
                )
                assert isinstance(model, L.LightningModule)
        elif group == "data":
            assert isinstance(instantiate(cfg.data, _convert_="all"), L.LightningDataModule)
        else:
            build_callbacks(cfg)
            build_loggers(cfg)
            instantiate(cfg.data, _convert_="all")
            instantiate(cfg.model, _convert_="all")


@pytest.mark.parametrize("config_name", ["train", "eval", "generate"])
def test_entry_configs_compose(compose_cfg, config_name):
    overrides = ["ckpt_path=some.ckpt"] if config_name != "train" else []
    cfg = compose_cfg(config_name, overrides, tiny=config_name != "generate")
    assert cfg.task_name == config_name


def test_experiment_files_are_global_packages():
    for path in (CONFIGS / "experiment").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_"), path
    assert Path(CONFIGS / "train.yaml").is_file()
