"""The distillation module on the CPU: a tiny teacher trained here teaches a tiny student."""

import importlib.util
import logging
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from {{cookiecutter.package}}.checkpoints import consolidate
from {{cookiecutter.package}}.errors import ConfigError, DataPathError
from {{cookiecutter.package}}.generation import load_checkpoint_for_generation
from {{cookiecutter.package}}.modules.distill import DistillModule
from {{cookiecutter.package}}.modules.gpt import GPTModule
from {{cookiecutter.package}}.training import build_trainer, evaluate, train

from .conftest import ROOT, TINY, compose_at, run_script
from .test_gpt_training import scalars

QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_dir, corpus) -> tuple[Path, dict[str, float]]:
    """A tiny GPT trained for 4 steps on the test corpus, with dropout (which eval mode must switch
    off): (its last.ckpt, its final metrics). Every test here distils it."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = compose_at(out, data_dir, corpus, overrides=["model.net.dropout=0.1", "callbacks.text_samples=null", *QUIET])
    metrics = train(cfg)
    return out / "out" / "checkpoints" / "last.ckpt", metrics


def distill_overrides(ckpt: Path, *extra: str) -> list[str]:
    """model=distill with the tiny test data; the student is the tiny preset with 2 layers."""
    return ["model=distill", f"model.teacher.ckpt_path={ckpt}", "model.net.num_layers=2", *QUIET, *extra]


def distill_kwargs(compose_cfg, *overrides: str) -> dict:
    """DistillModule's keyword arguments as configs/model/distill.yaml gives them (tiny data), plain."""
    node = OmegaConf.to_container(compose_cfg(overrides=["model=distill", *overrides]).model, resolve=True)
    return {k: v for k, v in node.items() if not k.startswith("_")}


def net_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("net.") :]: v for k, v in state_dict.items() if k.startswith("net.")}


class Probe(L.Callback):
    """Records at every training step what must hold: the teacher in eval mode and deterministic,
    the student in train mode, and after backward gradients on every student parameter only."""

    def __init__(self) -> None:
        self.teacher_training, self.student_training, self.teacher_repeats = [], [], []
        self.student_grads, self.teacher_grads = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.teacher_training.append(any(m.training for m in pl_module.teacher.modules()))
        self.student_training.append(pl_module.net.training)
        with torch.no_grad():  # dropout on would make two forwards of the same batch differ
            self.teacher_repeats.append(torch.equal(pl_module.teacher(batch[0]), pl_module.teacher(batch[0])))

    def on_after_backward(self, trainer, pl_module) -> None:
        self.student_grads.append(
            all(p.grad is not None and p.grad.abs().sum() > 0 for p in pl_module.net.parameters())
        )
        self.teacher_grads.append(any(p.grad is not None for p in pl_module.teacher.parameters()))


def test_fit_trains_only_the_student_and_keeps_the_teacher_frozen_in_eval_mode(compose_cfg, teacher):
    ckpt, _ = teacher
    cfg = compose_cfg(overrides=distill_overrides(ckpt, "model.net.dropout=0.1", "callbacks.text_samples=null"))
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    trainer = build_trainer(cfg)
    probe = Probe()
    trainer.callbacks.append(probe)
    trainer.fit(model, datamodule=datamodule)

    assert model.teacher.config.dropout == 0.1  # so eval mode is what keeps the teacher deterministic
    assert len(probe.teacher_training) == 4  # every step, including those after each validation
    assert probe.teacher_training == [False] * 4 and probe.teacher_repeats == [True] * 4
    assert probe.student_training == [True] * 4  # Lightning did put the module in train mode
    assert probe.student_grads == [True] * 4 and probe.teacher_grads == [False] * 4
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.net.parameters()}
    assert not any(p.requires_grad for p in model.teacher.parameters())
    original = net_weights(torch.load(ckpt, weights_only=True)["state_dict"])
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, original[key]), key  # bit for bit: the teacher never moved
    assert model.teacher.training is False


@pytest.mark.slow
def test_train_logs_saves_the_student_and_eval_compares_it_with_the_teacher(compose_cfg, teacher, caplog):
    ckpt, teacher_metrics = teacher
    cfg = compose_cfg(overrides=distill_overrides(ckpt))
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    logged = scalars(out)
    for tag in (
        "train/loss",
        "train/kl",
        "train/ce",
        "val/loss",
        "val/ppl",
        "val/teacher_loss",
        "val/teacher_ppl",
        "val/kl",
        "perf/tokens_per_sec",
    ):
        assert logged.get(tag), f"{tag} missing from TensorBoard: {sorted(logged)}"
    assert "samples/text_summary" in logged["_text"]  # text samples come from the student (`net`)
    # The same val windows and the same teacher weights: the teacher's own run measured the same loss.
    assert metrics["val/teacher_loss"] == pytest.approx(teacher_metrics["val/loss"], rel=1e-5)
    assert metrics["val/teacher_ppl"] == pytest.approx(torch.tensor(metrics["val/teacher_loss"]).exp().item())

    # Checkpoints hold the student (and its training state), not the frozen teacher.
    folder = out / "checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["state_dict"] and all(k.startswith("net.") for k in last["state_dict"])
    assert "optimizer_states" in last and "TextDataModule" in last
    resumable = DistillModule.load_from_checkpoint(folder / "last.ckpt", weights_only=True)
    for key, value in net_weights(last["state_dict"]).items():
        assert torch.equal(resumable.net.state_dict()[key], value), key
    teacher_weights = net_weights(torch.load(ckpt, weights_only=True)["state_dict"])
    assert all(torch.equal(v, teacher_weights[k]) for k, v in resumable.teacher.state_dict().items())

    # The result: the best student as a plain GPT checkpoint, readable by every GPT tool.
    best = torch.load(next(folder.glob("step*.ckpt")), weights_only=True)
    student = torch.load(folder / "student.ckpt", weights_only=True)
    assert (folder / "student.ckpt").stat().st_mode & 0o777 == (folder / "last.ckpt").stat().st_mode & 0o777
    assert "optimizer_states" not in student and student["distilled_from"]["teacher"]["ckpt_path"] == str(ckpt)
    gpt = GPTModule.load_from_checkpoint(folder / "student.ckpt", weights_only=True)
    assert gpt.config.num_layers == 2
    for key, value in net_weights(best["state_dict"]).items():
        assert torch.equal(gpt.net.state_dict()[key], value), key
    for path in (folder / "student.ckpt", folder / "last.ckpt"):
        net, tokenizer = load_checkpoint_for_generation(str(path))  # what generate.py does
        assert net.config.num_layers == 2 and tokenizer.get_vocab_size() <= 512

    # eval.py's work: student and teacher on the same data, the numbers training reported, in the report.
    with caplog.at_level(logging.INFO):
        evaluated = evaluate(compose_cfg("eval", ["model=distill", f"ckpt_path={folder / 'last.ckpt'}"]))
    for name in ("val/loss", "val/ppl", "val/teacher_loss", "val/teacher_ppl"):
        assert evaluated[name] == pytest.approx(metrics[name], rel=1e-5), name
        assert f"{name}  {metrics[name]:.4f}"[:-1] in caplog.text


def test_bf16_autocast_with_a_preset_teacher_runs(compose_cfg):
    cfg = compose_cfg(
        overrides=[
            "model=distill",
            "model.net.num_layers=2",
            "debug=fast_dev_run",
            "trainer.precision=bf16-mixed",
            *QUIET,
        ]
    )
    assert cfg.model.teacher.ckpt_path is None  # the preset teacher: random weights, for benchmarks and tests
    with pytest.warns(UserWarning, match="teacher is a randomly initialised model.teacher.net"):
        metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"])) and metrics["val/teacher_ppl"] > 1


def test_a_teacher_with_another_vocabulary_size_is_one_clear_error(compose_cfg, teacher):
    kwargs = distill_kwargs(compose_cfg, "model.net.vocab_size=640", f"model.teacher.ckpt_path={teacher[0]}")
    module = DistillModule(**kwargs)
    with pytest.raises(ConfigError, match=r"has vocab_size=512 but the student \(model.net.vocab_size\) has 640"):
        module.configure_model()


def test_a_teacher_with_another_tokenizer_of_the_same_size_is_one_clear_error(compose_cfg, teacher, tmp_path, corpus):
    one_play = tmp_path / "one-play"
    one_play.mkdir()
    shutil.copy(sorted(corpus.iterdir())[1], one_play)  # a BPE trained on other text numbers tokens differently
    cfg = compose_cfg(overrides=distill_overrides(teacher[0], f"data.paths=[{one_play}]", "debug=fast_dev_run"))
    with pytest.raises(ConfigError, match="was trained with another tokenizer than this run's data"):
        train(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.loss.alpha=1.5"], r"model.loss.alpha must be in \[0, 1\]"),
        (["model.loss.kind=js"], "model.loss.kind must be one of"),
        (["+model.loss.alpah=0.5"], r"model.loss has unknown keys \['model.loss.alpah'\]"),
        (["model.teacher.net=null"], "model.teacher: set ckpt_path"),
        (["model.teacher.ckpt_path=a.ckpt", "model.teacher.hf=gpt2"], "model.teacher: set ckpt_path or hf, not both"),
        (["model.teacher.net.max_length=16"], "reads at most 16 tokens"),
        (["model.net.d_model=130"], "model.net: GPTConfig.d_model=130 must be divisible by num_heads=4"),
        (
            ["model.net._target_=torch.nn.Linear"],
            r"model.net: torch.nn.Linear does not take these arguments: missing a required argument: 'in_features'",
        ),
        (
            ["model.net._target_=torch.nn.Identity"],
            r"torch.nn.Identity is not a causal language model: it lacks \['loss'",
        ),
        (["model.teacher.net._target_=torch.nn.Linearr"], r"model.teacher.net._target_='torch.nn.Linearr' cannot be"),
    ],
)
def test_bad_settings_name_the_config_key(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        DistillModule(**distill_kwargs(compose_cfg, *overrides))


def test_loading_is_strict_about_everything_but_the_teacher(compose_cfg):
    module = DistillModule(**distill_kwargs(compose_cfg, "data.block_size=16", "model.net.num_layers=1"))
    module.configure_model()
    state = module.state_dict()
    assert state and not any("teacher" in k for k in state)  # the teacher is never saved ...
    module.load_state_dict(state)  # ... nor expected back
    with pytest.raises(RuntimeError, match=r"missing \['net.ln_f.weight'\]"):
        module.load_state_dict({k: v for k, v in state.items() if k != "net.ln_f.weight"})
    with pytest.raises(RuntimeError, match=r"unexpected \['net.extra'\]"):
        module.load_state_dict({**state, "net.extra": torch.zeros(1)})


def test_a_missing_teacher_checkpoint_names_the_key(compose_cfg):
    module = DistillModule(**distill_kwargs(compose_cfg, "model.teacher.ckpt_path=nowhere.ckpt"))
    with pytest.raises(DataPathError, match="model.teacher.ckpt_path='nowhere.ckpt' does not exist"):
        module.configure_model()


def test_eval_of_a_gpt_checkpoint_with_model_distill_says_which_model_wrote_it(compose_cfg, teacher):
    cfg = compose_cfg("eval", ["model=distill", f"ckpt_path={teacher[0]}"])
    with pytest.raises(
        ConfigError, match=r"not written by DistillModule \(it needs hyper-parameters \['teacher', 'loss'\]"
    ):
        evaluate(cfg)


def test_step_benchmark_runs_on_the_cpu_and_prints_its_table(capsys):
    spec = importlib.util.spec_from_file_location("distill_step", ROOT / "benchmarks" / "distill_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = [
        "--device=cpu",
        "--batch=2",
        "--seq-len=16",
        "--vocab-size=300",
        "--student-set",
        "num_layers=2",
        "d_model=64",
        "--warmup=1",
        "--steps=2",
        "--chunk-size=7",
    ]
    rows = bench.main(args)
    assert [r["row"] for r in rows] == ["student", "distill", "teacher fwd", "loss only"]
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "ms/step" in out and "tokens/s" in out and "vocab 300" in out


def launch(run_dir: Path, teacher: Path, corpus: Path, data_dir: Path, *overrides: str) -> Path:
    """train.py in 2 CPU processes (gloo), float32; returns the run's checkpoint folder."""
    run_script(
        "train.py",
        *TINY,
        f"data.paths=[{corpus}]",
        f"paths.data_dir={data_dir}",
        *distill_overrides(teacher, "callbacks.text_samples=null"),
        *overrides,
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        f"hydra.run.dir={run_dir}",
    )
    return run_dir / "checkpoints"


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(teacher, tmp_path, corpus, data_dir):
    folder = launch(tmp_path / "ddp", teacher[0], corpus, data_dir, "trainer=ddp")
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert all(k.startswith("net.") for k in last["state_dict"])  # the replicated teacher is not saved
    assert (folder / "student.ckpt").is_file()


@pytest.mark.slow
def test_fsdp2_shards_both_networks_and_resumes_from_sharded_and_single_file_checkpoints(
    teacher, tmp_path, corpus, data_dir
):
    fsdp = ["trainer=fsdp", "trainer.strategy.param_dtype=null", "trainer.strategy.reduce_dtype=null"]
    stop = ["+callbacks.stop._target_=tests.conftest.StopAtStep", "+callbacks.stop.step=2"]
    first = launch(tmp_path / "a", teacher[0], corpus, data_dir, *fsdp, *stop)
    assert (first / "last.ckpt" / "meta.pt").is_file()  # sharded: one file per rank
    # Each resume loads into a module whose (sharded) teacher is not in the checkpoint: from the shards,
    # then from the single file the second run gathers.
    one_file = ["trainer.strategy.save_distributed_checkpoint=false"]
    second = launch(tmp_path / "b", teacher[0], corpus, data_dir, *fsdp, *one_file, f"ckpt_path={first / 'last.ckpt'}")
    assert (second / "last.ckpt").is_file()
    third = launch(
        tmp_path / "c", teacher[0], corpus, data_dir, *fsdp, "trainer.max_steps=6", f"ckpt_path={second / 'last.ckpt'}"
    )
    full = torch.load(consolidate(third / "last.ckpt", tmp_path / "full.ckpt"), weights_only=True)
    assert full["global_step"] == 6 and all(k.startswith("net.") for k in full["state_dict"])
    assert GPTModule.load_from_checkpoint(tmp_path / "full.ckpt", weights_only=True).config.num_layers == 2
