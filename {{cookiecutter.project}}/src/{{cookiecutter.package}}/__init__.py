"""{{ cookiecutter.project_name }}: {{ cookiecutter.description }}"""

# Imported on first use, so importing a subpackage (`{{cookiecutter.package}}.models`, ...) loads
# only what that file imports: no Lightning, Hydra or data modules behind a plain torch network.
LAZY = {
{%- if cookiecutter.gpt %}
    "GPT": ".models.gpt",
    "train": ".api",
{%- endif %}
{%- if cookiecutter.clip %}
    "MultiModalPipeline": ".pipeline",  # imports timm, which takes seconds
{%- endif %}
}
__all__ = sorted(LAZY)


def __getattr__(name: str) -> object:
    if name in LAZY:
        from importlib import import_module

        return getattr(import_module(LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
