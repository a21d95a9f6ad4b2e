"""Serve a checkpoint over HTTP: `python serve.py ckpt_path=... server.port=8000` (docs/deploy.md).

A GPT checkpoint answers POST /generate, a CLIP checkpoint POST /embed and POST /similarity; both
answer GET /health and GET /metrics (Prometheus).
"""

import hydra
from omegaconf import DictConfig

from {{cookiecutter.package}}.cli import exit_on_user_error, run_hydra
from {{cookiecutter.package}}.serve import serve


@hydra.main(version_base="1.3", config_path="configs", config_name="serve")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    serve(cfg)


if __name__ == "__main__":
    run_hydra(main)
