"""docs/inference.md's CPU commands run exactly as written, from a fresh folder, in the page's order
(the page's GPU measurements, under "On one H200", are not run here). The page starts from
`make demo`'s checkpoint, logs/demo/latest/checkpoints/last.ckpt: here that is the page's own
200-step `logs/base` run of the same experiment, trained first."""

import re
import shlex
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, bash_block_lines, run_script

DEMO_CHECKPOINT = "logs/demo/latest/checkpoints/last.ckpt"


def cpu_commands() -> list[str]:
    text = (ROOT / "docs" / "inference.md").read_text(encoding="utf-8")
    text = text[: text.index("## On one H200")]
    return [line.split("  #")[0].strip() for line in bash_block_lines(text) if line.startswith("python ")]


@pytest.mark.slow
def test_the_pages_cpu_commands_run_as_written(tmp_path: Path, single_thread):
    commands = cpu_commands()
    [base] = [c for c in commands if "hydra.run.dir=logs/base" in c and c.startswith("python train.py")]
    assert any(DEMO_CHECKPOINT in c for c in commands) and len(commands) >= 8, commands
    ordered = [base, *(c for c in commands if c != base)]
    for command in ordered:
        argv = shlex.split(command)
        assert argv[0] == "python", command
        proc = run_script(*argv[1:], cwd=tmp_path, check=False)
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-2000:])
        if command == base:  # make demo's checkpoint, for the commands that start from it
            (tmp_path / "logs" / "demo").mkdir(parents=True)
            (tmp_path / "logs" / "demo" / "latest").symlink_to(tmp_path / "logs" / "base", target_is_directory=True)
        if command.startswith("python quantize.py"):
            method = re.search(r"quantize\.method=(\w+)", command).group(1)
            assert re.search(rf"^{method} +\| [\d.]+ +\| [\d.]+", proc.stdout, re.M), proc.stdout  # its table row
            ckpt = Path(re.search(r"ckpt_path=(\S+)", command).group(1))
            assert (tmp_path / ckpt.with_name(f"{ckpt.stem}-{method}.ckpt")).is_file()
    qat = torch.load(tmp_path / "logs" / "qat" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert qat["global_step"] == 250 and qat["hyper_parameters"]["qat"] == "int8_dynamic"
    exported = tmp_path / "logs" / "base" / "checkpoints"  # beside make demo's checkpoint, through the link
    assert (exported / "last-safetensors" / "config.json").is_file()
    assert (exported / "last-onnx" / "model.onnx").is_file()
