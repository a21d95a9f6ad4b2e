"""benchmarks/trace_summary.py: GPU time per profiled step, against a hand computation."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

SCRIPT = [sys.executable, str(ROOT / "benchmarks" / "trace_summary.py")]


def kernel(name: str, start: float, end: float, stream: int, cat: str = "kernel") -> dict:
    return {"cat": cat, "name": name, "ts": start, "dur": end - start, "tid": stream, "ph": "X"}


# Two profiled steps (times in us). Compute: 0-100, 200-300 and a 400-410 fill. Collectives: an
# all-gather at 50-150 (its 100-150 has no compute beside it) and a reduce-scatter at 250-280 (hidden).
EVENTS = [
    kernel("nvjet_sm90_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 0, 100, 7),
    kernel("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 50, 150, 20),
    kernel("triton_poi_fused_add_native_layer_norm_0", 200, 300, 7),
    kernel("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 250, 280, 22),
    kernel("Memset (Device)", 400, 410, 7, cat="gpu_memset"),
    {"cat": "user_annotation", "name": "ProfilerStep#3", "ts": 0, "dur": 200, "ph": "X"},
    {"cat": "user_annotation", "name": "ProfilerStep#4", "ts": 200, "dur": 220, "ph": "X"},
    {"cat": "gpu_user_annotation", "name": "ProfilerStep#3", "ts": 0, "dur": 150, "ph": "X"},  # not a step
    {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5, "ph": "X"},
]


def test_summary_per_step_matches_a_hand_computation(tmp_path):
    trace = tmp_path / "rank0.123.pt.trace.json"
    trace.write_text(json.dumps({"traceEvents": EVENTS}))
    proc = subprocess.run([*SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # span 410 us, compute 210, collectives 130, exposed 50, idle 410 - 260 = 150; over 2 steps, in ms
    assert lines[2] == "| rank0.123.pt.trace.json | 2 | 0.2 | 0.1 | 0.1 | 0.0 | 0.1 |"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import trace_summary
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    s = trace_summary.summarise(EVENTS)
    assert s["steps"] == 2
    assert [s[k] for k in ("span_ms", "compute_ms", "collectives_ms", "exposed_collectives_ms", "idle_ms")] == (
        pytest.approx([0.205, 0.105, 0.065, 0.025, 0.075])
    )
    assert s["groups_ms"] == pytest.approx(
        {
            "matmul": 0.05,
            "NCCL AllGather_RING_LL": 0.05,
            "compiled (Triton)": 0.05,
            "NCCL ReduceScatter_Sum_f32_RING_LL": 0.015,
            "copies and fills": 0.005,
        }
    )
    assert "NCCL AllGather_RING_LL" in proc.stdout


def test_a_trace_without_gpu_kernels_is_named_in_one_error(tmp_path):
    trace = tmp_path / "cpu.pt.trace.json"
    trace.write_text(json.dumps({"traceEvents": EVENTS[-1:]}))
    proc = subprocess.run([*SCRIPT, str(trace)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {trace}: no GPU kernels in this trace (profiled on a CPU?)"
    proc = subprocess.run([*SCRIPT, str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing'}: no such file or folder"
