"""Each baked project's own test suite passes, for every module combination.

The default project (every module) runs its whole suite, in four parts so that `make test`'s three
workers share it. The smaller combinations differ from it only in which files are baked and in
the Jinja branches of the shared files (configs, docs, Makefile, the package's `__init__`, the
server's and quantize.py's model choice, and the tests that carry branches themselves), so they
run the fast tests of exactly those (COMBINATION_TESTS) and one training run of each module they
have; everything else is the same code the default project's suite has just run.
"""

import os
import sys

import pytest

from .conftest import COMBINATIONS, combo_id, run

DEFAULT = (True, True, True)
# The default project's suite in four parts (split by measured time): the tests that wait (on
# SLURM's one-minute limit, on 2-process runs), the serving and doc-command tests, the entry points
# run as a user types them, and every other file.
PART_ONE = ["tests/test_slurm.py", "tests/test_strategies.py", "tests/test_distill.py", "tests/test_docs_sweeps.py"]
PART_TWO = ["tests/test_reliability.py", "tests/test_serve_gpt.py", "tests/test_docs_inference.py"]
PART_THREE = ["tests/test_user_errors.py", "tests/test_gpt_training.py", "tests/test_recipe.py"]
# The smaller combinations: the tests of what differs between combinations (those of a module left
# out are not baked and are skipped here), without the `slow` ones.
COMBINATION_TESTS = [
    "tests/test_configs.py",  # every config group and option composes and instantiates
    "tests/test_imports.py",
    "tests/test_makefile.py",
    "tests/test_user_errors.py",
    "tests/test_reliability.py",
    "tests/test_recipe.py",
    "tests/test_hf.py",
    "tests/test_properties.py",
    "tests/test_strategies.py",
    "tests/test_quantize.py",
    "tests/test_deploy.py",
    "tests/test_serve_gpt.py",
    "tests/test_serve_clip.py",
    "tests/test_gpt_training.py::test_fast_dev_run",
    "tests/test_clip_training.py::test_fast_dev_run",
    "tests/test_distill.py::test_fit_trains_only_the_student_and_keeps_the_teacher_frozen_in_eval_mode",
]
# (id, combination, pytest arguments); the longest first, so the smaller combinations fill the end.
SUITES = [
    ("all-part-one", DEFAULT, PART_ONE),
    ("all-part-two", DEFAULT, PART_TWO),
    ("all-rest", DEFAULT, [f"--ignore={path}" for path in PART_ONE + PART_TWO + PART_THREE]),
    ("all-part-three", DEFAULT, PART_THREE),
    *[(combo_id(c), c, ["-m", "not slow", *COMBINATION_TESTS]) for c in COMBINATIONS if c != DEFAULT],
]


@pytest.mark.parametrize("combo, selection", [s[1:] for s in SUITES], ids=[s[0] for s in SUITES])
def test_baked_project_tests_pass(bake, combo, selection):
    root = bake(gpt=combo[0], distill=combo[1], clip=combo[2])
    selection = [a for a in selection if not a.startswith("tests/") or (root / a.split("::")[0]).is_file()]
    # One thread per process: three suites share two cores, and each starts processes of its own.
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selection]
    # The whole of `make test` took 15-19 min on a 2-core VM (README); the limit is for a slow machine.
    proc = run(pytest_cmd, root, env=env, timeout=2400)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail  # pytest exits 5 when it collected nothing: that fails too
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
