"""Quantize a trained model with torchao: `python quantize.py ckpt_path=... quantize.method=int8_weight_only`.

Prints file size, validation metrics and decode speed before and after, and writes the quantized
checkpoint beside the original (`output=` to choose); `quantize.method` lists the methods.
"""

import hydra
from omegaconf import DictConfig

from {{cookiecutter.package}}.cli import exit_on_user_error, run_hydra
from {{cookiecutter.package}}.quantize import run


@hydra.main(version_base="1.3", config_path="configs", config_name="quantize")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    run_hydra(main)
