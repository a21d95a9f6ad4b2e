"""benchmarks/fsdp_step.py (the plain FSDP2 loop) and benchmarks/scaling.py (presets beside it) on CPUs."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

SCALING = [sys.executable, str(ROOT / "benchmarks" / "scaling.py")]
TINY = ["--net", "tiny", "--batch", "2", "--seq-len", "32", "--vocab-size", "512", "--compile", "0"]


@pytest.mark.slow
def test_scaling_times_the_reference_loop_and_a_preset_on_two_cpu_ranks(tmp_path, data_dir, corpus):
    out = tmp_path / "rows.jsonl"
    fsdp = (
        "fsdp: trainer=fsdp trainer.accelerator=cpu trainer.precision=32-true trainer.strategy.param_dtype=null "
        f"data=text data.paths=[{corpus}] data.val_windows=8 paths.data_dir={data_dir} hydra.run.dir={tmp_path / 'run'}"
    )
    cmd = [*SCALING, *TINY, "--gpus", "2", "--warmup", "1", "--steps", "2", "--out", str(out)]
    reference = f"reference: --profile {tmp_path / 'trace'}"
    proc = subprocess.run([*cmd, "--run", reference, "--run", fsdp], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["run"], r["gpus"]) for r in rows] == [("reference", 2), ("fsdp", 2)]
    for row in rows:
        assert "error" not in row, row
        assert row["step_ms"] > 0
        assert row["tokens_per_s_per_gpu"] == pytest.approx(2 * 32 / (row["step_ms"] / 1e3), rel=0.01)
    table = proc.stdout.splitlines()
    assert table[0].startswith("| run | net | GPUs |")
    reference_row = next(line for line in table if line.startswith("| reference | tiny | 2 |"))
    assert reference_row.split("|")[9].strip() == "1.000x"  # the ratio column is relative to it
    # --profile: one trace per rank, each with the profiled steps' operators
    traces = sorted(p.name.split(".")[0] for p in (tmp_path / "trace").glob("*.pt.trace.json"))
    assert traces == ["rank0", "rank1"]
    events = json.loads(next((tmp_path / "trace").glob("rank0.*.pt.trace.json")).read_text())["traceEvents"]
    assert sum(e.get("name", "").startswith("ProfilerStep#") for e in events) == 5


def test_scaling_rejects_a_run_without_a_label():
    proc = subprocess.run([*SCALING, *TINY, "--run", "two words: trainer=fsdp"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert 'expected "LABEL: WORDS" with a one-word label' in proc.stderr


def test_reference_loop_asks_for_torchrun_when_started_alone():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fsdp_step.py"), "--device", "cpu"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "launch with torchrun" in proc.stderr
