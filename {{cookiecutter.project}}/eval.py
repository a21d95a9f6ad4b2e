"""Validate a checkpoint: `python eval.py ckpt_path=logs/train/runs/.../checkpoints/last.ckpt`."""

import hydra
from omegaconf import DictConfig

from {{cookiecutter.package}}.cli import exit_on_user_error, run_hydra
from {{cookiecutter.package}}.training import evaluate


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    run_hydra(main)
