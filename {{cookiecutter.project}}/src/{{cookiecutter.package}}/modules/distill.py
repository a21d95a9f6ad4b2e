"""LightningModule for knowledge distillation: a frozen teacher language model trains a student.

    L = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)   (losses/distill.py)

Both follow the causal-LM protocol (networks.CausalLM). The student is `net`, as in GPTModule:
the network this module trains, the one TextSamples samples from, the one every checkpoint holds
under `net.*` with its `_target_` node under hyper_parameters["net"]. A distillation checkpoint is
therefore also a GPT checkpoint: generate.py, `eval.py model=gpt` and
GPTModule.load_from_checkpoint read the student from it, and it can teach the next student.

The teacher comes from `teacher.ckpt_path`, a checkpoint this project wrote or imported (its
architecture, weights and tokenizer come from the file), from `teacher.hf`, a Hugging Face GPT-2
folder converted as it loads (hf.py), or, without either, from the node `teacher.net`, randomly
initialised (benchmarks, tests). It is frozen: requires_grad off, eval mode through every
.train() call (dropout off), forward under no_grad. It is not part of this module's state_dict:
checkpoints hold the student, the optimizer and the tokenizer, and loading one rebuilds the teacher
from `teacher` (so the teacher checkpoint must still be where it was).

At the end of fit, the best student (by val/loss) is also written as `student.ckpt` beside the
Lightning checkpoints: weights and tokenizer only, in GPTModule's format. That file is the result.

TensorBoard: train/loss (the total), train/kl, train/ce; val/loss and val/ppl (the student's CE
and perplexity, the same numbers a GPT run reports), val/teacher_loss, val/teacher_ppl, val/kl.
"""

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from ..checkpoints import save_atomically
from ..errors import ConfigError, DataPathError
from ..generation import load_network_checkpoint
from ..losses.distill import KINDS, distillation_loss
from ..networks import CausalLM, build_causal_lm, compile_units
from .optim import configure_optimizers

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels that count in no term (padding)
TEACHER_KEYS = ("ckpt_path", "hf", "net")
LOSS_KEYS = ("alpha", "temperature", "kind", "chunk_size")
# What a GPT checkpoint keeps of a distillation checkpoint: no optimizer, schedule, loop or callback state.
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks", "hparams_name")


def _check_keys(values: dict[str, Any], expected: tuple[str, ...], key: str) -> dict[str, Any]:
    """The node as configs/model/distill.yaml writes it: every key there, no other (no defaults here)."""
    unknown, missing = sorted(set(values) - set(expected)), sorted(set(expected) - set(values))
    if unknown or missing:
        raise ConfigError(
            f"{key} has unknown keys {[f'{key}.{k}' for k in unknown]} and lacks {[f'{key}.{k}' for k in missing]}; "
            f"expected exactly {list(expected)}"
        )
    return dict(values)


def _check_loss(loss: dict[str, Any]) -> None:
    if not 0.0 <= loss["alpha"] <= 1.0:
        raise ConfigError(f"model.loss.alpha must be in [0, 1] (the weight of the KL term), got {loss['alpha']!r}")
    if not loss["temperature"] > 0:
        raise ConfigError(f"model.loss.temperature must be > 0, got {loss['temperature']!r}")
    if loss["kind"] not in KINDS:
        raise ConfigError(f"model.loss.kind must be one of {list(KINDS)}, got {loss['kind']!r}")
    chunk = loss["chunk_size"]
    if chunk is not None and (not isinstance(chunk, int) or chunk <= 0):
        raise ConfigError(f"model.loss.chunk_size must be a positive integer or null, got {chunk!r}")


def check_compatible(teacher: Any, student: Any, teacher_source: str) -> None:
    """Teacher and student configs (vocab_size, max_length) must share the tokenizer (the same logit
    columns) and the context."""
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(
            f"the teacher ({teacher_source}) has vocab_size={teacher.vocab_size} but the student "
            f"(model.net.vocab_size) has {student.vocab_size}: teacher and student must share the tokenizer; "
            "use the data settings (data.tokenizer.*) the teacher was trained with"
        )
    if teacher.max_length < student.max_length:
        raise ConfigError(
            f"the teacher ({teacher_source}) reads at most {teacher.max_length} tokens but the student's windows "
            f"(model.net.max_length, from data.block_size) are {student.max_length}: lower data.block_size"
        )


def _is_teacher_key(key: str) -> bool:
    return key.startswith("teacher.") or ".teacher." in key  # with or without a wrapper's prefix


def _drop_teacher_weights(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    # The teacher is rebuilt from its own source; saving it would copy a frozen model into every checkpoint.
    for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        del state_dict[key]


def _strict_but_for_the_teacher(module: torch.nn.Module, incompatible: Any) -> None:
    """Checkpoints never hold the teacher: its keys are expected missing. Everything else is checked
    here, strictly, because Lightning is told to load this module non-strictly (strict_loading)."""
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not _is_teacher_key(k)]
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise RuntimeError(
            f"the checkpoint does not fit {type(module).__name__}: missing {incompatible.missing_keys[:5]}, "
            f"unexpected {incompatible.unexpected_keys[:5]}"
        )


class DistillModule(L.LightningModule):
    """Hyperparameters are plain dicts, so checkpoints load with torch.load(weights_only=True).

    net: the student's `_target_` node (configs/model/net/*.yaml).
    teacher: {ckpt_path: a .ckpt train.py or hf.py wrote, or null; hf: a Hugging Face GPT-2 folder, or
        null; net: a `_target_` node, used (randomly initialised) when both are null}.
    loss: {alpha: weight of the KL term, temperature, kind: forward | reverse KL, chunk_size: tokens
        per chunk of the loss (memory), or null}. optimizer, scheduler, compile: as in GPTModule.
    """

    work_unit = "tokens"  # what the throughput callback counts

    def __init__(
        self,
        net: dict[str, Any],
        teacher: dict[str, Any],
        loss: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        compile: bool,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        with torch.device("meta"):  # checked and counted once, before any strategy shards the weights
            student = build_causal_lm(net, "model.net")
        self.config = student.config
        self.flops_per_token = student.flops_per_token
        self.teacher_spec = _check_keys(teacher, TEACHER_KEYS, "model.teacher")
        self.loss_cfg = _check_keys(loss, LOSS_KEYS, "model.loss")
        _check_loss(self.loss_cfg)
        if self.teacher_spec["ckpt_path"] is not None and self.teacher_spec["hf"] is not None:
            raise ConfigError("model.teacher: set ckpt_path or hf, not both (each brings its own weights)")
        if self.teacher_spec["ckpt_path"] is None and self.teacher_spec["hf"] is None:
            if self.teacher_spec["net"] is None:
                raise ConfigError(
                    "model.teacher: set ckpt_path (a checkpoint train.py wrote), hf (a Hugging Face GPT-2 folder) "
                    "or net (a preset, randomly initialised)"
                )
            # A preset teacher is known now: check it before anything runs. A checkpoint is read in configure_model.
            with torch.device("meta"):
                preset = build_causal_lm(self.teacher_spec["net"], "model.teacher.net")
            check_compatible(preset.config, self.config, "model.teacher.net")
        self.net: CausalLM | None = None  # the student
        self.teacher: CausalLM | None = None
        self.teacher_vocab: dict[str, int] | None = None  # the teacher's tokenizer, when it came from a file
        self.val_loss, self.val_teacher_loss, self.val_kl = MeanMetric(), MeanMetric(), MeanMetric()
        self.register_state_dict_post_hook(_drop_teacher_weights)
        self.register_load_state_dict_post_hook(_strict_but_for_the_teacher)
        # Some of Lightning's loaders check keys themselves (FSDP2 resuming from a single file expects every
        # parameter, the teacher's too) unless loading is non-strict; the hook above is the strict check.
        self.strict_loading = False

    # ----- building -------------------------------------------------------------------------------

    def configure_model(self) -> None:
        # Built here, not in __init__, so sharded strategies can create the weights already partitioned.
        if self.net is not None:
            return
        teacher = self._build_teacher()
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()
        self.net = build_causal_lm(self.hparams.net, "model.net")
        if self.hparams.compile:
            compile_units(self.net)
            compile_units(self.teacher)
        self._check_tokenizer()

    def _build_teacher(self) -> CausalLM:
        path, hf_dir = self.teacher_spec["ckpt_path"], self.teacher_spec["hf"]
        if path is None and hf_dir is None:
            rank_zero_warn(
                "model.teacher.ckpt_path is not set: the teacher is a randomly initialised model.teacher.net "
                "(fine for benchmarks and tests; a real run distils a trained teacher)"
            )
            return build_causal_lm(self.teacher_spec["net"], "model.teacher.net")
        if path is not None:
            source = f"model.teacher.ckpt_path={path}"
            teacher, tokenizer = load_network_checkpoint(path, key="model.teacher.ckpt_path")
        else:
            from ..hf import load_pretrained  # transformers' format; safetensors only when used

            source = f"model.teacher.hf={hf_dir}"
            teacher, tokenizer = load_pretrained(hf_dir, key="model.teacher.hf")
        check_compatible(teacher.config, self.config, source)
        self.teacher_vocab = tokenizer.get_vocab()
        log.info("teacher: %s (%s, %.2fM parameters)", source, type(teacher).__name__, teacher.num_params() / 1e6)
        return teacher

    def _check_tokenizer(self) -> None:
        """Same vocabulary size is not enough: two BPEs trained on different text number tokens differently."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if self.teacher_vocab is None or tokenizer is None:
            return
        ours = tokenizer.get_vocab()
        if ours != self.teacher_vocab:
            differ = sum(self.teacher_vocab.get(token) != i for token, i in ours.items())
            raise ConfigError(
                f"the teacher (model.teacher.ckpt_path={self.teacher_spec['ckpt_path']}) was trained with another "
                f"tokenizer than this run's data ({differ} of {len(ours)} tokens have other ids): teacher and "
                "student must share the tokenizer; use the data settings (data.paths, data.tokenizer.*) of the "
                "teacher's run"
            )

    def setup(self, stage: str) -> None:
        if self.teacher is not None:  # loaded by load_from_checkpoint (eval.py): check against this data
            self._check_tokenizer()

    def on_fit_start(self) -> None:
        # Lightning warns about modules in eval mode when training starts; the frozen teacher is meant to
        # be. Silence exactly that count, so a student module left in eval mode still gets the warning.
        n = sum(1 for _ in self.teacher.modules())
        warnings.filterwarnings(
            "ignore", message=re.escape(f"Found {n} module(s) in eval mode at the start of training")
        )

    def train(self, mode: bool = True) -> "DistillModule":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: dropout stays off, whatever mode the student is in
        return self

    # ----- steps ------------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def _losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """x, y: (B, T) -> the loss dict and the teacher's logits (B, T, V_padded)."""
        with torch.no_grad():
            teacher_logits = self.teacher(x)  # (B, T, V_padded)
        student_logits = self.net(x)  # (B, T, V_padded)
        out = distillation_loss(
            student_logits,
            teacher_logits,
            y,
            alpha=self.loss_cfg["alpha"],
            temperature=self.loss_cfg["temperature"],
            kind=self.loss_cfg["kind"],
            ignore_index=IGNORE_INDEX,
            vocab_size=self.config.vocab_size,  # the padding columns of the head carry no knowledge
            chunk_size=self.loss_cfg["chunk_size"],
        )
        return out, teacher_logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # (B, T), (B, T)
        out, _ = self._losses(x, y)
        self.log("train/loss", out["loss"])
        self.log_dict({"train/kl": out["kl"], "train/ce": out["ce"]})
        return out["loss"]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        out, teacher_logits = self._losses(x, y)
        n = int((y != IGNORE_INDEX).sum())
        # The teacher's CE as the protocol's loss computes it (over the real vocabulary), so
        # val/teacher_loss is its own run's val/loss.
        logits = teacher_logits[..., : self.config.vocab_size].flatten(0, 1).float()  # (B*T, V)
        teacher_ce = F.cross_entropy(logits, y.flatten(), ignore_index=IGNORE_INDEX)
        self.val_loss.update(out["ce"], weight=n)
        self.val_kl.update(out["kl"], weight=n)
        self.val_teacher_loss.update(teacher_ce, weight=n)

    def on_validation_epoch_end(self) -> None:
        # Token-weighted means over every rank's batches; already equal on every rank (sync_dist only says so).
        student, teacher, kl = self.val_loss.compute(), self.val_teacher_loss.compute(), self.val_kl.compute()
        for metric in (self.val_loss, self.val_teacher_loss, self.val_kl):
            metric.reset()
        self.log("val/loss", student, prog_bar=True, sync_dist=True)
        self.log_dict(
            {"val/ppl": student.exp(), "val/teacher_loss": teacher, "val/teacher_ppl": teacher.exp(), "val/kl": kl},
            sync_dist=True,
        )

    def configure_optimizers(self) -> dict[str, Any]:
        # trainer.model is what the strategy wrapped; the frozen teacher's parameters are filtered out
        # (requires_grad is off), so only the student's reach AdamW.
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        return configure_optimizers(self, params, self.hparams.optimizer, self.hparams.scheduler)

    def count_work(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, float]:
        """(tokens, FLOPs): the student's training FLOPs plus the teacher's forward, which runs every
        step too: a third of its training FLOPs (forward 1x, backward 2x)."""
        x, _ = batch
        per_token = self.flops_per_token(x.shape[1])
        if self.teacher is not None:
            per_token += self.teacher.flops_per_token(x.shape[1]) / 3
        return x.numel(), float(per_token * x.numel())

    # ----- the result -------------------------------------------------------------------------------

    def on_train_end(self) -> None:
        callback = self.trainer.checkpoint_callback
        source = callback and (callback.best_model_path or callback.last_model_path)
        if not self.trainer.is_global_zero or not source:
            return
        if Path(source).is_dir():
            log.info(
                "sharded checkpoint %s: consolidate it (python -m %s.checkpoints <folder> student.ckpt); the "
                "single file is a GPT checkpoint of the student",
                source,
                __package__.split(".")[0],
            )
            return
        out = export_student(source, Path(source).parent / "student.ckpt")
        log.info("the student: %s (from %s)", out, source)


def export_student(ckpt_path: str | Path, out_path: str | Path) -> Path:
    """Write the student of a distillation checkpoint as a GPT checkpoint: its weights (`net.*`), its
    config, the tokenizer, and the distillation settings under `distilled_from`; no training state.
    GPTModule.load_from_checkpoint, eval.py model=gpt and generate.py read it."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    if "teacher" not in hparams or "net" not in hparams:
        raise DataPathError(f"{ckpt_path} is not a distillation checkpoint (hyper_parameters has {sorted(hparams)})")
    out = {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}
    out["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    out["hyper_parameters"] = {k: hparams[k] for k in ("net", "optimizer", "scheduler", "compile") if k in hparams}
    out["distilled_from"] = {"teacher": hparams["teacher"], "loss": hparams.get("loss")}
    return save_atomically(out, out_path)
