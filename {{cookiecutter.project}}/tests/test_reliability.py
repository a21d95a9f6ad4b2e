"""Preemption, resume by name, atomic checkpoints, non-finite losses (docs/reliability.md)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from {{cookiecutter.package}}.callbacks.nonfinite import NonFiniteLoss, non_finite_flag
from {{cookiecutter.package}}.callbacks.preemption import Preemption
from {{cookiecutter.package}}.checkpoints import (
    MARKER,
    deferred_signals,
    is_complete,
    old_path,
    partial_path,
    publish,
    resolve_ckpt_path,
)
from {{cookiecutter.package}}.errors import ConfigError, DataPathError, NonFiniteLossError, StorageError
from {{cookiecutter.package}}.trainer import Trainer

from .conftest import {% if cookiecutter.gpt %}ROOT, TINY{% else %}CLIP_TINY, ROOT{% endif %}, run_script


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
    for ours, theirs in zip(
        resumed["optimizer_states"][0]["state"].values(), reference["optimizer_states"][0]["state"].values()
    ):
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_checkpoint_write_leaves_the_previous_one_whole_and_last_points_to_it(tmp_path, tiny):
    logs = tmp_path / "logs"
    marker = tmp_path / "mid-write"
    # Step 4's first checkpoint write (the best-so-far file, then last.ckpt) stops half-way and
    # hangs until SIGKILL. Step 2 wrote both whole.
    stall = (
        "+trainer.plugins=[{_target_:tests.conftest.StallingCheckpointIO,prefix:.step000004,"
        + f"marker:'{marker}'"
        + "}]"
    )
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


class Regression(L.LightningModule):
    """A linear fit whose loss is NaN in the steps listed in `bad` (counted from 1), with two loss parts.
    `fused`: torch's fused AdamW, which the non-finite check hands its flag to (no host sync per step),
    else the for-loop AdamW, whose step the check reads the flag before."""

    def __init__(self, bad: tuple[int, ...] = (), fused: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)  # every instance starts from the same weights
        self.net, self.bad, self.fused = torch.nn.Linear(4, 1), bad, fused

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        mse = (self.net(x) - y).pow(2).mean()
        l1 = self.net.weight.abs().sum()
        if self.global_step + 1 in self.bad:
            mse = mse * float("nan")
        self.log("train/mse", mse)
        self.log("train/l1", l1)
        loss = mse + 0.01 * l1
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=self.fused, foreach=False)


def fit(tmp_path: Path, model: L.LightningModule, *callbacks: L.Callback, max_steps: int = 6) -> Trainer:
    data = TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.randn(64, 1))
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_last=True),
            *callbacks,
        ],
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    return trainer


@pytest.mark.parametrize("fused", [False, True])
def test_a_non_finite_loss_stops_before_the_weights_change_naming_the_step_and_the_parts(tmp_path, fused):
    model = Regression(bad=(4,), fused=fused)
    with pytest.raises(NonFiniteLossError) as e:
        fit(tmp_path, model, NonFiniteLoss())
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert str(e.value).startswith("non-finite loss in step 4: train/l1="), str(e.value)
    assert "train/loss=nan, train/mse=nan; training stopped before the step changed the weights" in str(e.value)
    assert f"the last good checkpoint is {last}" in str(e.value)
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3
    for key, value in saved["state_dict"].items():  # the weights in memory are still the step-3 weights
        assert torch.equal(value, model.state_dict()[key]) and value.isfinite().all(), key


@pytest.mark.parametrize("fused", [False, True])
def test_skip_drops_the_step_counts_it_and_stops_after_max_skips(tmp_path, fused):
    reference = Regression(fused=fused)
    fit(tmp_path / "a", reference, max_steps=3)
    skipping, callback = Regression(bad=(4,), fused=fused), NonFiniteLoss(action="skip", max_skips=1)
    fit(tmp_path / "b", skipping, callback, max_steps=4)
    assert callback.skipped == 1
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4 and saved["callbacks"]["NonFiniteLoss"] == {"skipped": 1}
    for key, value in reference.state_dict().items():  # step 4 changed nothing: the step-3 weights
        assert torch.equal(saved["state_dict"][key], value), key
    steps = [int(state["step"]) for state in saved["optimizer_states"][0]["state"].values()]
    assert steps == [3, 3]  # nor AdamW's step counts (its bias correction), for the weight and the bias
    assert not hasattr(skipping.optimizers().optimizer, "found_inf")  # the flag leaves with the run
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss in step 5 after skipping 1 steps"):
        fit(tmp_path / "c", Regression(bad=(4, 5), fused=fused), NonFiniteLoss(action="skip", max_skips=1))
    with pytest.raises(ConfigError, match=r"callbacks.non_finite.action='ignore'; expected one of \['stop', 'skip'\]"):
        NonFiniteLoss(action="ignore")


def _rank_decides(rank: int, port: int, bad_rank: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    loss = torch.tensor(float("nan") if rank == bad_rank else 1.0)
    decision = bool(non_finite_flag([torch.tensor(2.0), loss], world_size=2))
    Path(out, f"rank{rank}").write_text(str(decision))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("bad_rank", [1, -1])
def test_every_rank_takes_the_same_decision_when_one_rank_s_loss_is_nan(tmp_path, bad_rank):
    from torch.distributed.elastic.utils.distributed import get_free_port

    torch.multiprocessing.spawn(_rank_decides, args=(get_free_port(), bad_rank, str(tmp_path)), nprocs=2)
    expected = str(bad_rank >= 0)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == [expected, expected]


def test_a_full_disk_during_a_checkpoint_is_one_clear_error_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = fit(tmp_path, Regression(), max_steps=2)
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    def full(self, checkpoint, path, storage_options=None):  # what the OS does when the disk fills mid-write
        with open(path, "wb") as f:
            f.write(b"x" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(trainer.strategy.checkpoint_io), "save_checkpoint", full)
    with pytest.raises(StorageError) as e:
        trainer.save_checkpoint(last)
    assert str(e.value).startswith(f"cannot write checkpoint {last}: the disk is full (OSError: [Errno 28] No space")
    assert "last.ckpt still holds the previous checkpoint" in str(e.value)
    assert last.read_bytes() == before and sorted(p.name for p in last.parent.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(StorageError, match="new.ckpt was not created"):
        trainer.save_checkpoint(tmp_path / "checkpoints" / "new.ckpt")
    assert not (tmp_path / "checkpoints" / "new.ckpt").exists()


def test_signals_during_a_checkpoint_write_wait_for_it_to_finish(tmp_path, monkeypatch):
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a second one, impatient
            time.sleep(0.05)
            assert received == []  # held
        assert received == [signal.SIGTERM]  # delivered once, to the handler that was there before
    finally:
        signal.signal(signal.SIGTERM, previous)

    # Ctrl-C in the middle of a real save: the file is written whole first, then KeyboardInterrupt.
    trainer = fit(tmp_path, Regression(), max_steps=1)
    write = type(trainer.strategy.checkpoint_io).save_checkpoint

    def interrupted(self, checkpoint, path, storage_options=None):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        write(self, checkpoint, path, storage_options)

    monkeypatch.setattr(type(trainer.strategy.checkpoint_io), "save_checkpoint", interrupted)
    target = tmp_path / "interrupted.ckpt"
    # Python's own Ctrl-C handler, as in a terminal (a process started with SIGINT ignored, as
    # pytest-xdist's workers start theirs, inherits the ignoring and would never see the signal).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.save_checkpoint(target)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.load(target, weights_only=True)["global_step"] == 1


class SignalMidStep(L.Callback):
    """Sends `signum` to this process between the backward pass and the optimizer step of step `step`."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)
            time.sleep(0.05)  # delivered here, in the middle of the step


def test_slurm_sigusr1_runs_lightnings_requeue_at_the_next_step_boundary(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242"}
    for key, value in {**slurm, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)

    with pytest.raises(SIGTERMException):  # the run leaves after the requeue, as on SIGTERM
        fit(tmp_path, Regression(), Preemption(), SignalMidStep(signal.SIGUSR1, step=2), max_steps=4)
    [hpc] = tmp_path.glob("hpc_ckpt_*.ckpt")  # the only save: no last.ckpt written again on the way out
    assert torch.load(hpc, weights_only=True)["global_step"] == 2  # step 2 whole, not the state inside it
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]  # Lightning's requeue
    assert (
        not (tmp_path / "checkpoints" / "last.ckpt").exists()
        or torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] <= 2
    )


def test_every_test_named_in_docs_reliability_exists():
    import re

    doc = (ROOT / "docs" / "reliability.md").read_text()
    named, file = [], None
    for match in re.finditer(r"`(test_\w+\.py)?::(test_\w+)`|`(test_\w+\.py)`", doc):
        file = match.group(1) or match.group(3) or file
        if match.group(2):
            named.append((file, match.group(2)))
    assert len(named) >= 10
    for file, test in named:
        assert f"def {test}(" in (ROOT / "tests" / file).read_text(), f"{file}::{test}"


@pytest.mark.slow
def test_train_py_ckpt_path_last_without_an_earlier_run(tmp_path):
    proc = run_script("train.py", "ckpt_path=last", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(
        f"error: ckpt_path=last: no checkpoint of an earlier 'train' run under {tmp_path / 'logs' / 'train'}"
    )
    assert proc.stderr.count("\n") == 1
{%- if cookiecutter.gpt %}


@pytest.mark.slow
def test_train_py_stops_on_a_non_finite_loss_in_one_line(tmp_path, tiny):
    # lr=1e30: the first update throws every weight to ~1e30, and step 2's loss is NaN.
    proc = run_script("train.py", *tiny, "model.optimizer.lr=1e30", f"paths.log_dir={tmp_path}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "error: non-finite loss in step 2: train/loss=nan; training stopped before the step changed the weights"
        in proc.stderr
    )
    assert proc.stderr.splitlines()[-1].startswith("error: non-finite") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_resuming_on_other_text_is_one_clear_error_before_the_weights_load(tmp_path, tiny, corpus):
    run_script("train.py", *tiny, "trainer.max_steps=2", f"paths.log_dir={tmp_path / 'logs'}")
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text((corpus / sorted(p.name for p in corpus.iterdir())[0]).read_text()[::-1])
    proc = run_script(
        "train.py", *tiny, f"data.paths=[{other}]", f"paths.log_dir={tmp_path / 'logs'}", "ckpt_path=last", check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: ckpt_path: the checkpoint's tokenizer (512 tokens) is not this data's (512 tokens" in proc.stderr
{%- endif %}
