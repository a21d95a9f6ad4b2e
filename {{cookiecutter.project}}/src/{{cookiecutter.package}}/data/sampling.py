"""Training order that survives a restart: the sampler every DataModule's train loader uses.

A sample is named by a global id g = epoch * N + i (N items per epoch, item i = g % N), so a dataset
can derive all of its randomness (a window offset, an augmentation) from (seed, g) alone. The
sampler deals one epoch's ids to the ranks in strides and, after a resume, skips the batches of the
interrupted epoch that were already trained on: a resumed run sees exactly the batches that an
uninterrupted one would have seen.
"""

import warnings
from collections.abc import Iterator

import lightning as L
import numpy as np
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """Global ids for one rank. Epoch e orders its N items by a permutation drawn from (seed, e)
    when `shuffle`, else in order; rank r takes positions r, r + W, r + 2W, ... (W ranks), so global
    batch b is positions [b*B*W, (b+1)*B*W) on every rank count. `skip` drops the first batches of
    `resume_epoch`. A DistributedSampler subclass, so Lightning keeps it and calls set_epoch."""

    def __init__(
        self, dataset: Dataset, num_replicas: int, rank: int, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.per_rank = len(dataset) // num_replicas // batch_size * batch_size
        self.resume_epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        order = np.random.default_rng((self.seed, self.epoch)).permutation(n) if self.shuffle else np.arange(n)
        skip = self.skip * self.batch_size if self.epoch == self.resume_epoch else 0
        base = self.epoch * n
        for j in range(skip, self.per_rank):
            yield base + int(order[j * self.num_replicas + self.rank])

    def resume_from(self, trainer: L.Trainer | None) -> "EpochSampler":
        """Skip what `trainer` already trained on in its current epoch (nothing on a fresh run)."""
        if trainer is not None:
            self.resume_epoch = trainer.current_epoch
            # `processed`, not `completed`: a checkpoint saved in on_train_batch_end (ModelCheckpoint
            # with every_n_train_steps, the SLURM requeue in callbacks/preemption.py) has trained that batch
            # but not yet counted it as completed; Lightning adds it when it restores the loop, which
            # happens after this. After a save at validation end the two are equal.
            self.skip = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if self.skip:  # Lightning cannot see that this order resumes exactly, and would warn otherwise
            warnings.filterwarnings(
                "ignore", "You're resuming from a checkpoint that ended before the epoch ended", PossibleUserWarning
            )
        return self


def world_of(trainer: L.Trainer | None) -> tuple[int, int]:
    """(world size, global rank); (1, 0) outside a Trainer, e.g. in a notebook."""
    return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
