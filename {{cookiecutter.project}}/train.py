"""Train a model: `python train.py [group=option ...] [key=value ...]`; `--help` lists the groups."""

import hydra
from omegaconf import DictConfig

from {{cookiecutter.package}}.cli import exit_on_user_error, run_hydra
from {{cookiecutter.package}}.training import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # A sweep (-m with a sweeper that optimises) minimises this value.
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    run_hydra(main)
