"""SLURM. First the requeue path in one process, with SLURM's variables and a stand-in `scontrol`;
then against a running SLURM (`sudo make slurm-up`, tests marked `slurm`): sweeps through
launcher=slurm, deploy/slurm.sbatch across a time limit (signal, requeue, resume), and DDP across
the tasks of one job.

Jobs run the project as a user would, from its root; the environment of this process (its python,
PYTHONPATH=src) reaches them through sbatch. Their run folders and logs are removed afterwards."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from {{cookiecutter.package}}.training import train

from .conftest import ROOT, TINY

# The tiny GPT on the test corpus, without per-validation text samples (they cost seconds each).
FAST = [*TINY, "callbacks.text_samples=null", "data.num_workers=0"]
# deploy/slurm.sbatch asks for 2 GPU nodes; these options fit it to the local one-node CPU cluster.
CPU_JOB = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_env() -> dict[str, str]:
    """This interpreter first on PATH (the batch script calls `python`) and the package importable."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    return {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job -o <id>` as a dict (JobState, Restarts, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))


def wait_until_ended(job_id: str, timeout: float) -> dict[str, str] | None:
    """The job's final `scontrol show job` record, or None if it has not ended within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info["JobState"] in ENDED:
            return info
        time.sleep(1)
    return None


class Jobs:
    """Submits, waits, and at the end cancels what still runs and removes what the jobs wrote."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.paths: list[Path] = []

    def sbatch(self, *args: str) -> str:
        (ROOT / "logs" / "slurm").mkdir(parents=True, exist_ok=True)  # the script's --output folder
        proc = subprocess.run(
            ["sbatch", "--parsable", *args], cwd=ROOT, env=job_env(), capture_output=True, text=True, check=True
        )
        job_id = proc.stdout.strip().split(";")[0]
        self.ids.append(job_id)
        self.paths += [ROOT / "logs" / "train" / "slurm" / job_id, ROOT / "logs" / "slurm" / f"train-{job_id}.out"]
        return job_id

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        info = wait_until_ended(job_id, timeout)
        if info is None:
            state = job_info(job_id)["JobState"]
            raise AssertionError(f"job {job_id} still {state} after {timeout} s:\n{self.log(job_id)[-4000:]}")
        return info

    def log(self, job_id: str) -> str:
        path = ROOT / "logs" / "slurm" / f"train-{job_id}.out"
        return path.read_text() if path.exists() else f"(no log at {path})"

    def cleanup(self) -> None:
        if self.ids:
            subprocess.run(["scancel", *self.ids], capture_output=True)
        for path in self.paths:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


@pytest.fixture
def jobs():
    jobs = Jobs()
    yield jobs
    jobs.cleanup()


class SignalDuringStep(L.Callback):
    """Sends this process the requeue signal in the middle of optimizer step `step` (counting from
    1), between backward and the weight update, as SLURM's timer may."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_requeue_signal_mid_step_saves_at_the_step_boundary_and_the_requeued_run_resumes_exactly(
    compose_cfg, tmp_path, monkeypatch, one_thread
):
    steps = ["callbacks.text_samples=null", "trainer.max_steps=12", "trainer.val_check_interval=6"]
    straight = compose_cfg(overrides=steps)
    straight.paths.output_dir = str(tmp_path / "straight")
    train(straight)
    ref = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)

    # What srun sets for a 1-task job, and an `scontrol` that records its arguments.
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "42"}
    slurm |= {"SLURM_NODELIST": "node1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    signalled = compose_cfg(
        overrides=[*steps, "+callbacks.signal._target_=tests.test_slurm.SignalDuringStep", "+callbacks.signal.step=5"]
    )
    with pytest.raises(SystemExit) as stop:  # stopped, not finished: the job is being requeued
        train(signalled)
    assert stop.value.code == 143
    run = Path(signalled.paths.output_dir)
    assert (tmp_path / "scontrol.log").read_text() == "requeue 42\n"
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)
    assert hpc["global_step"] == 5  # step 5 finished, then saved: no half-applied update
    assert not (run / "checkpoints" / "last.ckpt").exists()  # it stopped there: no validation at step 6

    requeued = compose_cfg(overrides=steps)  # the same job id and run folder, ckpt_path unset
    train(requeued)
    done = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert done["global_step"] == 12
    for key, value in ref["state_dict"].items():
        assert torch.equal(done["state_dict"][key], value), key


@pytest.fixture
def one_thread():
    """The in-process reference runs use one thread, like each SLURM task (--cpus-per-task=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_sweep_with_launcher_slurm_runs_one_slurm_job_per_run_and_each_survives_its_time_limit(
    tmp_path, corpus, data_dir
):
    """`python train.py -m launcher=slurm ...` with 1-minute jobs whose first runs need 60 s of
    training: both jobs are signalled, requeued by Lightning (not submitit) and resumed in their own
    run folder; the command returns when both have completed. submitit's files are under
    <sweep>/.submitit/<job id>/."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "launcher=slurm",
        "trainer=cpu",
        "trainer.devices=1",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=1",
        "hydra.launcher.additional_parameters.signal=USR1@10",
        "model.optimizer.lr=1e-3,1e-2",
        *FAST,
        "trainer.max_steps=120",
        "trainer.val_check_interval=60",
        f"data.paths=[{corpus}]",
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep}",
        "+callbacks.pace._target_=tests.conftest.PaceFirstRun",
        "+callbacks.pace.seconds=0.5",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    logs = sorted(p for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(logs) == 2, logs  # one folder per job: <array job id>_<index>
    script = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR1@10" in script and "#SBATCH --requeue" in script  # not submitit's USR2
    for index, (lr, folder) in enumerate(zip([1e-3, 1e-2], logs)):
        job_id = folder.name
        assert job_id.endswith(f"_{index}")
        info = wait_until_ended(job_id, 60)  # its result is written just before it ends
        out = (folder / f"{job_id}_0_log.out").read_text()
        err = (folder / f"{job_id}_0_log.err").read_text()
        assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, out[-2000:] + err[-2000:]
        assert "Job completed successfully" in out
        run = sweep / str(index)
        assert f"Restoring states from the checkpoint path at {run}/hpc_ckpt_1.ckpt" in err
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 120
        assert ckpt["hyper_parameters"]["optimizer"]["lr"] == lr
        assert (run / ".hydra" / "config.yaml").is_file()


@pytest.mark.slurm
@pytest.mark.slow
def test_a_sweep_with_slurm_wait_false_returns_once_submitted_and_its_jobs_complete(tmp_path, corpus, data_dir):
    """`slurm.wait=false`: the command logs the two job ids and returns while they are still queued
    or running; each job then completes its run in <sweep>/<job number>."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "launcher=slurm", "slurm.wait=false", "trainer=cpu", "trainer.devices=1",
           "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "model.optimizer.lr=1e-3,1e-2",
           *FAST, "trainer.max_steps=6", "trainer.val_check_interval=6", f"data.paths=[{corpus}]",
           f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    job_ids = re.findall(r"#\d submitted as SLURM job (\d+_\d)", log)
    assert len(job_ids) == 2 and "not waiting for them (slurm.wait=false)" in log, log[-3000:]
    assert {job_info(j)["JobState"] for j in job_ids} & {"PENDING", "RUNNING"}, "the command waited for its jobs"
    for index, job_id in enumerate(job_ids):
        info = wait_until_ended(job_id, 240)
        assert info is not None and info["JobState"] == "COMPLETED", (info, job_id)
        ckpt = torch.load(sweep / str(index) / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 6


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_job_past_its_time_limit_is_requeued_and_ends_with_the_uninterrupted_weights(
    compose_cfg, corpus, data_dir, jobs, one_thread
):
    """A 1-minute job whose first run needs 100 s: SIGUSR1 before the limit, Lightning saves an hpc
    checkpoint at a step boundary and requeues; the requeued run resumes in the same folder and
    finishes with exactly (bitwise) the weights and optimizer state of an uninterrupted run."""
    steps = ["trainer.max_steps=200", "trainer.val_check_interval=100"]
    straight = compose_cfg(overrides=[*FAST, *steps])
    train(straight)
    ref = torch.load(Path(straight.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)

    job_id = jobs.sbatch(
        *CPU_JOB,
        "--ntasks-per-node=1",
        "--time=1",
        "--signal=USR1@10",
        "deploy/slurm.sbatch",
        "trainer=cpu",
        *FAST,
        *steps,
        f"data.paths=[{corpus}]",
        f"paths.data_dir={data_dir}",
        # 0.5 s after each step of the first run only: 200 steps cannot end within the minute
        "+callbacks.pace._target_=tests.conftest.PaceFirstRun",
        "+callbacks.pace.seconds=0.5",
    )
    info = jobs.wait(job_id, timeout=400)
    log = jobs.log(job_id)
    tail = log[-4000:]
    assert info["JobState"] == "COMPLETED", tail
    assert int(info["Restarts"]) >= 1, tail  # scontrol show job counts the requeues
    assert ", restart 0" in log and ", restart 1" in log, tail  # the batch script's first line, per run
    assert "Handling auto-requeue signal" in log and f"Requeued SLURM job: {job_id}" in log, tail
    assert f"Restoring states from the checkpoint path at {ROOT}/logs/train/slurm/{job_id}/hpc_ckpt_1.ckpt" in log

    run = ROOT / "logs" / "train" / "slurm" / job_id
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)
    assert 0 < hpc["global_step"] < 200
    done = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert done["global_step"] == ref["global_step"] == 200
    for key, value in ref["state_dict"].items():
        assert torch.equal(done["state_dict"][key], value), key
    for a, b in zip(ref["optimizer_states"][0]["state"].values(), done["optimizer_states"][0]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


@pytest.mark.slurm
@pytest.mark.slow
def test_two_tasks_of_one_job_train_as_two_ddp_ranks(compose_cfg, corpus, data_dir, jobs, one_thread):
    """--ntasks-per-node=2: Lightning builds a 2-rank gloo process group from the SLURM variables;
    each rank trains on its half of every global batch, so the weights match one process that
    sees the whole global batch (up to the order of the float sums)."""
    job_id = jobs.sbatch(
        *CPU_JOB,
        "--ntasks-per-node=2",
        "--time=5",
        "deploy/slurm.sbatch",
        "trainer=cpu",
        *FAST,
        f"data.paths=[{corpus}]",
        f"paths.data_dir={data_dir}",
    )
    info = jobs.wait(job_id, timeout=300)
    log = jobs.log(job_id)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-4000:]
    ddp = torch.load(ROOT / "logs" / "train" / "slurm" / job_id / "checkpoints" / "last.ckpt", weights_only=True)

    # TINY's batch is 8 windows per rank: one process with 16 sees the same 16 windows per step.
    single = compose_cfg(overrides=[*FAST, "data.batch_size=16"])
    train(single)
    ref = torch.load(Path(single.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ddp["global_step"] == ref["global_step"] == 4
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
