"""Common mistakes, as a user makes them on the command line: each stops with one line
`error: ...` naming the key, file or value, exit status 2, and leaves no run folder, TensorBoard
run or cache behind. Each runs the entry point in a fresh process in an empty folder (the runs'
root, paths.root_dir)."""

from pathlib import Path

import pytest
import torch

from .conftest import run_script

pytestmark = pytest.mark.slow

FAST = ["debug=fast_dev_run"]


def fails_cleanly(folder: Path, script: str, *overrides: str, stdin: str | None = None) -> str:
    """Run `script` in `folder`; assert exit 2, one error line, no traceback, nothing written. -> the line."""
    proc = run_script(script, *overrides, cwd=folder, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and last.count("error: ") == 1, proc.stderr[-3000:]
    left = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "inputs" not in p.parts)
    assert left == [], left  # no run folder, no TensorBoard run, no cache
    return last


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "inputs").mkdir()
    return tmp_path


def test_text_for_a_number_names_the_key(folder):
    line = fails_cleanly(folder, "train.py", "model.optimizer.lr=abc", *FAST)
    assert line == "error: model.optimizer.lr='abc': expected a number (the default is {{ '0.0006' if cookiecutter.gpt else '0.0005' }})"


def test_text_for_an_integer_or_a_flag_names_the_key(folder):
    line = fails_cleanly(folder, "train.py", "trainer.max_steps=many", *FAST)
    assert line == "error: trainer.max_steps='many': expected an integer (the default is 2000)"
    line = fails_cleanly(folder, "train.py", "trainer.deterministic=maybe", *FAST)
    assert line == "error: trainer.deterministic='maybe': expected true or false (the default is false)"


def test_unknown_group_option_lists_the_options(folder):
    line = fails_cleanly(folder, "train.py", "trainer=gpus")
    assert line.startswith("error: trainer=gpus: no such option; choose one of ")
    assert "ddp" in line and "cpu" in line


def test_unknown_key_is_named_with_the_way_to_add_one(folder):
    line = fails_cleanly(folder, "train.py", "model.optimizer.lrr=0.1")
    assert line == (
        "error: Could not override 'model.optimizer.lrr': Key 'lrr' is not in struct "
        "(to append to your config use +model.optimizer.lrr=0.1)"
    )


def test_malformed_override_is_named(folder):
    line = fails_cleanly(folder, "train.py", "data.batch_size=[1")
    assert line.startswith("error: cannot read the override 'data.batch_size=[1': ")


@pytest.mark.parametrize("preset", ["ddp", "fsdp", "bf16"])
def test_gpu_preset_without_a_gpu_says_what_to_run(folder, preset):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = fails_cleanly(folder, "train.py", f"trainer={preset}")
    fix = "trainer.accelerator=cpu" + (" trainer.devices=2" if preset != "bf16" else "")
    assert line == (
        f"error: trainer={preset} runs on CUDA GPUs (trainer.accelerator=gpu) and this machine has none: "
        f"add {fix} to run it on the CPU, or use trainer=cpu"
    )


def write_checkpoints(folder: Path) -> dict[str, Path]:
    """Files that are not usable checkpoints: truncated, random bytes, a pickle of a class, none."""
    inputs = folder / "inputs"
    whole = inputs / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 3}, whole)
    data = whole.read_bytes()
    (inputs / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (inputs / "corrupt.ckpt").write_bytes(bytes(range(256)) * 8)
    torch.save({"state_dict": {}, "opaque": torch.nn.Linear(1, 1)}, inputs / "foreign.ckpt")  # pickles a class
    return {
        "missing": inputs / "missing.ckpt",
        "truncated": inputs / "truncated.ckpt",
        "corrupt": inputs / "corrupt.ckpt",
        "foreign": inputs / "foreign.ckpt",
    }


SCRIPTS = [("train.py", FAST), ("eval.py", []){% if cookiecutter.gpt %}, ("generate.py", ["max_new_tokens=2"]){% endif %}]


@pytest.mark.parametrize("script, extra", SCRIPTS, ids=[s for s, _ in SCRIPTS])
def test_unusable_checkpoint_is_one_line_without_torch_advice(folder, script, extra):
    """Every kind of unusable file through train.py; the other entry points read checkpoints with the
    same function (checkpoints.read_checkpoint), so one process each for two kinds is enough there."""
    paths = write_checkpoints(folder)
    kinds = list(paths) if script == "train.py" else ["missing", "foreign"]
    for kind in kinds:
        path = paths[kind]
        line = fails_cleanly(folder, script, f"ckpt_path={path}", *extra)
        assert f"ckpt_path='{path}'" in line, line
        assert "weights_only" not in line, line
        if kind == "missing":
            assert line.endswith("does not exist (expected a .ckpt file written by train.py)")
        else:
            assert "is not a readable checkpoint: truncated, corrupt or not written by train.py" in line, (kind, line)


def test_checkpoint_of_another_module_names_the_model_option(folder):
    """A checkpoint whose network belongs to another module, evaluated without its model= option."""
    net = {% if cookiecutter.gpt %}{"_target_": "{{cookiecutter.package}}.models.clip.CLIP", "embed_dim": 64, "image_model": "tiny"}{% else %}{"_target_": "{{cookiecutter.package}}.models.gpt.GPT", "d_model": 64, "num_layers": 2}{% endif %}
    # What the other module saved: its network node and the settings every module has.
    other = {"net": net, "loss": "infonce", "optimizer": {}, "scheduler": {}, "compile": False, "recall_at": [1]}
    path = folder / "inputs" / "other.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "hyper_parameters": other}, path)
    line = fails_cleanly(folder, "eval.py", f"ckpt_path={path}", "trainer=cpu")
    assert line.startswith(f"error: checkpoint {path} does not fit model={{ 'gpt' if cookiecutter.gpt else 'clip' }} (")
    assert line.endswith("): pass the model= option of the run that wrote it")
{%- if cookiecutter.gpt %}


def test_empty_jsonl_names_the_file(folder):
    empty = folder / "inputs" / "empty.jsonl"
    empty.write_text("")
    line = fails_cleanly(folder, "train.py", "data=text", f"data.paths=[{empty}]", *FAST)
    assert line == f"error: no documents in {empty} (data.paths): the files are empty"


def test_missing_prompt_file_is_named(folder):
    whole = folder / "inputs" / "whole.ckpt"
    torch.save({"state_dict": {}, "global_step": 1}, whole)
    line = fails_cleanly(folder, "generate.py", f"ckpt_path={whole}", "prompt_file=nope.txt")
    assert line == "error: prompt_file='nope.txt' does not exist"
{%- endif %}


def test_a_user_error_keeps_a_folder_that_was_already_in_use(folder):
    """hydra.run.dir= naming a folder that holds other files: only what the failed run added goes."""
    used = folder / "inputs" / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    proc = run_script("train.py", "trainer.max_steps=many", f"hydra.run.dir={used}", cwd=folder, check=False)
    assert proc.returncode == 2
    assert (used / "notes.txt").read_text() == "mine"
    assert not (used / "tensorboard").exists() and not (used / "checkpoints").exists()
