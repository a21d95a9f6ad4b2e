"""Every config composes, and what it describes instantiates."""

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from {{cookiecutter.package}}.training import build_callbacks, build_loggers, build_trainer

from .conftest import {% if cookiecutter.clip %}CLIP_TINY, {% endif %}CONFIGS{% if cookiecutter.gpt %}, TINY{% endif %}

# Each model option: its network-preset group and the overrides that give it data to train on.
MODELS = {
{%- if cookiecutter.gpt %}
    "gpt": ("model/net", TINY),
{%- endif %}
{%- if cookiecutter.distill %}
    "distill": ("model/net", TINY),
{%- endif %}
{%- if cookiecutter.clip %}
    "clip": ("model/clip_net", CLIP_TINY),
{%- endif %}
}


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


@pytest.mark.parametrize("option", options("model"))
def test_every_model_and_network_preset_instantiates(compose_cfg, option, request):
    assert option in MODELS, f"configs/model/{option}.yaml has no entry in MODELS"
    net_group, data = MODELS[option]
    for net in options(net_group):
        # The preset that starts from a checkpoint gets a real one (the tiny GPT, trained 2 steps).
        extra = [f"model.net.ckpt_path={request.getfixturevalue('gpt_checkpoint')}"] if net == "pretrained" else []
        cfg = compose_cfg(overrides=[*data, f"model={option}", f"{net_group}={net}", *extra], tiny=False)
        assert isinstance(instantiate(cfg.model, _convert_="all"), L.LightningModule)


@pytest.mark.parametrize("group", ["model/optimizer", "model/scheduler"])
def test_every_optimizer_and_schedule_builds_on_a_module(compose_cfg, group):
    """Each option of the group, called as the modules call it: on the weight-decay groups, then the optimizer."""
    from {{cookiecutter.package}}.modules.optim import configure_optimizers

    model_option = "gpt" if (CONFIGS / "model" / "gpt.yaml").is_file() else "clip"
    for option in options(group):
        cfg = compose_cfg(overrides=[f"model={model_option}", f"{group}={option}"], tiny=True)
        node = OmegaConf.to_container(cfg.model, resolve=True)
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        module = SimpleNamespace(
            trainer=SimpleNamespace(precision_plugin=None, gradient_clip_val=None, estimated_stepping_batches=10)
        )
        out = configure_optimizers(module, net.parameters(), node["optimizer"], node["scheduler"])
        decay, no_decay = out["optimizer"].param_groups
        assert no_decay["weight_decay"] == 0.0 and len(decay["params"]) == 1 and len(no_decay["params"]) == 3
        assert out["lr_scheduler"]["interval"] == "step"
{%- if cookiecutter.clip %}


def data_overrides(option: str, image_pairs: Path) -> list[str]:
    """Options that need paths get the test data; the others bring their own (Shakespeare, shapes)."""
    if option == "image_text":
        return ["model=clip", "model/clip_net=tiny", "data=image_text", f"data.train=[{image_pairs / 'pairs.jsonl'}]"]
    return [f"data={option}"]
{%- endif %}


@pytest.mark.parametrize("option", options("data"))
def test_every_data_option_instantiates(compose_cfg, option{% if cookiecutter.clip %}, image_pairs{% endif %}):
{%- if cookiecutter.gpt %}
    if option == "text":
        cfg = compose_cfg(overrides=["data=text"], tiny=True)
{%- if cookiecutter.clip %}
    else:
        cfg = compose_cfg(overrides=data_overrides(option, image_pairs), tiny=False)
{%- else %}
    else:
        cfg = compose_cfg(overrides=[f"data={option}"], tiny=False)
{%- endif %}
{%- else %}
    cfg = compose_cfg(overrides=data_overrides(option, image_pairs), tiny=False)
{%- endif %}
    assert isinstance(instantiate(cfg.data, _convert_="all"), L.LightningDataModule)


@pytest.mark.parametrize("group", ["callbacks", "logger", "debug", "experiment", "hparams_search", "launcher"])
def test_every_option_composes_and_instantiates(compose_cfg, group):
    for option in options(group):
        # Experiments pick their own data and model.
        cfg = compose_cfg(overrides=[f"{group}={option}"], tiny=group != "experiment")
        build_callbacks(cfg)
        build_loggers(cfg)
        instantiate(cfg.data, _convert_="all")
        instantiate(cfg.model, _convert_="all")


# The entry points besides train.py: each composes with a ckpt_path.
ENTRY_CONFIGS = ["train", "eval", "quantize", "serve"{% if cookiecutter.gpt %}, "generate", "export"{% endif %}]


@pytest.mark.parametrize("config_name", ENTRY_CONFIGS)
def test_entry_configs_compose(compose_cfg, config_name):
    overrides = ["ckpt_path=some.ckpt"] if config_name != "train" else []
    cfg = compose_cfg(config_name, overrides, tiny=config_name in ("train", "eval"))
    assert cfg.task_name == config_name
    if config_name == "quantize":  # the validation data it measures on
        assert isinstance(instantiate(cfg.data, _convert_="all"), L.LightningDataModule)


def test_default_config_is_the_demo_and_composes_without_overrides(compose_cfg):
    cfg = compose_cfg(tiny=False)
    assert cfg.model._target_.endswith({% if cookiecutter.gpt %}"GPTModule"{% else %}"CLIPModule"{% endif %})
    instantiate(cfg.data, _convert_="all")
    instantiate(cfg.model, _convert_="all")


def test_experiment_files_are_global_packages():
    for path in (CONFIGS / "experiment").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_"), path
    assert Path(CONFIGS / "train.yaml").is_file()
