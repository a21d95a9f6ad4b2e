"""The GPT path end to end on the CPU: train, checkpoints, resume, TensorBoard, eval.py, generate.py."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from {{cookiecutter.package}} import train as api_train
from {{cookiecutter.package}}.networks import build_causal_lm
from {{cookiecutter.package}}.training import train

from .conftest import ROOT, TINY, run_script


def scalars(run_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    out["_text"] = acc.Tags()["tensors"]
    return out


def test_bench_times_steps_and_reports_the_networks_size(compose_cfg):
    from {{cookiecutter.package}}.benchmark import run_benchmark

    cfg = compose_cfg("bench", ["trainer=cpu", "bench.warmup=1", "bench.steps=2"])
    result = run_benchmark(cfg)
    net = build_causal_lm(cfg.model.net, "model.net")
    assert result["params_M"] == sum(p.numel() for p in net.parameters()) / 1e6 > 0
    assert result["timed_steps"] == 2 and result["step_ms"] > 0 and result["tokens_per_sec"] > 0


def test_fast_dev_run(compose_cfg):
    metrics = train(compose_cfg(overrides=["debug=fast_dev_run"]))
    assert metrics["val/loss"] > 0


@pytest.mark.slow
def test_train_logs_checkpoints_and_loads_in_a_fresh_process(compose_cfg, tmp_path):
    cfg = compose_cfg()
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    logged = scalars(out)
    for tag in ("train/loss", "val/loss", "val/ppl", "lr-AdamW/pg1", "perf/tokens_per_sec"):
        assert logged.get(tag), f"{tag} missing from TensorBoard: {sorted(logged)}"
    assert "samples/text_summary" in logged["_text"]
    assert metrics["val/ppl"] == pytest.approx(torch.tensor(metrics["val/loss"]).exp().item(), rel=1e-4)
    last = out / "checkpoints" / "last.ckpt"
    best = [p for p in (out / "checkpoints").glob("step*.ckpt")]
    assert last.is_file() and len(best) == 1
    for ckpt in (last, best[0]):  # torch >= 2.6 loads with weights_only=True: no pickled classes allowed
        code = f"import torch; c = torch.load({str(ckpt)!r}, weights_only=True); print(sorted(c))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "state_dict" in proc.stdout and "TextDataModule" in proc.stdout

    # eval.py and generate.py, as a user runs them, on that checkpoint.
    data = [
        f"data.paths=[{cfg.data.paths[0]}]",
        "data.tokenizer.vocab_size=512",
        "data.block_size=32",
        "data.val_windows=8",
        f"paths.data_dir={cfg.paths.data_dir}",
        "trainer=cpu",
    ]
    proc = run_script("eval.py", f"ckpt_path={last}", "data=text", *data, f"hydra.run.dir={tmp_path / 'eval'}")
    assert f"{metrics['val/loss']:.4f}"[:-1] in proc.stderr + proc.stdout  # same data, same weights
    assert "results after 4 steps:" in proc.stderr + proc.stdout  # the checkpoint's step (TINY: 4 steps)
    proc = run_script(
        "generate.py",
        f"ckpt_path={last}",
        "prompt=ROMEO:",
        "max_new_tokens=20",
        "num_samples=2",
        f"hydra.run.dir={tmp_path / 'gen'}",
    )
    assert proc.stdout.count("ROMEO:") == 2 and "sample 2" in proc.stdout


@pytest.mark.slow
def test_generate_takes_quoted_prompts_files_and_stdin(compose_cfg, tmp_path):
    """The README's prompt forms: Hydra-quoted with a comma and an emoji, a file, standard input.
    The printed text starts with the prompt and holds whole characters only (no U+FFFD)."""
    cfg = compose_cfg()
    train(cfg)
    ckpt = f"ckpt_path={Path(cfg.paths.output_dir) / 'checkpoints' / 'last.ckpt'}"
    (tmp_path / "prompt.txt").write_text("ROMEO:\nWhat light 🌅", encoding="utf-8")
    cases = [
        (['prompt="Good morrow, Kate 🎉"'], None, "Good morrow, Kate 🎉"),
        ([f"prompt_file={tmp_path / 'prompt.txt'}"], None, "ROMEO:\nWhat light 🌅"),
        (["prompt_file=-"], "Hi 🎉 there", "Hi 🎉 there"),
    ]
    for overrides, stdin, prompt in cases:
        proc = run_script("generate.py", ckpt, *overrides, "max_new_tokens=40", cwd=tmp_path, stdin=stdin)
        assert proc.stdout.startswith(prompt), (overrides, proc.stdout)
        assert "\ufffd" not in proc.stdout and len(proc.stdout) > len(prompt) + 1


def test_resume_continues_steps_schedule_and_data_order(compose_cfg, tmp_path):
    straight = compose_cfg(overrides=["trainer.max_steps=6", "trainer.val_check_interval=3"])
    train(straight)
    ref = torch.load(Path(straight.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)

    # Interrupted after 3 of 6 steps (a checkpoint is written at step 3), then resumed from last.ckpt.
    stop = ["+callbacks.stop._target_=tests.conftest.StopAtStep", "+callbacks.stop.step=3"]
    first = compose_cfg(overrides=["trainer.max_steps=6", "trainer.val_check_interval=3", *stop])
    first.paths.output_dir = str(tmp_path / "first")
    train(first)
    second = compose_cfg(
        overrides=[
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}",
        ]
    )
    second.paths.output_dir = str(tmp_path / "second")
    train(second)
    resumed = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True)

    assert resumed["global_step"] == ref["global_step"] == 6
    assert resumed["lr_schedulers"][0]["last_epoch"] == ref["lr_schedulers"][0]["last_epoch"]
    for key, value in ref["state_dict"].items():  # same batches in the same order: the same weights
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_overfit_debug_config_drives_the_loss_down(compose_cfg):
    cfg = compose_cfg(overrides=["debug=overfit", "trainer.max_steps=60", "trainer.val_check_interval=60"])
    train(cfg)
    losses = scalars(Path(cfg.paths.output_dir))["train/loss"]
    assert losses[-1] < 0.4 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.paths=[missing/corpus.txt]"], "error: data path 'missing/corpus.txt' does not exist"),
        (["data.paths=[BAD]"], "bad.jsonl:3: invalid JSON"),
        (["data.paths=[CORPUS]", "model.net.num_heads=5"], "d_model=128 must be divisible by num_heads=5"),
        ([], "error: data.paths is required"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, corpus, overrides, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    overrides = [o.replace("BAD", str(bad)).replace("CORPUS", str(corpus)) for o in overrides]
    proc = run_script(
        "train.py",
        "data=text",
        "trainer=cpu",
        f"paths.data_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "cache").glob("text-*")) if (tmp_path / "cache").exists() else True


def test_python_api_trains_with_the_config_train_py_composes(tmp_path):
    """api.train composes configs/train.yaml (no second copy of any default): the checkpoint's
    optimizer and schedule are exactly the YAML files' nodes."""
    import yaml

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"line {i}: the quick brown fox"}) + "\n" for i in range(400)))
    quiet = ["callbacks.text_samples=null", "callbacks.progress_bar=null", "callbacks.model_summary=null"]
    metrics = api_train(
        str(jsonl),
        "data.tokenizer.vocab_size=300",
        "data.block_size=16",
        "data.batch_size=4",
        "trainer=cpu",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1",
        *quiet,
        out_dir=str(tmp_path / "api"),
    )
    assert metrics["val/loss"] > 0
    ckpt = torch.load(tmp_path / "api" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    configs = ROOT / "configs" / "model"
    assert ckpt["hyper_parameters"]["optimizer"] == yaml.safe_load((configs / "optimizer" / "adamw.yaml").read_text())
    schedule = yaml.safe_load((configs / "scheduler" / "warmup_cosine.yaml").read_text())
    assert ckpt["hyper_parameters"]["scheduler"] == schedule
    assert (
        ckpt["hyper_parameters"]["net"]["num_layers"]
        == yaml.safe_load((configs / "net" / "tiny.yaml").read_text())["num_layers"]
    )


@pytest.mark.slow
def test_a_learning_rate_sweep_trains_one_run_per_value(tmp_path, corpus):
    """`python train.py -m model.optimizer.lr=1e-3,1e-2` from a fresh folder: one run folder each
    under its logs/ (Hydra computes the sweep folder itself: nothing here names it), logged apart."""
    run_script(
        "train.py",
        "-m",
        "model.optimizer.lr=1e-3,1e-2",
        *TINY,
        "trainer.max_steps=2",
        "callbacks.text_samples=null",
        f"data.paths=[{corpus}]",
        cwd=tmp_path,
    )
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    peaks = []
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file(), job
        peaks.append(torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"])
    assert [p["optimizer"]["lr"] for p in peaks] == [1e-3, 1e-2]
    assert all(scalars(sweep / job)["train/loss"] for job in ("0", "1"))


def test_last_checkpoint_holds_the_last_step_when_val_loss_stops_improving(compose_cfg):
    """lr=0 leaves the weights as they are, so val/loss is the same at every validation and only the
    first (step 2) is an improvement: Lightning's own ModelCheckpoint would leave last.ckpt at step 2.
    5 steps with validation every 2: the run ends between validations, at step 5."""
    cfg = compose_cfg(overrides=["model.optimizer.lr=0", "trainer.max_steps=5", "trainer.val_check_interval=2"])
    train(cfg)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5
    (best,) = folder.glob("step*.ckpt")
    assert best.name.startswith("step000002-")  # the best is still the first validation's
    assert torch.load(best, map_location="cpu", weights_only=True)["global_step"] == 2


def test_hparams_tab_holds_the_resolved_config_and_the_final_val_loss(compose_cfg):
    """TensorBoard's HPARAMS tab, read with TensorBoard's own reader: a session start with the
    resolved config, a session end with success, and val/loss among the run's scalars (the tab's
    metric columns are the session run's scalar tags; it shows the last value)."""
    from tensorboard.plugins.hparams import metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    cfg = compose_cfg(overrides=["model.optimizer.lr=0.002"])
    metrics = train(cfg)
    acc = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG]).session_start_info
    end = HParamsPluginData.FromString(content[metadata.SESSION_END_INFO_TAG]).session_end_info
    assert start.hparams["model/optimizer/lr"].number_value == 0.002
    assert start.hparams["data/block_size"].number_value == 32
    assert start.hparams["model/net/num_heads"].number_value == cfg.model.net.num_heads
    assert start.hparams["data/_target_"].string_value.endswith("TextDataModule")
    assert start.hparams["trainer/deterministic"].bool_value is False
    assert end.status == 1  # STATUS_SUCCESS
    val = [e.value for e in acc.Scalars("val/loss")]
    assert len(val) == 2 and val[-1] == pytest.approx(metrics["val/loss"], rel=1e-6)


def load_step_benchmark():
    spec = importlib.util.spec_from_file_location("gpt_step", ROOT / "benchmarks" / "gpt_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_step_benchmark_runs_each_variant_in_its_own_process_and_prints_a_table(capsys):
    bench = load_step_benchmark()
    argv = ["--device=cpu", "--dtype=fp32", "--batch=2", "--seq-len=16", "--warmup=1", "--steps=2"]
    argv += ["--variant", "foreach", "--variant", "fused", "optimizer=fused", "--profile", "fused"]
    rows = bench.main(argv)
    assert [(r["variant"], r["optimizer"], r["compile"]) for r in rows] == [
        ("foreach", "foreach", "none"),
        ("fused", "fused", "none"),
    ]
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] is None for r in rows)  # no peak FLOP/s on a CPU
    out = capsys.readouterr().out
    assert "most expensive kernels" in out and "aten::mm" in out  # the profiled variant's kernel table
    assert "tiny | cpu | fp32 | batch 2 x seq 16" in out and "tokens_per_s" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variant", "compile=full"], "start with a name"),
        (["--variant", "a", "compile=whole"], r"compile='whole'; expected one of \['none', 'blocks', 'full'\]"),
        (["--variant", "a", "speed=11"], "is not KEY=VALUE with KEY one of"),
        (["--variant", "a", "--variant", "a"], "names must differ"),
        (["--variant", "a", "--profile", "b"], "--profile 'b': no such variant"),
        (["--batch", "0"], "--batch must be positive"),
    ],
)
def test_step_benchmark_rejects_bad_variants_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_step_benchmark().parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_training_steps_read_nothing_back_from_the_device(compose_cfg, monkeypatch):
    """On a GPU, reading a tensor's value on the host (`.item()`, `float()`, `bool()`) waits for every
    kernel queued before it, and the GPU then idles while the CPU launches the next step. With the
    default callbacks and a fused optimizer (the default on GPUs), only logging steps read anything:
    not the loss for the progress bar, not the non-finite check (callbacks/progress.py, nonfinite.py)."""
    import lightning as L

    from {{cookiecutter.package}} import training
    from {{cookiecutter.package}}.callbacks.nonfinite import _Flag

    reads: dict[int, int] = {}
    step: list[int | None] = [None]

    def counting(original: Any) -> Any:
        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            # The non-finite check reads the previous step's flag from a host copy (pinned memory on a
            # GPU, read once an event of that step has passed): no wait for the step in progress.
            if step[0] is not None and sys._getframe(1).f_code is not _Flag.read.__code__:
                reads[step[0]] = reads.get(step[0], 0) + 1
            return original(self, *args, **kwargs)

        return counted

    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))

    class StepWindows(L.Callback):  # reads from one step's start to the next step's start count for the step
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            step[0] = trainer.global_step + 1

        def on_train_end(self, *args: Any) -> None:
            step[0] = None

    build = training.build_trainer
    monkeypatch.setattr(training, "build_trainer", lambda cfg, callbacks: build(cfg, [*callbacks, StepWindows()]))
    overrides = ["trainer.max_steps=12", "trainer.val_check_interval=12", "trainer.log_every_n_steps=4"]
    train(compose_cfg(overrides=[*overrides, "model.optimizer.fused=true"]))
    assert [s for s in range(1, 12) if reads.get(s)] == [4, 8], reads  # log steps: Lightning's loggers, the bar
