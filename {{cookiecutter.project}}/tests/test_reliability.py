"""Preemption, resume by name, atomic checkpoints, non-finite losses (docs/reliability.md)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from {{cookiecutter.package}}.checkpoints import (
    MARKER,
    is_complete,
    old_path,
    partial_path,
    publish,
    resolve_ckpt_path,
)
from {{cookiecutter.package}}.errors import DataPathError

from .conftest import {% if cookiecutter.gpt %}TINY{% else %}CLIP_TINY{% endif %}, ROOT, run_script


@pytest.fixture
def tiny(tmp_path{% if cookiecutter.gpt %}, corpus{% endif %}) -> list[str]:
    """A short run of the tiny model, quiet, with validation (and a checkpoint) every 2 steps."""
{%- if cookiecutter.gpt %}
    model = [*TINY, f"data.paths=[{corpus}]", "callbacks.text_samples=null"]
{%- else %}
    model = [*CLIP_TINY, "callbacks.similarity=null"]
{%- endif %}
    quiet = ["callbacks.progress_bar=null", "callbacks.model_summary=null"]
    return [*model, *quiet, "trainer.max_steps=6", f"paths.data_dir={tmp_path / 'data'}"]


def start(*overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended ({proc.returncode}) first:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def newest_run(log_dir: Path) -> Path:
    runs = sorted((log_dir / "train" / "runs").iterdir())
    return runs[-1]


@pytest.mark.slow
def test_sigterm_saves_at_a_step_boundary_and_ckpt_path_last_resumes_to_bitwise_the_same_weights(tmp_path, tiny):
    run_script("train.py", *tiny, f"paths.log_dir={tmp_path / 'straight'}")
    reference = torch.load(newest_run(tmp_path / "straight") / "checkpoints" / "last.ckpt", weights_only=True)

    logs = tmp_path / "logs"
    marker = tmp_path / "at-step-3"
    pause = ["+callbacks.pause._target_=tests.conftest.PauseAtStep", "+callbacks.pause.step=3"]
    proc = start(*tiny, f"paths.log_dir={logs}", *pause, f"+callbacks.pause.marker={marker}")
    wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)  # mid-run: step 3 of 6, between two checkpoints (steps 2 and 4)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM: stopped after step 3 and saved" in out and "Traceback" not in out, out[-3000:]
    first = newest_run(logs)
    stopped = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == 3

    time.sleep(1.1)  # the run folders are named by the second
    proc = run_script("train.py", *tiny, f"paths.log_dir={logs}", "ckpt_path=last")
    picked = first / "checkpoints" / "last.ckpt"
    assert f"ckpt_path=last: resuming from {picked} (step 3," in proc.stdout + proc.stderr
    second = newest_run(logs)
    assert second != first
    resumed = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == reference["global_step"] == 6
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():  # bitwise: the same batches, the same arithmetic
        assert torch.equal(resumed["state_dict"][key], value), key
    for ours, theirs in zip(resumed["optimizer_states"][0]["state"].values(), reference["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_checkpoint_write_leaves_the_previous_one_whole_and_last_points_to_it(
    tmp_path, tiny
):
    logs = tmp_path / "logs"
    marker = tmp_path / "mid-write"
    # Step 4's first checkpoint write (the best-so-far file, then last.ckpt) stops half-way and
    # hangs until SIGKILL. Step 2 wrote both whole.
    stall = "+trainer.plugins=[{_target_:tests.conftest.StallingCheckpointIO,prefix:.step000004," + f"marker:'{marker}'" + "}]"
    proc = start(*tiny, "trainer.val_check_interval=2", f"paths.log_dir={logs}", stall)
    wait_for(marker, proc)
    run = newest_run(logs) / "checkpoints"
    [half] = run.glob(".step000004*.ckpt.partial")
    assert half.stat().st_size > 0  # the write really was under way
    proc.kill()
    proc.communicate(timeout=60)

    last = torch.load(run / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # the previous checkpoint, whole
    assert sorted(p.name[:10] for p in run.glob("*.ckpt")) == ["last.ckpt", "step000002"]  # nothing of step 4
    with pytest.raises(Exception):  # noqa: B017  (what was being written is unreadable, and hidden)
        torch.load(half, weights_only=True)
    assert resolve_ckpt_path("last", logs, "train") == str(run / "last.ckpt")

    time.sleep(1.1)
    proc = run_script("train.py", *tiny, "trainer.val_check_interval=2", f"paths.log_dir={logs}", "ckpt_path=last")
    assert f"resuming from {run / 'last.ckpt'} (step 2," in proc.stdout + proc.stderr
    assert torch.load(newest_run(logs) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_ckpt_path_last_with_no_earlier_run_is_one_clear_error(tmp_path):
    with pytest.raises(DataPathError, match=r"ckpt_path=last: no checkpoint of an earlier 'train' run under"):
        resolve_ckpt_path("last", tmp_path / "logs", "train")


def test_ckpt_path_last_picks_the_newest_whole_checkpoint_across_runs(tmp_path, caplog):
    logs = tmp_path / "logs"
    older = logs / "train" / "runs" / "2026-01-01_00-00-00" / "checkpoints"
    newer = logs / "train" / "multiruns" / "2026-01-02_00-00-00" / "3" / "checkpoints"
    other_task = logs / "eval" / "runs" / "2026-01-03_00-00-00" / "checkpoints"
    for folder, step in ((older, 1), (newer, 2), (other_task, 3)):
        folder.mkdir(parents=True)
        torch.save({"global_step": step}, folder / f"step{step:06d}.ckpt")
        time.sleep(0.01)
        torch.save({"global_step": step}, folder / "last.ckpt")
        time.sleep(0.01)
    (older / ".last.ckpt.partial").write_bytes(b"half")  # newer, but never renamed: not a checkpoint
    with caplog.at_level("INFO"):
        assert resolve_ckpt_path("last", logs, "train") == str(newer / "last.ckpt")
    assert f"ckpt_path=last: resuming from {newer / 'last.ckpt'} (step 2, written" in caplog.text
    # A run folder: its newest checkpoint.
    assert resolve_ckpt_path(str(older.parent), logs, "train") == str(older / "last.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPathError, match="no whole checkpoint"):
        resolve_ckpt_path(str(tmp_path / "empty"), logs, "train")
    assert resolve_ckpt_path(str(older / "step000001.ckpt"), logs, "train") == str(older / "step000001.ckpt")
    assert resolve_ckpt_path(None, logs, "train") is None


def sharded(folder: Path, step: int) -> Path:
    """A folder shaped like an FSDP2 checkpoint."""
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"m" * 10)
    (folder / "__0_0.distcp").write_bytes(bytes(100 + step))
    torch.save({"global_step": step}, folder / "meta.pt")
    return folder


def test_sharded_folders_are_published_with_a_marker_and_replace_the_old_one_whole(tmp_path):
    final = tmp_path / "checkpoints" / "last.ckpt"
    publish(sharded(partial_path(final), 2), final, 2)
    assert is_complete(final) and (final / MARKER).is_file()
    publish(sharded(partial_path(final), 4), final, 4)
    assert is_complete(final) and (final / "__0_0.distcp").stat().st_size == 104
    assert not partial_path(final).exists() and not old_path(final).exists()
    assert resolve_ckpt_path(str(tmp_path), tmp_path, "train") == str(final)

    # Killed while the shards were written: no marker, never picked, refused by name.
    half = sharded(tmp_path / "checkpoints" / "step000006.ckpt", 6)
    assert not is_complete(half)
    assert resolve_ckpt_path(str(tmp_path), tmp_path, "train") == str(final)
    with pytest.raises(DataPathError, match="this checkpoint folder is incomplete"):
        resolve_ckpt_path(str(half), tmp_path, "train")
    # A shard cut short after the marker was written (a bad copy): no longer whole.
    (final / "__0_0.distcp").write_bytes(b"cut")
    assert not is_complete(final)


def test_a_kill_between_the_two_renames_of_a_folder_leaves_the_old_one_found(tmp_path):
    final = tmp_path / "checkpoints" / "last.ckpt"
    publish(sharded(partial_path(final), 2), final, 2)
    os.replace(final, old_path(final))  # the first rename of the next publish, and then the kill
    assert resolve_ckpt_path(str(tmp_path), tmp_path, "train") == str(old_path(final))
