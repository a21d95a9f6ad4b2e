"""Where a profiled training step spends its GPU time, from torch profiler traces; prints a table.

    python benchmarks/trace_summary.py runs/<run>/profile            # bench.py ... bench.profile=true
    python benchmarks/trace_summary.py traces/ref                    # benchmarks/fsdp_step.py --profile traces/ref
    python benchmarks/trace_summary.py a.pt.trace.json b.pt.trace.json

For each trace (a folder gives its traces, one per rank): per profiled step (the ProfilerStep#
annotations), the GPU's span, the time some compute kernel runs, the time a collective (NCCL)
kernel runs, the part of that with no compute beside it ("exposed": what the sharded presets try
to hide behind the arithmetic), the time nothing runs at all (launch gaps, host syncs, a CPU that
fell behind), and the kernels grouped by kind. All in ms per step, from kernel start/end times on
every stream, so overlapping kernels count once in the span columns.
"""

import argparse
import gzip
import json
import re
from collections import Counter
from pathlib import Path

# Kernel name patterns -> group, first match wins (cuBLAS's Hopper GEMMs are `nvjet_*`).
GROUPS = [
    (r"nccl", None),  # collectives: named by their operation below
    (r"nvjet|gemm|cutlass|xmma", "matmul"),
    (r"sdpa|flash|fmha|attention", "attention"),
    (r"^triton_", "compiled (Triton)"),
    (r"adam", "optimizer"),
    (r"foreach|multi_tensor", "foreach (clipping, zeroing)"),
    (r"memcpy|memset|copy", "copies and fills"),
]


def group(name: str) -> str:
    for pattern, label in GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            if label is None:  # ncclDevKernel_ReduceScatter_Sum_f32_RING_LL -> NCCL ReduceScatter_Sum_f32_RING_LL
                return "NCCL " + re.sub(r"^nccl(Dev)?Kernel_", "", name).split("(")[0]
            return label
    return "other"


def is_collective(name: str) -> bool:
    return "nccl" in name.lower()


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, non-overlapping union of [start, end) intervals."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def total(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def minus(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of union `a` not covered by union `b`."""
    out, j = [], 0
    for start, end in a:
        cursor = start
        while j < len(b) and b[j][1] <= cursor:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cursor:
                out.append((cursor, b[k][0]))
            cursor = max(cursor, b[k][1])
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out


def summarise(events: list[dict]) -> dict:
    """Per-step GPU times (ms) of one trace's events (Chrome trace format, times in us)."""
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    steps = sum(1 for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#"))
    if not kernels:
        raise ValueError("no GPU kernels in this trace (profiled on a CPU?)")
    steps = max(steps, 1)
    compute = merge([(e["ts"], e["ts"] + e["dur"]) for e in kernels if not is_collective(e["name"])])
    comm = merge([(e["ts"], e["ts"] + e["dur"]) for e in kernels if is_collective(e["name"])])
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    groups: Counter = Counter()
    for e in kernels:
        groups[group(e["name"])] += e["dur"]
    per_step = lambda us: us / 1e3 / steps  # noqa: E731
    return {
        "steps": steps,
        "span_ms": per_step(span),
        "compute_ms": per_step(total(compute)),
        "collectives_ms": per_step(total(comm)),
        "exposed_collectives_ms": per_step(total(minus(comm, compute))),
        "idle_ms": per_step(span - total(merge(compute + comm))),
        "groups_ms": {name: per_step(us) for name, us in groups.most_common()},
    }


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def traces(paths: list[Path]) -> list[Path]:
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(path.rglob("*.pt.trace.json*"))
        elif path.is_file():
            found.append(path)
        else:
            raise SystemExit(f"error: {path}: no such file or folder")
    if not found:
        raise SystemExit(f"error: no *.pt.trace.json in {', '.join(map(str, paths))}")
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", type=Path, nargs="+", help="trace files or folders holding them")
    p.add_argument("--groups", type=int, default=10, help="kernel groups to list per trace")
    args = p.parse_args(argv)
    print("| trace | steps | span ms | compute ms | collectives ms | exposed collectives ms | idle ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    details = []
    for path in traces(args.paths):
        try:
            s = summarise(load(path))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: {path}: {e}") from None
        cells = [s[k] for k in ("span_ms", "compute_ms", "collectives_ms", "exposed_collectives_ms", "idle_ms")]
        print(f"| {path.name} | {s['steps']} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
        details.append((path.name, s["groups_ms"]))
    for name, groups in details:
        print(f"\n{name}: kernels by kind, ms per step")
        for label, ms in list(groups.items())[: args.groups]:
            print(f"  {ms:9.2f}  {label}")


if __name__ == "__main__":
    main()
