"""Time text generation from a GPT, with and without the KV cache and int8 weights; print a table.

    python benchmarks/decode.py                                   # tiny preset on the CPU: a smoke test
    python benchmarks/decode.py --net gpt2-124m --device cuda --dtype bf16 --batch 1 32 \\
        --prompt-tokens 128 --new-tokens 16 --weights bf16 int8_weight_only --compile reduce-overhead

Rows: for each weight format (--weights: the float model in --dtype, or a quantize.py method applied
to it) and batch size, three paths through generation.generate:
  no-cache   the reference: the plain PyTorch loop that runs the whole context for every token
  cache      prefill once, then one token per step through the KV cache (eager)
  compiled   the same with the one-token step under torch.compile (--compile MODE; reduce-overhead
             adds CUDA graphs); skipped with --compile none
Columns: ttft_ms is the time to the first new token (prefill + one sample), e2e_ms the whole call
for --new-tokens tokens, decode_tok_s the tokens per second after the first one (batch x (n - 1)
/ (e2e - ttft)). Times are host wall-clock medians over --repeats calls after --warmup calls, with
the device synchronised at both ends: the latency a caller sees. Prompts are random token ids;
weights are random (--ckpt: a checkpoint's, float or quantized). A row that cannot run on this
machine prints its error instead of numbers.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from {{cookiecutter.package}}.benchmark import add_net_argument  # noqa: E402
from {{cookiecutter.package}}.generation import generate, load_network_checkpoint  # noqa: E402
from {{cookiecutter.package}}.models.gpt import GPT  # noqa: E402
from {{cookiecutter.package}}.networks import build_causal_lm, net_preset  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHTS = ("float", "int8_weight_only", "int8_dynamic", "float8_dynamic")  # float, or a quantize.py method
PATHS = ("no-cache", "cache", "compiled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_net_argument(p, help="configs/model/net/ preset (random weights)")
    p.add_argument("--vocab-size", type=int, default=50257, help="the random network's vocabulary (GPT-2's)")
    p.add_argument("--max-length", type=int, default=1024, help="the random network's context")
    p.add_argument("--ckpt", default=None, help="a checkpoint to time instead (train.py's or quantize.py's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="the float weights' dtype")
    p.add_argument("--weights", nargs="+", default=["float", "int8_weight_only"], choices=WEIGHTS,
                   help="float (the --dtype model) and/or quantize.py methods applied to it")  # fmt: skip
    p.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes, one row each")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--compile", default="default", help="torch.compile mode of the compiled rows, or none")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation, CUDA graphs)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    for name in ("prompt_tokens", "new_tokens", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed is measured after the first token)")
    if any(b <= 0 for b in args.batch):
        p.error(f"--batch sizes must be positive, got {args.batch}")
    if args.compile == "none" and "compiled" in args.paths:
        args.paths.remove("compiled")
    return args


def build(args: argparse.Namespace, weights: str) -> GPT:
    if args.ckpt:
        model, _ = load_network_checkpoint(args.ckpt, key="--ckpt")
    else:
        torch.manual_seed(0)
        model = build_causal_lm(net_preset(args.net, vocab_size=args.vocab_size, max_length=args.max_length), "--net")
    model = model.to(args.device).eval()
    if all(type(p) is torch.nn.Parameter for p in model.parameters()):  # float: set the dtype
        model.to(DTYPES[args.dtype])
    if weights != "float":
        from {{cookiecutter.package}}.quantize import check_method, quantize_net

        check_method(weights, torch.device(args.device), key="--weights")
        quantize_net(model, weights)
    return model


def timed_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_row(args: argparse.Namespace, model: GPT, path: str, batch: int) -> dict[str, float]:
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt_tokens), generator=generator).to(device)
    kwargs = dict(temperature=0, use_cache=path != "no-cache", compile=args.compile if path == "compiled" else None)
    ttft = timed_ms(lambda: generate(model, prompt, 1, **kwargs), device, args.warmup, args.repeats)
    e2e = timed_ms(lambda: generate(model, prompt, args.new_tokens, **kwargs), device, args.warmup, args.repeats)
    return {"ttft_ms": ttft, "e2e_ms": e2e, "decode_tok_s": batch * (args.new_tokens - 1) / max(e2e - ttft, 1e-9) * 1e3}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    source = args.ckpt or f"{args.net} (random weights)"
    print(f"decode benchmark: {source}, {name}, prompt {args.prompt_tokens} + {args.new_tokens} new tokens, greedy")
    rows = []
    header = f"{'weights':<17} {'path':<9} {'batch':>5} {'ttft_ms':>9} {'e2e_ms':>9} {'decode_tok_s':>12}  size_MB"
    print(header, flush=True)
    for weights in args.weights:
        try:
            model = build(args, weights)
        except Exception as e:  # a method this device cannot run: say so in its row, time the others
            print(f"{weights:<17} {'-':<9} {'-':>5}  failed: {' '.join(str(e).split())[:200]}", flush=True)
            continue
        from {{cookiecutter.package}}.quantize import state_bytes

        size = state_bytes(model) / 1e6
        label = args.dtype if weights == "float" else weights
        for batch in args.batch:
            for path in args.paths:
                try:
                    row = {"weights": label, "path": path, "batch": batch, **run_row(args, model, path, batch)}
                except Exception as e:
                    print(f"{label:<17} {path:<9} {batch:>5}  failed: {' '.join(str(e).split())[:200]}", flush=True)
                    continue
                row["size_MB"] = size
                rows.append(row)
                print(
                    f"{label:<17} {path:<9} {batch:>5} {row['ttft_ms']:>9.2f} {row['e2e_ms']:>9.2f} "
                    f"{row['decode_tok_s']:>12.1f}  {size:.1f}",
                    flush=True,
                )
        del model
    return rows


if __name__ == "__main__":
    main()
