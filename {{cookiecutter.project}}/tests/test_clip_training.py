"""The CLIP path end to end on the CPU: train on shapes, TensorBoard, checkpoints, eval.py, the
pipeline, retrieval metrics against torchmetrics, and the step benchmark."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.retrieval import RetrievalRecall

from {{cookiecutter.package}}.data.shapes import KINDS, ShapesDataset
from {{cookiecutter.package}}.modules.clip import retrieval_recall
from {{cookiecutter.package}}.pipeline import MultiModalPipeline
from {{cookiecutter.package}}.training import train

from .conftest import CLIP_TINY, ROOT, run_script

pytestmark = pytest.mark.usefixtures("single_thread")


def tensorboard(run_dir: Path) -> tuple[dict[str, list[float]], list[str]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc.Tags()["images"]


def test_fast_dev_run(compose_cfg):
    metrics = train(compose_cfg(overrides=[*CLIP_TINY, "debug=fast_dev_run"], tiny=False))
    assert metrics["val/loss"] > 0 and 0 <= metrics["val/i2t_R@1"] <= 1


@pytest.mark.slow
def test_train_logs_checkpoints_evaluates_and_serves(compose_cfg, tmp_path):
    # One validation, at the end: Lightning >= 2.6 rewrites last.ckpt only when the monitored metric
    # improves, so with a single validation last.ckpt certainly holds the weights behind `metrics`.
    cfg = compose_cfg(overrides=[*CLIP_TINY, "trainer.val_check_interval=4"], tiny=False)
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    scalars, images = tensorboard(out)
    expected = [
        "train/loss",
        "train/loss_image_to_text",
        "train/logit_scale",
        "val/loss",
        "val/zero_shot_acc",
        "perf/samples_per_sec",
        "lr-AdamW/pg1",
    ]
    expected += [f"val/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    for tag in expected:
        assert scalars.get(tag), f"{tag} missing from TensorBoard: {sorted(scalars)}"
    assert scalars["train/logit_scale"][0] == pytest.approx(1 / 0.07, rel=1e-3)
    assert images == ["val/similarity"]

    last = out / "checkpoints" / "last.ckpt"
    code = f"import torch; c = torch.load({str(last)!r}, weights_only=True); print(sorted(c))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "ShapesDataModule" in proc.stdout, proc.stderr

    # eval.py, as a user runs it: same data, same weights, same retrieval numbers.
    proc = run_script("eval.py", f"ckpt_path={last}", *CLIP_TINY, f"hydra.run.dir={tmp_path / 'eval'}")
    for name in ("val/loss", "val/i2t_R@5", "val/t2i_R@5", "val/zero_shot_acc"):
        assert f"{name:>28s}  {metrics[name]:.4f}" in proc.stderr + proc.stdout, name

    # The pipeline needs nothing but the checkpoint, and encodes exactly as validation did.
    pipe = MultiModalPipeline.from_checkpoint(last, device="cpu")
    items = [ShapesDataset("val", 64, 32, seed=cfg.seed)[i] for i in range(3)]
    pil, array, path = items[0]["image"], np.asarray(items[1]["image"]), tmp_path / "shape.png"
    items[2]["image"].save(path)
    captions = [item["caption"] for item in items]
    similarity = pipe(captions, [pil, array, str(path)])
    assert similarity.shape == (3, 3) and similarity.abs().max() <= 1 + 1e-5
    module_net = torch.load(last, weights_only=True)["state_dict"]
    assert any(k.startswith("net.image_tower.") for k in module_net)
    one = pipe(captions[0], pil)
    torch.testing.assert_close(one, similarity[:1, :1])
    labels = pipe.classify([pil, path], list(KINDS), template="a {}")
    assert len(labels) == 2 and set(labels[0]) == set(KINDS)
    assert sum(labels[0].values()) == pytest.approx(1.0, abs=1e-5)
    assert list(labels[0].values()) == sorted(labels[0].values(), reverse=True)

    # quantize.py on the CLIP towers (int8 Linear layers; the ResNet's convolutions stay float), and
    # the pipeline loading the quantized file as it loads any checkpoint.
    if importlib.util.find_spec("torchao") is None:
        return
    data = [o for o in CLIP_TINY if not o.startswith("model")]  # quantize.py reads the network from the file
    proc = run_script("quantize.py", f"ckpt_path={last}", *data, f"hydra.run.dir={tmp_path / 'q'}")
    header, _, *rows = [line for line in proc.stdout.splitlines() if " | " in line or "-|-" in line]
    assert [c.strip() for c in header.split(" | ")] == ["weights", "size_MB", "val/i2t_R@1", "val/t2i_R@1"]
    assert [r.split(" | ")[0].strip() for r in rows] == ["float32", "int8_weight_only"]
    assert float(rows[0].split(" | ")[2]) == pytest.approx(metrics["val/i2t_R@1"], abs=1e-4)  # the float row
    quantized = MultiModalPipeline.from_checkpoint(last.with_name("last-int8_weight_only.ckpt"), device="cpu")
    assert type(quantized.net.text_tower.blocks[0].mlp.fc.weight).__name__ == "Int8Tensor"
    torch.testing.assert_close(quantized(captions, [pil, array, str(path)]), similarity, atol=0.05, rtol=0)


@pytest.mark.slow
def test_overfit_debug_config_drives_the_loss_down(compose_cfg):
    cfg = compose_cfg(
        overrides=[*CLIP_TINY, "debug=overfit", "trainer.max_steps=60", "trainer.val_check_interval=60"], tiny=False
    )
    train(cfg)
    losses, _ = tensorboard(Path(cfg.paths.output_dir))
    assert losses["train/loss"][-1] < 0.3 * losses["train/loss"][0], losses["train/loss"]


def test_sigmoid_loss_trains(compose_cfg):
    overrides = [*CLIP_TINY, "model.loss=sigmoid", "model.net.logit_bias_init=-10", "trainer.max_steps=2"]
    metrics = train(compose_cfg(overrides=overrides, tiny=False))
    assert np.isfinite(metrics["val/loss"])


def test_retrieval_recall_matches_torchmetrics():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    ids = torch.arange(40)
    ours = retrieval_recall(image, text, ids, ids, ks=(1, 5, 10), chunk=7)
    similarity = image @ text.T  # (queries, gallery)
    indexes = torch.arange(40)[:, None].expand(40, 40)
    for k in (1, 5, 10):
        for name, sim in (("i2t", similarity), ("t2i", similarity.T)):
            reference = RetrievalRecall(top_k=k)(
                sim.flatten(), torch.eye(40, dtype=torch.bool).flatten(), indexes.flatten()
            )
            assert ours[f"{name}_R@{k}"] == pytest.approx(reference.item()), (name, k)


def test_retrieval_recall_counts_unique_items_once():
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    ids = torch.arange(30)
    reference = retrieval_recall(image, text, ids, ids)
    # A DistributedSampler pads with repeated items: same ids, same features, same metrics.
    repeat = torch.cat([ids, ids[:7]])
    assert retrieval_recall(image[repeat], text[repeat], repeat, repeat) == reference
    # Two captions of one image (COCO): either caption retrieved first is a hit.
    image_ids = torch.tensor([0, 0, 1])
    image3 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text3 = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
    metrics = retrieval_recall(image3, text3, image_ids, torch.arange(3), ks=(1,))
    assert metrics == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}


@pytest.mark.slow
def test_step_benchmark_runs_on_cpu_and_prints_a_table():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "clip_step.py"),
            "--preset",
            "tiny",
            "--image-size",
            "32",
            "--batch-size",
            "4",
            "8",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--precision",
            "fp32",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("resnet18")]
    assert len(rows) == 2 and "samples/s" in proc.stdout and "ms/step" in proc.stdout
