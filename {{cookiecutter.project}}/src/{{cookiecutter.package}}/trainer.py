"""The Trainer of train.py, eval.py and the Python API: Lightning's, with every checkpoint atomic."""

import errno
from pathlib import Path
from typing import Any

import lightning as L

from .checkpoints import deferred_signals, partial_path, publish, remove
from .errors import StorageError


class Trainer(L.Trainer):
    """`lightning.Trainer` whose `save_checkpoint` (called by ModelCheckpoint, by the preemption
    callback, by Lightning's SLURM requeue handler, by you) writes under `.<name>.partial`, then
    flushes, marks and renames it into place (checkpoints.publish): a crash, a kill or a full disk
    in the middle leaves the previous checkpoint of that name whole. Signals that arrive meanwhile
    wait for the write to finish (checkpoints.deferred_signals)."""

    def save_checkpoint(
        self, filepath: str | Path, weights_only: bool = False, storage_options: Any | None = None
    ) -> None:
        if "://" in str(filepath):  # object stores write whole objects already
            return super().save_checkpoint(filepath, weights_only, storage_options)
        final = Path(filepath)
        partial = partial_path(final)
        if self.is_global_zero:
            final.parent.mkdir(parents=True, exist_ok=True)
            remove(partial)  # left by a run killed while writing
        self.strategy.barrier("checkpoint-partial")
        with deferred_signals():
            try:
                super().save_checkpoint(partial, weights_only, storage_options)  # every rank writes its shards
                if self.is_global_zero:
                    publish(partial, final, self.global_step)
            except OSError as e:
                if self.is_global_zero:
                    remove(partial)
                reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
                kept = "still holds the previous checkpoint" if final.exists() else "was not created"
                raise StorageError(
                    f"cannot write checkpoint {final}: {reason} ({e.__class__.__name__}: {e}); nothing was left "
                    f"half-written and {final.name} {kept}. Free space under {final.parent} and resume with "
                    "ckpt_path=last"
                ) from e
        self.strategy.barrier("checkpoint-published")
