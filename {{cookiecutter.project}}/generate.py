"""Continue a prompt with a trained GPT: `python generate.py ckpt_path=... prompt="ROMEO:"`.

A prompt with spaces is quoted twice, once for the shell and once for Hydra:
`prompt='"Good morrow, sweet Kate"'`; or read it from a file, `prompt_file=prompt.txt`, or from
standard input, `prompt_file=-`.
"""

import hydra
from omegaconf import DictConfig

from {{cookiecutter.package}}.cli import exit_on_user_error, run_hydra
from {{cookiecutter.package}}.generation import read_prompt, sample_from_checkpoint


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    prompt = read_prompt(cfg)
    for i, text in enumerate(sample_from_checkpoint(cfg, prompt)):
        if cfg.num_samples > 1:
            print(f"----- sample {i + 1} -----")
        print(prompt + text)


if __name__ == "__main__":
    run_hydra(main)
