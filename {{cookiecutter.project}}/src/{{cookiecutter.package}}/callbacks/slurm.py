"""Lightning's SLURM auto-requeue, run between two training steps instead of inside one.

Under SLURM (a job started with srun: `deploy/slurm.sbatch`, `launcher=slurm`), Lightning answers
SIGUSR1 (sent by `--signal=USR1@<seconds>` before the time limit) by saving `hpc_ckpt_<n>.ckpt` in
`trainer.default_root_dir` and running `scontrol requeue`; the requeued job keeps its job id, so it
starts in the same run folder, where Lightning finds that file and resumes from it. Lightning does
all this inside the signal handler, on whatever line the main thread is on: half-way through an
optimizer update, or after the next batch was fetched, so the file's weights, step count and data
position can disagree with each other. This callback keeps Lightning's handler and only moves the
call to the end of the current training step (on_train_batch_end, where ModelCheckpoint's
every_n_train_steps saves too; data/sampling.py resumes such a checkpoint at the next batch), and
then ends the process.
"""

import signal
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

# Lightning's SLURMEnvironment listens for SIGUSR1 unless built with another requeue_signal; the
# project never does, and deploy/slurm.sbatch and configs/launcher/slurm.yaml send SIGUSR1.
REQUEUE_SIGNAL = signal.SIGUSR1


class SLURMRequeue(L.Callback):
    """Defer Lightning's requeue handler to the next optimizer-step boundary. Inert outside SLURM.

    Every rank receives the signal, but not necessarily during the same step, so the ranks agree
    through one all-reduce of a flag per step (only when running under SLURM with more than one
    process; Lightning itself broadcasts its SIGTERM flag every step there)."""

    def __init__(self) -> None:
        self.lightning_handler: Any = None
        self.pending = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installs its handler before training starts, only with SLURM auto-requeue on.
        handler = signal.getsignal(REQUEUE_SIGNAL)
        if not SLURMEnvironment.detect() or not callable(handler):
            return
        self.lightning_handler = handler
        self.pending = False
        signal.signal(REQUEUE_SIGNAL, self._defer)

    def _defer(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.lightning_handler is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not under SLURM, or between the micro-batches of one step (gradients are not saved)
        if not trainer.strategy.reduce_boolean_decision(self.pending, all=False):
            return
        # Saves hpc_ckpt_<n>.ckpt (a collective: every rank calls it at this same step), then rank 0
        # runs `scontrol requeue`, which also stops this job.
        self.lightning_handler(REQUEUE_SIGNAL, None)
        # Leave at once, like Lightning on SIGTERM: exit status 0, no result reported for this run.
        raise SIGTERMException

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.lightning_handler is not None:
            signal.signal(REQUEUE_SIGNAL, self.lightning_handler)
            self.lightning_handler = None
