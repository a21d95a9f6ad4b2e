"""`make install` picks the torch build for the machine: the CPU build where there is no NVIDIA GPU."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def install_commands(path: str, *args: str) -> str:
    """What `make install` would run (make -n), with PATH as given; .venv is made to look present."""
    env = {**os.environ, "PATH": path}
    make = shutil.which("make")
    proc = subprocess.run(
        [make, "-n", "install", "VENV=/nonexistent-venv", "BIN=/bin", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return next(line for line in proc.stdout.splitlines() if "pip install -q torch" in line)


def test_without_a_gpu_the_cpu_build_is_installed(tmp_path):
    line = install_commands(str(tmp_path))  # no nvidia-smi on this PATH
    assert line.endswith(CPU_INDEX), line


def test_with_a_gpu_the_default_build_is_installed(tmp_path):
    fake = Path(tmp_path) / "nvidia-smi"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    line = install_commands(str(tmp_path))
    assert "--index-url" not in line, line


def test_the_build_can_be_chosen(tmp_path):
    line = install_commands(str(tmp_path), "TORCH=torch==2.5.1", "TORCH_INDEX=https://download.pytorch.org/whl/cu124")
    assert line.endswith("pip install -q torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"), line
