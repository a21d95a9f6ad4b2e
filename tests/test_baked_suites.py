"""Each baked project's own test suite passes, for every module combination.

The default project (every module) runs its whole suite, in two halves so that `make test`'s two
workers share it (about 9 minutes each on a 2-core VM). The smaller combinations run all but the
`slow` tests (end-to-end subprocess runs and 2-process DDP/FSDP2 runs, which the default project
runs on the same code): what differs between combinations is which files and config entries are
baked, and the fast tests (every config composed, every module through fast_dev_run, the losses,
data and models) exercise exactly that."""

import os
import sys

import pytest

from .conftest import COMBINATIONS, combo_id, run

DEFAULT = (True, True, True)
# The default project's first half: the tests that wait (on SLURM's one-minute limit, on 2-process
# runs) and the serving tests; the second half is every other file. Split by measured time.
FIRST_HALF = [
    "tests/test_slurm.py",
    "tests/test_strategies.py",
    "tests/test_distill.py",
    "tests/test_docs_sweeps.py",
    "tests/test_reliability.py",
    "tests/test_serve_gpt.py",
]
# (id, combination, pytest arguments); the longest first, so that the two workers start on them.
SUITES = [
    ("all-first-half", DEFAULT, FIRST_HALF),
    ("all-second-half", DEFAULT, [f"--ignore={path}" for path in FIRST_HALF]),
    *[(combo_id(c), c, ["-m", "not slow"]) for c in COMBINATIONS if c != DEFAULT],
]


@pytest.mark.parametrize("combo, selection", [s[1:] for s in SUITES], ids=[s[0] for s in SUITES])
def test_baked_project_tests_pass(bake, combo, selection):
    root = bake(gpt=combo[0], distill=combo[1], clip=combo[2])
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selection]
    # A half of the default project's suite takes about 9 min beside another suite on a 2-core VM;
    # the limit leaves room for a slower machine.
    proc = run(pytest_cmd, root, env=env, timeout=2400)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail  # pytest exits 5 when it collected nothing: that fails too
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
