"""Preemption: SIGTERM (and SLURM's SIGUSR1) end a run with a checkpoint at the next step boundary.

Lightning's signal connector stays the one mechanism. On SIGTERM its handler only sets a flag, and
its loops stop the run at the next step boundary by raising SIGTERMException; this callback then
saves `last.ckpt` (atomically: trainer.Trainer) and train.py exits with status 143, the status of a
process ended by SIGTERM, so a scheduler sees the run as stopped, not finished. Resume with
`ckpt_path=last`.

Under SLURM with auto-requeue (deploy/slurm.sbatch), Lightning's own SIGUSR1 handler saves an
hpc checkpoint and requeues the job. Run inside the signal handler it could save in the middle of
an optimizer step; this callback holds it until the next step boundary and then calls Lightning's
handler unchanged. SLURM then ends the job with SIGTERM, which stops the run as above (without a
second save at the same step), and the requeued job resumes from the hpc checkpoint.
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
        signal.signal(signum, self._hold)  # Lightning's teardown restores the original handlers

    def _hold(self, signum: int, frame: Any) -> None:
        log.info("received signal %d: saving and requeueing at the next step boundary", signum)
        self._pending = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._pending and self._requeue is not None:
            self._pending = False
            signum, handler = self._requeue
            handler(signum, None)  # Lightning's: hpc checkpoint + scontrol requeue
            self.saved_step = trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return  # an error: the last checkpoint written before it stays the newest
        if self.saved_step == trainer.global_step:
            log.warning("SIGTERM: stopped after step %d, already saved at this step", trainer.global_step)
            return
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.dirpath:
            path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        else:
            path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        if ckpt is not None:
            ckpt.last_model_path = str(path)
        self.saved_step = trainer.global_step
        log.warning(
            "SIGTERM: stopped after step %d and saved %s; resume with the same command plus ckpt_path=last",
            trainer.global_step,
            path,
        )
