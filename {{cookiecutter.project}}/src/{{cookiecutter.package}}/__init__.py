"""My Paper: Experiments with Lightning and Hydra, baked from deepseek-template."""

from .api import train
from .models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "train"]
