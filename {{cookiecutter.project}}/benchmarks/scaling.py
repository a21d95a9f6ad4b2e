"""Tokens/s per GPU of trainer presets beside the plain FSDP2 loop, over 1..N GPUs; prints a table.

    python benchmarks/scaling.py --net gpt2-774m --batch 16 --gpus 1 2 \\
        --run "reference" --run "fsdp: trainer=fsdp" --run "ddp: trainer=ddp"

Each `--run "LABEL: WORDS"` is a row per GPU count. LABEL `reference` (or starting with it) runs
benchmarks/fsdp_step.py under torchrun with WORDS as its flags (e.g. `reference-clip: --clip 1`);
any other label runs `python bench.py` with WORDS as Hydra overrides (a trainer preset and more),
on the same network, sequence length (--seq-len, 1024), vocabulary (GPT-2's) and per-GPU batch, with
`model.compile=true` (--compile 0: eager). Every run is its own process, one after the other, in the same lease. The
table gives tokens/s per GPU, MFU, peak memory per GPU, the ratio to the reference row of the same
GPU count, and the per-GPU scaling from the smallest GPU count. --out FILE appends each row as JSON.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", required=True, help="GPT preset (configs/model/net/)")
    p.add_argument("--batch", type=int, required=True, help="sequences per GPU per step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=50257, help="GPT-2's by default")
    p.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts, e.g. 1 2 4")
    p.add_argument("--run", action="append", required=True, metavar='"LABEL: WORDS"', help="a row; repeatable")
    p.add_argument("--compile", type=int, default=1, choices=[0, 1], help="compile each block (model.compile)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--out", type=Path, default=None, help="append each row as a JSON line")
    args = p.parse_args(argv)
    args.rows = []
    for spec in args.run:
        label, _, words = spec.partition(":")
        if not label.strip() or " " in label.strip():
            p.error(f'--run {spec!r}: expected "LABEL: WORDS" with a one-word label')
        args.rows.append((label.strip(), shlex.split(words)))
    return args


def command(args: argparse.Namespace, label: str, words: list[str], gpus: int) -> list[str]:
    if label.startswith("reference"):
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
            str(ROOT / "benchmarks" / "fsdp_step.py"), f"--net={args.net}", f"--batch={args.batch}",
            f"--seq-len={args.seq_len}", f"--vocab-size={args.vocab_size}", f"--warmup={args.warmup}",
            f"--steps={args.steps}", f"--compile={args.compile}", "--json", *words,
        ]  # fmt: skip
    return [
        sys.executable, str(ROOT / "bench.py"), f"model/net={args.net}", f"data.block_size={args.seq_len}",
        f"data.tokenizer.vocab_size={args.vocab_size}", f"data.batch_size={args.batch}",
        f"model.compile={bool(args.compile)}", f"bench.warmup={args.warmup}", f"bench.steps={args.steps}", *words,
        f"trainer.devices={gpus}",
    ]  # fmt: skip


def parse_bench_table(stdout: str) -> dict:
    """bench.py's 'benchmark' block (key  value lines) -> the row's numbers."""
    block = stdout[stdout.rindex("benchmark\n") :].splitlines()[1:]
    values = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in block if re.search(r"\S\s{2,}\S", line))
    number = lambda key: float(values[key]) if values.get(key, "None") != "None" else None  # noqa: E731
    unit = next(k for k in values if k.endswith("_per_sec_per_device"))
    return {
        "step_ms": number("step_ms"),
        "tokens_per_s_per_gpu": number(unit),
        "mfu": number("mfu"),
        "peak_gib": number("max_memory_GiB"),
    }


def run_row(args: argparse.Namespace, label: str, words: list[str], gpus: int) -> dict:
    cmd = command(args, label, words, gpus)
    print("$", shlex.join(cmd), file=sys.stderr, flush=True)
    row = {"run": label, "net": args.net, "gpus": gpus, "batch": args.batch, "words": shlex.join(words)}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout, env=os.environ)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()][-3:]
        return {**row, "error": " / ".join(tail)[-300:]}
    if label.startswith("reference"):
        numbers = json.loads(proc.stdout.strip().splitlines()[-1])
        numbers = {k: numbers[k] for k in ("step_ms", "tokens_per_s_per_gpu", "mfu", "peak_gib")}
    else:
        numbers = parse_bench_table(proc.stdout)
    return {**row, **numbers}


def print_table(rows: list[dict]) -> None:
    reference = {r["gpus"]: r["tokens_per_s_per_gpu"] for r in rows if r["run"] == "reference" and "error" not in r}
    first = {}
    for r in rows:
        if "error" not in r:
            first.setdefault(r["run"], r)
    print("| run | net | GPUs | batch/GPU | step ms | tokens/s per GPU | MFU | peak GiB/GPU | vs reference | scaling |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['run']} | {r['net']} | {r['gpus']} | {r['batch']} | failed: {r['error']} | | | | | |")
            continue
        tps = r["tokens_per_s_per_gpu"]
        ref = reference.get(r["gpus"])
        base = first[r["run"]]
        cells = [
            r["run"], r["net"], str(r["gpus"]), str(r["batch"]), f"{r['step_ms']:.1f}", f"{tps:,.0f}",
            f"{r['mfu']:.1%}" if r["mfu"] else "-", f"{r['peak_gib']:.1f}" if r["peak_gib"] else "-",
            f"{tps / ref:.3f}x" if ref else "-",
            f"{tps / base['tokens_per_s_per_gpu']:.1%}" if base["gpus"] != r["gpus"] else "-",
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print("\n".join(f"  {r['run']}: {r['words']}" for r in {r["run"]: r for r in rows}.values() if r["words"]))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for label, words in args.rows:
        for gpus in args.gpus:
            row = run_row(args, label, words, gpus)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
