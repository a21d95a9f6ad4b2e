"""Time the GPT's training step in a plain PyTorch loop, one speed lever at a time; print a table.

    python benchmarks/gpt_step.py                                     # tiny preset on the CPU: a smoke test
    python benchmarks/gpt_step.py --net gpt2-124m --batch 32 --seq-len 1024 --device cuda \\
        --variant eager compile=none optimizer=foreach \\
        --variant blocks compile=blocks optimizer=foreach \\
        --variant fused compile=blocks optimizer=fused \\
        --variant cudnn compile=blocks optimizer=fused attention=cudnn

Each `--variant NAME KEY=VALUE ...` runs in its own Python process (compilation caches and global
backend flags do not leak between rows) and trains --warmup untimed then --steps timed steps on
random tokens: bf16 autocast forward + loss, backward, gradient clipping at 1.0, AdamW step,
zero_grad, as `trainer=bf16` does, without Lightning or a DataLoader. This is "the plain path":
`python bench.py` times the same network through train.py's module and DataModule.

Levers (KEY=VALUE):
  compile    none | blocks (each block + the head/loss, as model.compile=true does) | full (the whole
             forward and loss as one graph)
  mode       torch.compile mode: default | max-autotune-no-cudagraphs | max-autotune | reduce-overhead
  optimizer  foreach | fused (AdamW's single-kernel CUDA step)
  attention  auto | flash | cudnn | efficient: which scaled_dot_product_attention kernel may run
  tuning     0 | 1: Inductor's coordinate-descent tuning of its generated kernels
  fp8        none | tensorwise | rowwise: torchao's float8 training recipe for the Linear layers its
             size rules say gain from it (needs torchao and an sm89+ GPU)
  fp8_head   0 | 1: also the tied output head (50k-wide) in float8

MFU counts 6N + 12 L d T FLOPs per token (as the project's throughput callback does) against the
device's dense peak. `--profile NAME` also prints that variant's 20 most expensive kernels (CUDA time on GPUs).
"""

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from {{cookiecutter.package}}.benchmark import add_net_argument, check_step_args, median_step_ms  # noqa: E402
from {{cookiecutter.package}}.callbacks.throughput import peak_flops  # noqa: E402
from {{cookiecutter.package}}.models.gpt import GPT  # noqa: E402
from {{cookiecutter.package}}.modules.optim import build_adamw  # noqa: E402
from {{cookiecutter.package}}.networks import build_causal_lm, net_preset  # noqa: E402
from {{cookiecutter.package}}.parallel import compile_units  # noqa: E402

LEVERS = {
    "compile": ("none", "blocks", "full"),
    "mode": ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"),
    "optimizer": ("foreach", "fused"),
    "attention": ("auto", "flash", "cudnn", "efficient"),
    "tuning": ("0", "1"),
    "fp8": ("none", "tensorwise", "rowwise"),
    "fp8_head": ("0", "1"),
}
DEFAULTS = {key: values[0] for key, values in LEVERS.items()}  # a lever a variant does not set


def parse_variant(words: list[str]) -> tuple[str, dict[str, str]]:
    """["fused", "compile=blocks", "optimizer=fused"] -> ("fused", {...all levers...})."""
    if not words or "=" in words[0]:
        raise ValueError(f"--variant {' '.join(words)}: start with a name, e.g. --variant fused optimizer=fused")
    name, levers = words[0], dict(DEFAULTS)
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or key not in LEVERS:
            raise ValueError(f"--variant {name}: {word!r} is not KEY=VALUE with KEY one of {sorted(LEVERS)}")
        if value not in LEVERS[key]:
            raise ValueError(f"--variant {name}: {key}={value!r}; expected one of {list(LEVERS[key])}")
        levers[key] = value
    return name, levers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_net_argument(p)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--vocab-size", type=int, default=50257, help="default: GPT-2's (presets take it from the data)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="bf16: autocast, fp32 weights")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--variant", nargs="+", action="append", metavar="NAME KEY=VALUE", help="a row; repeatable")
    p.add_argument("--profile", default=None, metavar="NAME", help="print this variant's most expensive kernels")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = p.parse_args(argv)
    check_step_args(p, args)
    try:
        args.variants = [parse_variant(v) for v in (args.variant or [["eager"]])]
    except ValueError as e:
        p.error(str(e))
    names = [n for n, _ in args.variants]
    if len(set(names)) != len(names):
        p.error(f"--variant names must differ, got {names}")
    if any(levers["fp8"] != "none" for _, levers in args.variants) and importlib.util.find_spec("torchao") is None:
        p.error("fp8=... needs torchao, which this project does not depend on: pip install torchao")
    if args.profile is not None and args.profile not in names:
        p.error(f"--profile {args.profile!r}: no such variant; have {names}")
    return args


def set_attention(kind: str) -> None:
    """Leave only the chosen scaled_dot_product_attention kernel enabled (process-wide flags)."""
    if kind == "auto":
        return
    torch.backends.cuda.enable_flash_sdp(kind == "flash")
    torch.backends.cuda.enable_cudnn_sdp(kind == "cudnn")
    torch.backends.cuda.enable_mem_efficient_sdp(kind == "efficient")
    torch.backends.cuda.enable_math_sdp(False)


def run_one(args: argparse.Namespace, name: str, levers: dict[str, str]) -> dict:
    """Build, warm up and time one variant in this process."""
    device = torch.device(args.device)
    set_attention(levers["attention"])
    if levers["tuning"] == "1":
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    node = net_preset(args.net, vocab_size=args.vocab_size, max_length=args.seq_len)
    torch.manual_seed(0)
    with torch.device(device):
        net = build_causal_lm(node, f"--net {args.net}")
    config = net.config
    if levers["fp8"] != "none":
        convert_fp8(net, levers["fp8"], head=levers["fp8_head"] == "1")
    mode = None if levers["mode"] == "default" else levers["mode"]
    loss_fn = net.loss
    if levers["compile"] == "blocks":
        compile_units(net, mode=mode)
    elif levers["compile"] == "full":
        loss_fn = torch.compile(net, mode=mode)
    opt = build_adamw(net.parameters(), lr=6e-4, fused=levers["optimizer"] == "fused")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    g = torch.Generator(device=device).manual_seed(0)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), device=device, generator=g)
        for _ in range(4)
    ]

    count = itertools.count()

    def step() -> None:
        tokens = batches[next(count) % len(batches)]
        with autocast:
            loss = loss_fn(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    t_compile = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = time.perf_counter() - t_compile
    ms = median_step_ms(step, args.steps, device)
    tokens = args.batch * args.seq_len
    flops = net.flops_per_token(args.seq_len) * tokens
    peak = peak_flops(device, "bf16-mixed" if args.dtype == "bf16" else "32-true")
    result = {
        "variant": name,
        **levers,
        "ms": ms,
        "tokens_per_s": tokens / (ms / 1e3),
        "mfu": flops / (ms / 1e3) / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "warmup_s": warmup_s,
    }
    if args.profile == name:
        result["profile"] = profile_kernels(step, args.steps, cuda)
    return result


def convert_fp8(net: GPT, recipe: str, head: bool) -> None:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear_utils import _auto_filter_for_recipe

    keep = _auto_filter_for_recipe(recipe, filter_fqns=[] if head else ["lm_head"])
    convert_to_float8_training(net, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=keep)
    converted = [n for n, m in net.named_modules() if type(m).__name__ == "Float8Linear"]
    print(f"float8 {recipe}: {len(converted)} Linear layers, e.g. {converted[:3]}", file=sys.stderr)


def profile_kernels(step, steps: int, cuda: bool) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(min(steps, 5)):
            step()
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=70)


def run_all(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """Each variant in a child process (this script with --one), rows collected from their last line."""
    results = []
    for name, levers in args.variants:
        cmd = [sys.executable, __file__, *argv, "--one", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            print(f"variant {name} failed: {tail[0]}", file=sys.stderr)
            results.append({"variant": name, **levers, "ms": None, "note": tail[0][:80]})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        if "profile" in row:
            print(f"--- {name}: most expensive kernels over 5 steps\n{row.pop('profile')}")
        results.append(row)
        print(f"variant {name}: {row['ms']:.2f} ms/step, warm-up {row['warmup_s']:.0f} s", file=sys.stderr, flush=True)
    print_table(args, results)
    return results


def print_table(args: argparse.Namespace, results: list[dict]) -> None:
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(
        f"{args.net} | {name} | {args.dtype} | batch {args.batch} x seq {args.seq_len} | "
        f"median of {args.steps} steps after {args.warmup}"
    )
    cols = ["variant", *LEVERS, "ms", "tokens_per_s", "mfu", "peak_gib", "warmup_s"]
    fmt = {"ms": "{:.2f}", "tokens_per_s": "{:,.0f}", "mfu": "{:.1%}", "peak_gib": "{:.2f}", "warmup_s": "{:.0f}"}
    table = [[fmt.get(c, "{}").format(r[c]) if r.get(c) is not None else "-" for c in cols] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row, r in zip(table, results):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)) + (f"  {r['note']}" if r.get("note") else ""))


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.one is not None:
        levers = dict(args.variants)[args.one]
        print(json.dumps(run_one(args, args.one, levers)))
        return []
    return run_all(args, argv)


if __name__ == "__main__":
    main()
