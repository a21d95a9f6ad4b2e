"""The GPT path end to end on the CPU: train, checkpoints, resume, TensorBoard, eval.py, generate.py."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from {{cookiecutter.package}} import train as api_train
from {{cookiecutter.package}}.training import train

from .conftest import ROOT, TINY, run_script


def scalars(run_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    out["_text"] = acc.Tags()["tensors"]
    return out


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
    proc = run_script(
        "generate.py",
        f"ckpt_path={last}",
        "prompt=ROMEO:",
        "max_new_tokens=20",
        "num_samples=2",
        f"hydra.run.dir={tmp_path / 'gen'}",
    )
    assert proc.stdout.count("ROMEO:") == 2 and "sample 2" in proc.stdout


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


@pytest.mark.slow
def test_unknown_config_key_is_rejected_by_name(tmp_path):
    proc = run_script("train.py", "model.optimizer.lrr=0.1", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "Key 'lrr' is not in struct" in proc.stderr and "Traceback" not in proc.stderr


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
    """`python train.py -m model.optimizer.lr=1e-3,1e-2`: one run folder each, logged apart."""
    sweep = tmp_path / "sweep"
    run_script(
        "train.py",
        "-m",
        "model.optimizer.lr=1e-3,1e-2",
        *TINY,
        "trainer.max_steps=2",
        "callbacks.text_samples=null",
        f"data.paths=[{corpus}]",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep}",
    )
    peaks = []
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file(), job
        peaks.append(torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"])
    assert [p["optimizer"]["lr"] for p in peaks] == [1e-3, 1e-2]
    assert all(scalars(sweep / job)["train/loss"] for job in ("0", "1"))


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
