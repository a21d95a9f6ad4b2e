"""Continue a prompt with a trained GPT: `python generate.py ckpt_path=... prompt="ROMEO:"`."""

import hydra
from omegaconf import DictConfig

from {{cookiecutter.package}}.cli import exit_on_user_error
from {{cookiecutter.package}}.generation import sample_from_checkpoint


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    for i, text in enumerate(sample_from_checkpoint(cfg)):
        if cfg.num_samples > 1:
            print(f"----- sample {i + 1} -----")
        print(cfg.prompt + text)


if __name__ == "__main__":
    main()
