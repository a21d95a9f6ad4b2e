"""`launcher=slurm`: hydra-submitit-launcher's SLURM launcher, able to return without waiting.

By default (`slurm.wait=true`) a sweep command submits its jobs and waits until each has written
its result, as the plugin does. With `slurm.wait=false` it submits the same jobs (one SLURM job
array), logs each job's id and run folder, and returns at once: the jobs train, requeue and resume
exactly as they would with the command waiting, and `squeue` / `scontrol show job <id>` follow them.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class SlurmLauncher(SubmititSlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        if OmegaConf.select(self.config, "slurm.wait", default=True):
            return super().launch(job_overrides, initial_job_idx)
        import submitit

        # The plugin's own mapping of hydra.launcher.* onto submitit: the keys every executor
        # knows keep their names, the SLURM ones get the slurm_ prefix.
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout")
        )
        common = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in common else f"slurm_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        args = [
            (list(overrides), "hydra.sweep.dir", n, f"job_id_for_{n}", Singleton.get_state())
            for n, overrides in zip(numbers, job_overrides, strict=True)
        ]
        jobs = executor.map_array(self, *zip(*args, strict=True))
        returns = []
        for n, overrides, job in zip(numbers, job_overrides, jobs, strict=True):
            log.info(f"#{n} submitted as SLURM job {job.job_id}: {' '.join(filter_overrides(overrides))}")
            returns.append(job_return(overrides, job.job_id))
        log.info(
            f"not waiting for them (slurm.wait=false): `squeue` lists them; each run's folder is "
            f"{sweep_dir}/<job number>, submitit's logs are in {sweep_dir / '.submitit'}/<job id>"
        )
        return returns


def job_return(overrides: Sequence[str], job_id: str) -> JobReturn:
    """What the sweep records for a job it did not wait for: submitted, its value the SLURM job id."""
    return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=job_id)
