"""{{ cookiecutter.project_name }}: {{ cookiecutter.description }}"""
{%- if cookiecutter.gpt %}

from .api import train
from .models.gpt import GPT, GPTConfig
{%- endif %}

__all__ = [{% if cookiecutter.gpt %}"GPT", "GPTConfig", "train"{% endif %}{% if cookiecutter.gpt and cookiecutter.clip %}, {% endif %}{% if cookiecutter.clip %}"MultiModalPipeline"{% endif %}]
{%- if cookiecutter.clip %}


def __getattr__(name: str) -> object:
    # Imported on first use: the pipeline imports timm, which takes seconds and most runs never need.
    if name == "MultiModalPipeline":
        from .pipeline import MultiModalPipeline

        return MultiModalPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
{%- endif %}
