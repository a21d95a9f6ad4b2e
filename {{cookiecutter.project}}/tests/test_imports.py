"""The house rules on imports, checked in a fresh interpreter per subpackage (what one file imports
is hidden by whatever an earlier test imported): every module of the subpackage is imported, and a
forbidden module in sys.modules fails the test, naming it."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

PKG = "{{cookiecutter.package}}"
ENTRY_LEVEL = ["hydra", "omegaconf"]  # config machinery: only entry points, training.py, api.py, cli.py
PACKAGE_PARTS = ["data", "modules", "losses", "callbacks", "parallel", "training", "api", "cli", "generation", "hf"]

# subpackage or module -> what importing it must never load
RULES: dict[str, list[str]] = {
    # Plain torch networks (timm for image towers): no training, config, data or other package code.
    "models": [
        *ENTRY_LEVEL,
        "lightning",
        "torchmetrics",
        "tokenizers",
        *[f"{PKG}.{p}" for p in [*PACKAGE_PARTS, "errors", "networks"]],
    ],
    "losses": [*ENTRY_LEVEL, "lightning", f"{PKG}.modules", f"{PKG}.data", f"{PKG}.models"],
    "data": [*ENTRY_LEVEL, f"{PKG}.models", f"{PKG}.modules", f"{PKG}.losses", f"{PKG}.networks"],
    "modules": ["hydra", f"{PKG}.training", f"{PKG}.cli", f"{PKG}.parallel"],
    "callbacks": ["hydra", f"{PKG}.modules", f"{PKG}.training"],
    "errors": [*ENTRY_LEVEL, "torch", "lightning"],
    "networks": [*ENTRY_LEVEL, "lightning", f"{PKG}.modules", f"{PKG}.data"],
}


def modules_of(name: str) -> list[str]:
    """Every importable module of a subpackage (or the module itself), found on disk."""
    path = ROOT / "src" / PKG / name
    if path.is_dir():
        return sorted(f"{PKG}.{name}.{p.stem}" for p in path.glob("*.py"))
    return [f"{PKG}.{name}"] if path.with_suffix(".py").is_file() else []


def loaded_by(modules: list[str]) -> set[str]:
    code = "\n".join(
        [
            "import importlib, json, sys",
            f"for m in {modules!r}: importlib.import_module(m)",
            "print(json.dumps(sorted(sys.modules)))",
        ]
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.splitlines()[-1]))


def offenders(loaded: set[str], forbidden: list[str]) -> list[str]:
    return sorted(f for f in forbidden if any(m == f or m.startswith(f + ".") for m in loaded))


@pytest.mark.parametrize("name", sorted(RULES))
def test_a_subpackage_imports_nothing_it_must_not(name):
    modules = modules_of(name)
    if not modules:
        pytest.skip(f"{PKG}/{name} is not in this project")
    loaded = loaded_by(modules)
    assert set(modules) <= loaded
    assert offenders(loaded, RULES[name]) == [], f"importing {modules} loads what {name} must not import"


def test_the_check_sees_a_forbidden_import():
    """The positive control: cli.py is where Hydra's errors are mapped, and the same check finds Hydra there."""
    assert offenders(loaded_by([f"{PKG}.cli"]), ENTRY_LEVEL) == ["hydra", "omegaconf"]
