"""Preemption: SIGTERM, and SLURM's SIGUSR1, end a run with a checkpoint at the next step boundary.

Lightning's signal connector stays the one mechanism; this callback only moves its work to a step
boundary, where the weights, optimizer state, step count, LR schedule and data position of a
checkpoint belong together.

- SIGTERM (a scheduler stopping the job, Ctrl-\\ of a supervisor): Lightning's handler only sets a
  flag, and its loops stop the run at the next step boundary by raising SIGTERMException; this
  callback then saves `last.ckpt` (atomically: trainer.Trainer) and train.py exits with status 143,
  the status of a process ended by SIGTERM, so a scheduler sees the run as stopped, not finished.
  Resume with `ckpt_path=last`. Under SLURM the file is Lightning's `hpc_ckpt_<n>.ckpt` instead,
  which a job that SLURM requeued (preemption with PreemptMode=REQUEUE) resumes by itself.
- SIGUSR1 under SLURM with auto-requeue (deploy/slurm.sbatch, launcher=slurm send it before the time
  limit): Lightning's handler saves `hpc_ckpt_<n>.ckpt` in the run folder and runs `scontrol
  requeue`; the requeued job keeps its job id and run folder and resumes from that file. Run inside
  the signal handler it would save on whatever line training is on (half-way through an optimizer
  update, after the next batch was fetched): it is held here and called unchanged at the end of the
  step, once every rank has agreed (one all-reduce of a flag per step, under SLURM only); the run
  then leaves as on SIGTERM, without a second save.
"""

import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

EXIT_STATUS = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM


class Preemption(L.Callback):
    def __init__(self) -> None:
        self.saved_step: int | None = None  # the step of the last save this callback caused
        self._requeue: tuple[int, Any] | None = None  # (signal, Lightning's handler) while one is held
        self._pending = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registered its handlers just before this hook (Trainer._run).
        environment = trainer._accelerator_connector.cluster_environment
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        signum = environment.requeue_signal
        handler = signal.getsignal(signum)
        if not callable(handler):  # SIG_DFL / SIG_IGN: Lightning installed nothing
            return
        self._requeue = (signum, handler)
        self._pending = False
        signal.signal(signum, self._hold)  # Lightning's teardown restores the original handlers

    def _hold(self, signum: int, frame: Any) -> None:
        log.info("received signal %d: saving and requeueing at the next step boundary", signum)
        self._pending = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._requeue is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not under SLURM, or between the micro-batches of one step (gradients are not saved)
        # Every rank gets the signal, not necessarily during the same step: any rank's flag counts.
        if not trainer.strategy.reduce_boolean_decision(self._pending, all=False):
            return
        self._pending = False
        signum, handler = self._requeue
        handler(signum, None)  # Lightning's: hpc_ckpt_<n>.ckpt (a collective) + scontrol requeue on rank 0
        self.saved_step = trainer.global_step
        raise SIGTERMException  # leave now, as on SIGTERM: SLURM ends this run and starts the requeued one

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return  # an error: the last checkpoint written before it stays the newest
        if self.saved_step == trainer.global_step:
            log.warning("stopped after step %d, already saved at this step", trainer.global_step)
            return
        ckpt = trainer.checkpoint_callback
        if self._requeue is not None:  # under SLURM: where a requeued job looks by itself
            path = Path(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        elif ckpt is not None and ckpt.dirpath:
            path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        else:
            path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        if ckpt is not None and self._requeue is None:
            ckpt.last_model_path = str(path)
        self.saved_step = trainer.global_step
        log.warning(
            "SIGTERM: stopped after step %d and saved %s; resume with the same command plus ckpt_path=last",
            trainer.global_step,
            path,
        )
