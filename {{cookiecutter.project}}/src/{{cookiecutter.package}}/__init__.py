"""{{ cookiecutter.project_name }}: {{ cookiecutter.description }}"""

from .api import train
from .models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "train"]
