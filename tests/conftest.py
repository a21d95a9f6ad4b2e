"""Fixtures for the template's own tests: bake projects with cookiecutter (through pytest-cookies)."""

import subprocess
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[1]

# Every valid module combination: (gpt, distill, clip). Distillation needs the GPT; some module is needed.
COMBINATIONS = [
    (True, True, True),
    (True, False, False),
    (True, True, False),
    (True, False, True),
    (False, False, True),
]


def combo_id(combo: tuple[bool, bool, bool]) -> str:
    return "+".join(name for name, on in zip(("gpt", "distill", "clip"), combo) if on)


def baked_files(root: Path) -> set[str]:
    """Every file of a baked project, relative to its root, without the .git folder."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".git" not in p.parts}


@pytest.fixture
def bake(cookies):
    """bake(gpt=..., distill=..., clip=..., **answers) -> the baked project's path (asserting success)."""

    def _bake(**answers):
        result = cookies.bake(extra_context={"git_init": False, **answers})
        assert result.exit_code == 0, result.exception
        return Path(result.project_path)

    return _bake


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
