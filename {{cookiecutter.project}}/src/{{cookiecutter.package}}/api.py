"""Training from Python, without Hydra:

    from {{cookiecutter.package}} import GPTConfig, train
    module = train(GPTConfig.from_name("tiny"), train_data="train.jsonl", max_steps=500)

The same objects as `python train.py` builds from configs/, with the same defaults.
"""

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from .callbacks.checkpoint import ModelCheckpoint
from .callbacks.nonfinite import NonFiniteLoss
from .callbacks.preemption import Preemption
from .callbacks.throughput import Throughput
from .data.text import TextDataModule
from .models.gpt import GPTConfig
from .modules.gpt import GPTModule
from .trainer import Trainer


def train(
    config: GPTConfig,
    train_data: str | list[str],
    *,
    max_steps: int = 1000,
    batch_size: int = 32,
    lr: float = 6e-4,
    warmup_steps: int = 100,
    out_dir: str = "logs/api",
    tokenizer_path: str | None = None,
    text_key: str = "text",
    val_fraction: float = 0.05,
    seed: int = 1337,
    **trainer_kwargs: Any,
) -> GPTModule:
    """Train a GPT on text files / folders / JSONL. The tokenizer is trained with
    `config.vocab_size` tokens (or loaded from `tokenizer_path`), windows are `config.max_length`
    long. Checkpoints and TensorBoard logs go to `out_dir`. Extra keywords go to `lightning.Trainer`
    (e.g. `accelerator="gpu", precision="bf16-mixed"`). Returns the trained module."""
    L.seed_everything(seed, workers=True)
    datamodule = TextDataModule(
        paths=train_data,
        block_size=config.max_length,
        batch_size=batch_size,
        tokenizer={"vocab_size": config.vocab_size, "path": tokenizer_path},
        text_key=text_key,
        val_fraction=val_fraction,
        cache_dir=str(Path(out_dir) / "cache"),
        seed=seed,
    )
    module = GPTModule(
        net=config.to_dict(),
        optimizer={"lr": lr},
        scheduler={"warmup_steps": warmup_steps},
    )
    trainer_kwargs = {
        "max_steps": max_steps,
        "val_check_interval": min(250, max_steps),
        "check_val_every_n_epoch": None,
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 10,
        **trainer_kwargs,
    }
    trainer = Trainer(  # atomic checkpoints (trainer.py)
        logger=TensorBoardLogger(out_dir, name="tensorboard", default_hp_metric=False),
        callbacks=[
            ModelCheckpoint(dirpath=str(Path(out_dir) / "checkpoints"), monitor="val/loss", save_last=True),
            Throughput(log_every_n_steps=trainer_kwargs["log_every_n_steps"]),
            Preemption(),
            NonFiniteLoss(),
        ],
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=datamodule)
    return module
