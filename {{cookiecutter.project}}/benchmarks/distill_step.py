"""Time a distillation training step against a plain student step; print a table.

    python benchmarks/distill_step.py                                  # tiny presets, CPU: a smoke test
    python benchmarks/distill_step.py --student-set num_layers=2 d_model=64 --batch 32   # the Shakespeare demo
    python benchmarks/distill_step.py --teacher gpt2-774m --student gpt2-124m --batch 8 --seq-len 1024 \\
        --device cuda --dtype bf16

Rows (each a full training step: forward, backward, AdamW step, zero_grad, as model=gpt / model=distill do):
  student      the student alone on the labels: student.loss (GPT.loss), what model=gpt runs
  distill      teacher forward under no_grad, student forward, distillation_loss, backward, step
  teacher fwd  the teacher's forward alone (no_grad): the main part of distillation's extra cost
  loss only    distillation_loss forward + backward on stored logits: the loss's own time and memory

`--dtype bf16` runs each step under bf16 autocast with fp32 weights and optimizer state (what
trainer=bf16 does); the teacher's forward then runs in bf16 under no_grad. `--teacher-weights bf16`
also stores the frozen teacher in bf16 (half its memory; it has no optimizer state to keep precise).
Times are CUDA events on a GPU (host clocks on a CPU), after `--warmup` untimed steps; the table
shows the median. Peak memory is torch.cuda.max_memory_allocated for each row alone (CUDA only).
Runs from a checkout: the project's src/ is put on the path when the package is not installed.
"""

import argparse
import gc
import itertools
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from {{cookiecutter.package}}.benchmark import check_step_args, median_step_ms  # noqa: E402
from {{cookiecutter.package}}.losses.distill import KINDS, distillation_loss  # noqa: E402
from {{cookiecutter.package}}.models.gpt import GPT, GPTConfig  # noqa: E402
from {{cookiecutter.package}}.modules.optim import build_adamw  # noqa: E402
from {{cookiecutter.package}}.networks import net_preset, net_presets  # noqa: E402

ROWS = ("student", "distill", "teacher", "loss")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = net_presets(f"{GPT.__module__}.{GPT.__qualname__}")
    p.add_argument("--teacher", default="tiny", choices=presets, help="teacher preset (configs/model/net/)")
    p.add_argument("--student", default="tiny", choices=presets, help="student preset")
    p.add_argument("--teacher-set", nargs="*", default=[], metavar="KEY=VALUE", help="teacher GPTConfig overrides")
    p.add_argument("--student-set", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. num_layers=2 d_model=64")
    p.add_argument(
        "--vocab-size", type=int, default=50257, help="shared vocabulary: GPT-2's (presets take it from the data)"
    )
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, fp32 weights")
    p.add_argument("--teacher-weights", default="fp32", choices=["fp32", "bf16"], help="the frozen teacher's storage")
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per loss chunk; 0: unchunked")
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kind", default="forward", choices=KINDS)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--rows", default=",".join(ROWS), help="which rows to run, comma-separated")
    args = p.parse_args(argv)
    check_step_args(p, args)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"--rows: unknown {sorted(unknown)}; choose from {','.join(ROWS)}")
    try:
        args.teacher_set, args.student_set = overrides(args.teacher_set), overrides(args.student_set)
        configs(args)  # bad preset overrides fail here, as one line
    except ValueError as e:
        p.error(str(e))
    return args


def configs(args: argparse.Namespace) -> tuple[GPTConfig, GPTConfig]:
    """(teacher, student): one vocabulary and one context for both, then each one's overrides."""
    shape = {"vocab_size": args.vocab_size, "max_length": args.seq_len}
    nodes = net_preset(args.teacher, **shape, **args.teacher_set), net_preset(args.student, **shape, **args.student_set)
    teacher, student = (GPTConfig(**{k: v for k, v in n.items() if k != "_target_"}) for n in nodes)
    return teacher, student


def overrides(pairs: list[str]) -> dict[str, int | float | bool]:
    """["num_layers=2", "dropout=0.1"] -> {"num_layers": 2, "dropout": 0.1}."""
    out: dict[str, int | float | bool] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"{pair!r}: expected KEY=VALUE, e.g. num_layers=2")
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        else:
            out[key] = float(value) if "." in value or "e" in value.lower() else int(value)
    return out


def measure(name: str, step: Callable[[], None], args: argparse.Namespace, device: torch.device) -> dict:
    """Warm up, then time `step`; peak memory is this row's alone."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(args.warmup):
            step()
        ms = median_step_ms(step, args.steps, device)
    except torch.OutOfMemoryError:
        return {"row": name, "ms": None, "peak_gib": None, "note": "out of memory"}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"row": name, "ms": ms, "peak_gib": peak, "note": ""}


def build(config: GPTConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> GPT:
    with torch.device(device):
        return GPT(**config.to_dict()).to(dtype)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    teacher_cfg, student_cfg = configs(args)
    vocab = student_cfg.vocab_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    teacher_dtype = torch.bfloat16 if args.teacher_weights == "bf16" else torch.float32
    loss_kwargs = dict(
        alpha=args.alpha,
        temperature=args.temperature,
        kind=args.kind,
        vocab_size=vocab,
        chunk_size=args.chunk_size or None,
    )
    g = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq_len + 1), device=device, generator=g) for _ in range(4)]
    step = itertools.count()

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batches[next(step) % len(batches)]
        return tokens[:, :-1], tokens[:, 1:]  # (B, T) inputs, (B, T) next-token labels

    rows = set(args.rows.split(","))
    results = []
    torch.manual_seed(0)
    if "student" in rows:
        student = build(student_cfg, device).train()
        opt = build_adamw(student.parameters(), lr=1e-4)

        def student_step() -> None:
            x, y = batch()
            with autocast:
                loss = student.loss(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        results.append(measure("student", student_step, args, device))
        del student, opt
        free(device)

    if rows & {"distill", "teacher"}:
        teacher = build(teacher_cfg, device, teacher_dtype).eval().requires_grad_(False)
        if "distill" in rows:
            student = build(student_cfg, device).train()
            opt = build_adamw(student.parameters(), lr=1e-4)

            def distill_step() -> None:
                x, y = batch()
                with autocast:
                    with torch.no_grad():
                        teacher_logits = teacher(x)  # (B, T, V_padded)
                    loss = distillation_loss(student(x), teacher_logits, y, **loss_kwargs)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            results.append(measure("distill", distill_step, args, device))
            del student, opt
            free(device)
        if "teacher" in rows:

            def teacher_forward() -> None:
                with autocast, torch.no_grad():
                    teacher(batch()[0])

            results.append(measure("teacher fwd", teacher_forward, args, device))
        del teacher
        free(device)

    if "loss" in rows:
        # Logits in the dtype the models produce them in (bf16 under autocast), teacher's fixed.
        logit_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        n, v = args.batch * args.seq_len, student_cfg.padded_vocab_size
        student_logits = torch.randn(n, v, device=device, dtype=logit_dtype, generator=g).requires_grad_(True)
        teacher_logits = torch.randn(n, teacher_cfg.padded_vocab_size, device=device, dtype=logit_dtype, generator=g)
        labels = torch.randint(0, vocab, (n,), device=device, generator=g)

        def loss_step() -> None:
            distillation_loss(student_logits, teacher_logits, labels, **loss_kwargs)["loss"].backward()
            student_logits.grad = None

        results.append(measure("loss only", loss_step, args, device))
        del student_logits, teacher_logits
        free(device)

    tokens = args.batch * args.seq_len
    base = next((r["ms"] for r in results if r["row"] == "student" and r["ms"]), None)
    for r in results:
        r["tokens_per_s"] = tokens / (r["ms"] / 1e3) if r["ms"] else None
        r["vs_student"] = r["ms"] / base if r["ms"] and base else None
    print_table(args, device, student_cfg, teacher_cfg, results)
    return results


def print_table(
    args: argparse.Namespace, device: torch.device, student: GPTConfig, teacher: GPTConfig, results: list[dict]
) -> None:
    with torch.device("meta"):
        n_student, n_teacher = (GPT(**c.to_dict()).num_params(False) for c in (student, teacher))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name} | dtype {args.dtype} (teacher weights {args.teacher_weights}) | batch {args.batch} x "
        f"seq {args.seq_len} = {args.batch * args.seq_len} tokens | vocab {student.vocab_size} | "
        f"loss chunk {args.chunk_size or 'all'} | median of {args.steps} steps after {args.warmup}"
    )
    print(
        f"teacher {args.teacher}: {teacher.num_layers} layers, d_model {teacher.d_model}, {n_teacher / 1e6:.1f}M "
        f"params | student {args.student}: {student.num_layers} layers, d_model {student.d_model}, "
        f"{n_student / 1e6:.1f}M params"
    )
    header = f"{'step':<12} {'ms/step':>10} {'tokens/s':>12} {'peak GiB':>9} {'x student':>9}"
    print(header)
    print("-" * len(header))

    def fmt(value: float | None, spec: str) -> str:
        return format(value, spec) if value is not None else "-"

    for r in results:
        print(
            f"{r['row']:<12} {fmt(r['ms'], '10.2f')} {fmt(r['tokens_per_s'], '12,.0f')} "
            f"{fmt(r['peak_gib'], '9.2f')} {fmt(r['vs_student'], '9.2f')} {r['note']}".rstrip()
        )


def main(argv: list[str] | None = None) -> list[dict]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
