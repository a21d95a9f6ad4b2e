"""Every sweep (`python train.py -m ...`) the README and docs/ show runs exactly as written, from a
fresh folder, and leaves one complete run per job: last.ckpt at the last step, the job's values in
TensorBoard's HPARAMS tab beside its val/loss, and progress lines in its log file."""

import re
import shlex
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from .conftest import ROOT, run_script

# A sweep over a SLURM cluster needs one (see tests of launcher=slurm); every other sweep runs here.
NEEDS_A_CLUSTER = "launcher=slurm"


def documented_sweeps() -> list[str]:
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for command in re.findall(r"python train\.py -m [^`#\n]*", doc.read_text(encoding="utf-8")):
            command = command.strip()
            if NEEDS_A_CLUSTER not in command and command not in found:
                found.append(command)
    return found


def test_the_readme_sweep_is_among_them():
    assert "python train.py -m model.optimizer.lr=1e-4,3e-4 debug=short" in documented_sweeps()
    assert "python train.py -m hparams_search=lr debug=short" in documented_sweeps()


def hparams_and_scalars(run: Path) -> tuple[dict, dict[str, list[float]], int]:
    """The HPARAMS session start (name -> value) and every scalar tag, read with TensorBoard's reader;
    and the session end's status."""
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG]).session_start_info
    end = HParamsPluginData.FromString(content[metadata.SESSION_END_INFO_TAG]).session_end_info
    values = {name: getattr(v, v.WhichOneof("kind")) for name, v in start.hparams.items()}
    scalars = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return values, scalars, end.status


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data/ folder for every command: the demo corpus is tokenized once."""
    return tmp_path_factory.mktemp("sweep-data")


@pytest.mark.slow
@pytest.mark.parametrize("command", documented_sweeps())
def test_documented_sweep_runs_as_written(command, tmp_path, shared_data, single_thread):
    (tmp_path / "data").symlink_to(shared_data, target_is_directory=True)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "train.py"]
    proc = run_script("train.py", *argv[2:], cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "logs").glob("*/multiruns/*/*/.hydra"))
    assert len(jobs) >= 2, proc.stderr[-3000:]
    lrs = []
    for job in jobs:
        last = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == 20  # debug=short's trainer.max_steps
        hparams, scalars, status = hparams_and_scalars(job)
        assert status == 1  # STATUS_SUCCESS
        assert hparams["trainer/max_steps"] == 20 and hparams["task_name"] == "debug"
        lrs.append(hparams["model/optimizer/lr"])
        assert len(scalars["val/loss"]) == 2  # validated at steps 10 and 20
        log = (job / "debug.log").read_text()
        assert "step 10/20" in log and "step 20/20" in log  # progress while training, not only at the end
    assert len(set(lrs)) == len(jobs)  # one job per swept value
