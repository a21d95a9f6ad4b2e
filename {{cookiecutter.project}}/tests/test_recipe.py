"""The recipe of docs/architecture.md, followed to the letter: a new architecture is
src/<package>/models/<name>.py + configs/model/net/<name>.yaml, and nothing else changes.

In a copy of this project the test writes those two files (a causal convolution LM, no attention:
the modules must need nothing but the protocol), then trains it, samples from its checkpoint with
generate.py{% if cookiecutter.distill %} and distils a GPT into it{% endif %}, each as a user types it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .conftest import ROOT, TINY

NETWORK = '''"""A causal convolution language model: each block mixes the last `kernel` tokens with a depthwise
convolution, then an MLP. Imports only torch."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ConvLMConfig:
    vocab_size: int
    max_length: int
    d_model: int
    num_layers: int
    kernel: int


class ConvBlock(nn.Module):
    def __init__(self, d_model: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.norm = nn.LayerNorm(d_model)
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).transpose(1, 2)  # (B, C, T)
        h = self.conv(F.pad(h, (self.kernel - 1, 0))).transpose(1, 2)  # left padding only: causal
        return x + self.mlp(h)


class ConvLM(nn.Module):
    shard_units = (ConvBlock,)

    def __init__(self, *, vocab_size: int, max_length: int, d_model: int, num_layers: int, kernel: int) -> None:
        super().__init__()
        self.config = ConvLMConfig(vocab_size, max_length, d_model, num_layers, kernel)
        self.emb = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(ConvBlock(d_model, kernel) for _ in range(num_layers))
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(x)  # (B, T, V)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        return F.cross_entropy(self(idx).flatten(0, 1), targets.flatten(), ignore_index=ignore_index)

    def num_params(self, non_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        return 6 * self.num_params()
'''

PRESET = """_target_: {{cookiecutter.package}}.models.convlm.ConvLM
vocab_size: ${data.tokenizer.vocab_size}
max_length: ${data.block_size}
d_model: 64
num_layers: 2
kernel: 4
"""

# What runs leave in the project folder (top level only); everything else must stay as it was.
RUN_OUTPUTS = {"logs", "data", "outputs", ".pytest_cache", ".git", ".venv", "build"}


def skipped(folder: str, names: list[str], root: Path) -> set[str]:
    top = Path(folder) == root
    return {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and n in RUN_OUTPUTS)}


def files(root: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skipped(folder, dirs, root)]
        for name in set(names) - skipped(folder, names, root):
            path = Path(folder) / name
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


def run(project: Path, *words: str) -> subprocess.CompletedProcess:
    """`python <words>` in the copy, as a user in that folder types it."""
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    proc = subprocess.run([sys.executable, *words], cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"python {' '.join(words)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_a_new_architecture_is_two_files(tmp_path, corpus, data_dir{% if cookiecutter.distill %}, gpt_checkpoint{% endif %}):
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=lambda folder, names: skipped(folder, names, ROOT))
    before = files(project)
    (project / "src" / "{{cookiecutter.package}}" / "models" / "convlm.py").write_text(NETWORK)
    (project / "configs" / "model" / "net" / "convlm.yaml").write_text(PRESET)

    run(project, "train.py", "model/net=convlm", "debug=fast_dev_run")  # the command of docs/architecture.md

    data = [*TINY, f"data.paths=[{corpus}]", f"paths.data_dir={data_dir}", "callbacks.text_samples=null"]
    runs = tmp_path / "runs"
    run(project, "train.py", "model/net=convlm", *data, f"hydra.run.dir={runs / 'convlm'}")
    last = runs / "convlm" / "checkpoints" / "last.ckpt"
    net = torch.load(last, weights_only=True)["hyper_parameters"]["net"]
    assert net["_target_"] == "{{cookiecutter.package}}.models.convlm.ConvLM" and net["kernel"] == 4
    sample = run(project, "generate.py", f"ckpt_path={last}", "prompt=ROMEO:", "max_new_tokens=12").stdout
    assert sample.startswith("ROMEO:") and len(sample.strip()) > len("ROMEO:")
{%- if cookiecutter.distill %}

    # Distillation into the new network: a GPT trained on the same data teaches it.
    teacher = f"model.teacher.ckpt_path={gpt_checkpoint}"
    run(project, "train.py", "model=distill", "model/net=convlm", teacher, *data, f"hydra.run.dir={runs / 'distill'}")
    student = torch.load(runs / "distill" / "checkpoints" / "student.ckpt", weights_only=True)
    assert student["hyper_parameters"]["net"]["_target_"] == "{{cookiecutter.package}}.models.convlm.ConvLM"
    assert any(k.startswith("net.blocks.1.conv") for k in student["state_dict"])
{%- endif %}

    after = files(project)
    assert sorted(set(after) - set(before)) == [
        "configs/model/net/convlm.yaml",
        "src/{{cookiecutter.package}}/models/convlm.py",
    ]
    assert [k for k in before if after.get(k) != before[k]] == []  # no other file was touched
