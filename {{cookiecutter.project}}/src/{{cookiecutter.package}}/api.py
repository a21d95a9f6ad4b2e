"""Training from Python, with the same config `python train.py` composes (Hydra's compose API):

    from {{cookiecutter.package}} import train
    metrics = train("train.jsonl", "model/net=tiny", "trainer.max_steps=500", out_dir="logs/api")

Every default comes from configs/; the overrides are train.py's command-line words.
"""

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from .errors import DataPathError
from .networks import CONFIGS
from .training import train as train_from_config


def compose_train_config(train_data: str | list[str], *overrides: str, out_dir: str = "logs/api") -> DictConfig:
    """configs/train.yaml with data=text on `train_data` (files, folders, JSONL), then `overrides`.
    Logs, checkpoints and the token cache go under `out_dir`."""
    if not (CONFIGS / "train.yaml").is_file():
        raise DataPathError(f"{CONFIGS}/train.yaml not found: the package must be used from its project folder")
    paths = [train_data] if isinstance(train_data, str) else list(train_data)
    out = Path(out_dir).resolve()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3", job_name="api"):
        cfg = compose(
            "train",
            overrides=["data=text", "data.paths=[" + ",".join(f"'{p}'" for p in paths) + "]", *overrides],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.root_dir = str(Path.cwd())
        cfg.paths.data_dir = str(out / "data")
        cfg.paths.log_dir = str(out)
        cfg.paths.output_dir = str(out)
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.runtime.cwd = str(Path.cwd())
    HydraConfig().set_config(cfg)  # resolves ${hydra:...} in the config as train.py would
    return cfg


def train(train_data: str | list[str], *overrides: str, out_dir: str = "logs/api") -> dict[str, float]:
    """Train as `python train.py data=text data.paths=[...] <overrides>` does; returns the last
    logged metrics (val/loss, ...). Checkpoints land in `<out_dir>/checkpoints/`."""
    return train_from_config(compose_train_config(train_data, *overrides, out_dir=out_dir))
