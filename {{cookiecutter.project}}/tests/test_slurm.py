"""Against a running SLURM (`sudo make slurm-up`): sweeps through launcher=slurm, deploy/slurm.sbatch
across a time limit (signal, requeue, resume), and DDP across the tasks of one job.

Jobs run the project as a user would, from its root; the environment of this process (its python,
PYTHONPATH=src) reaches them through sbatch. Their run folders and logs are removed afterwards."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, TINY

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

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
            raise AssertionError(f"job {job_id} still {job_info(job_id)['JobState']} after {timeout} s:\n{self.log(job_id)}")
        return info

    def log(self, job_id: str) -> str:
        path = ROOT / "logs" / "slurm" / f"train-{job_id}.out"
        return path.read_text()[-4000:] if path.exists() else f"(no log at {path})"

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


@pytest.fixture
def one_thread():
    """The in-process reference runs use one thread, like each SLURM task (--cpus-per-task=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_sweep_with_launcher_slurm_runs_one_slurm_job_per_run(tmp_path, corpus, data_dir):
    """`python train.py -m launcher=slurm ...`: both jobs complete on SLURM, each run folder holds its
    checkpoint and Hydra config, submitit's logs are under <sweep>/.submitit/<job id>/."""
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
        "hydra.launcher.timeout_min=10",
        "model.optimizer.lr=1e-3,1e-2",
        *FAST,
        "trainer.max_steps=2",
        f"data.paths=[{corpus}]",
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    logs = sorted(p for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(logs) == 2, logs  # one folder per job: <array job id>_<index>
    script = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR1@90" in script and "#SBATCH --requeue" in script  # Lightning's requeue signal
    for index, (lr, folder) in enumerate(zip([1e-3, 1e-2], logs)):
        job_id = folder.name
        assert job_id.endswith(f"_{index}")
        assert wait_until_ended(job_id, 60)["JobState"] == "COMPLETED"  # its result is written just before
        assert "Job completed successfully" in (folder / f"{job_id}_0_log.out").read_text()
        run = sweep / str(index)
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 2
        assert ckpt["hyper_parameters"]["optimizer"]["lr"] == lr
        assert (run / ".hydra" / "config.yaml").is_file()


def test_sbatch_job_past_its_time_limit_is_requeued_and_ends_with_the_uninterrupted_weights(
    compose_cfg, corpus, data_dir, jobs, one_thread
):
    """A 1-minute job whose first run needs 100 s: SIGUSR1 before the limit, Lightning saves an hpc
    checkpoint at a step boundary and requeues; the requeued run resumes in the same folder and
    finishes with exactly (bitwise) the weights and optimizer state of an uninterrupted run."""
    steps = ["trainer.max_steps=200", "trainer.val_check_interval=100"]
    straight = compose_cfg(overrides=[*FAST, *steps])
    from {{cookiecutter.package}}.training import train

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
    assert info["JobState"] == "COMPLETED", log
    assert int(info["Restarts"]) >= 1, log  # scontrol show job counts the requeues
    assert "restart 0" in log and "restart 1" in log, log  # the batch script's first line, per run
    assert "Handling auto-requeue signal" in log and f"Requeued SLURM job: {job_id}" in log, log

    run = ROOT / "logs" / "train" / "slurm" / job_id
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)
    assert 0 < hpc["global_step"] < 200
    done = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert done["global_step"] == ref["global_step"] == 200
    for key, value in ref["state_dict"].items():
        assert torch.equal(done["state_dict"][key], value), key
    for a, b in zip(ref["optimizer_states"][0]["state"].values(), done["optimizer_states"][0]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


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
    assert info["JobState"] == "COMPLETED", log
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log
    ddp = torch.load(ROOT / "logs" / "train" / "slurm" / job_id / "checkpoints" / "last.ckpt", weights_only=True)

    # TINY's batch is 8 windows per rank: one process with 16 sees the same 16 windows per step.
    single = compose_cfg(overrides=[*FAST, "data.batch_size=16"])
    from {{cookiecutter.package}}.training import train

    train(single)
    ref = torch.load(Path(single.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ddp["global_step"] == ref["global_step"] == 4
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
