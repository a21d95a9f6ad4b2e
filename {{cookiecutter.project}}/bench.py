"""Time training steps and print a table: `python bench.py model/net=gpt2-124m trainer=bf16`.

Options: bench.steps, bench.warmup, bench.profile=true (a torch profiler trace for TensorBoard's
profiler plugin, under the run folder's profile/). Everything else is the same config as train.py.
"""

import hydra
from omegaconf import DictConfig

from {{cookiecutter.package}}.benchmark import run_benchmark
from {{cookiecutter.package}}.cli import exit_on_user_error, run_hydra


@hydra.main(version_base="1.3", config_path="configs", config_name="bench")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_benchmark(cfg)


if __name__ == "__main__":
    run_hydra(main)
