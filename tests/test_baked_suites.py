"""Each baked project's own test suite passes, for every module combination."""

import os
import sys

import pytest

from .conftest import COMBINATIONS, combo_id, run


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_baked_project_tests_pass(bake, combo):
    root = bake(gpt=combo[0], distill=combo[1], clip=combo[2])
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    proc = run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"], root, env=env, timeout=1200)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail  # pytest exits 5 when it collected nothing: that fails too
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
