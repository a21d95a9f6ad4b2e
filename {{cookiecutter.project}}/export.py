"""Export a trained GPT: `python export.py ckpt_path=... export.format=safetensors` (or onnx).

safetensors: weights + config.json + tokenizer.json; onnx: model.onnx checked with onnxruntime.
"""

import hydra
from omegaconf import DictConfig

from {{cookiecutter.package}}.cli import exit_on_user_error, run_hydra
from {{cookiecutter.package}}.export import run


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    run_hydra(main)
