"""The plain FSDP2 training loop: the reference that `trainer=fsdp` (and `ddp`) are measured against.

    torchrun --nproc-per-node 2 benchmarks/fsdp_step.py --net gpt2-774m --batch 16 --seq-len 1024
    torchrun --nproc-per-node 1 benchmarks/fsdp_step.py --net gpt2-1.5b --batch 8 --seq-len 1024
    torchrun --nproc-per-node 2 benchmarks/fsdp_step.py --device cpu           # gloo: a smoke test

The project's own GPT, no Lightning, no DataLoader: each block compiled (`torch.compile` of its
forward, as `model.compile=true` does), `fully_shard` on each block and then on the whole network,
bf16 parameters in compute with fp32 master weights and fp32 gradient reduction (FSDP2's
MixedPrecisionPolicy, no autocast), fused AdamW (decay on matrices, as the module's), no gradient
clipping unless --clip, random tokens. Any number of GPUs on one node (one process per GPU).
Rank 0 prints one table row: median step (CUDA events, read once after the timed steps), tokens/s
per GPU, MFU (the network's flops_per_token against the GPU's dense bf16 peak) and peak memory.
`--json` prints that row as JSON instead (benchmarks/scaling.py reads it). `--profile DIR` then
profiles 5 more steps into DIR (a torch profiler trace per rank, for TensorBoard's profiler plugin
or chrome://tracing), to set beside a preset's `bench.py ... bench.profile=true` trace.
"""

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from {{cookiecutter.package}}.benchmark import add_net_argument, check_step_args, median_step_ms  # noqa: E402
from {{cookiecutter.package}}.callbacks.throughput import peak_flops  # noqa: E402
from {{cookiecutter.package}}.modules.optim import build_adamw  # noqa: E402
from {{cookiecutter.package}}.networks import build_causal_lm, net_preset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_net_argument(p)
    p.add_argument("--batch", type=int, default=8, help="sequences per step per GPU")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--vocab-size", type=int, default=50257, help="GPT-2's by default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--compile", type=int, default=1, choices=[0, 1], help="compile each block (GPU only)")
    p.add_argument("--reshard", type=int, default=1, choices=[0, 1], help="reshard_after_forward of the blocks")
    p.add_argument("--clip", type=float, default=0.0, help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--json", action="store_true", help="print the row as one JSON line")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR", help="after timing, trace 5 steps into DIR")
    args = p.parse_args(argv)
    check_step_args(p, args)
    if "RANK" not in os.environ:
        p.error("launch with torchrun, e.g. torchrun --nproc-per-node 1 benchmarks/fsdp_step.py ...")
    return args


def profile(step: Callable[[], None], folder: Path, worker: str, cuda: bool, steps: int = 5) -> None:
    """Trace `steps` calls of `step` (after one untraced) into folder/<worker>.*.pt.trace.json."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(folder), worker_name=worker),
    ) as prof:
        for _ in range(steps + 1):
            step()
            prof.step()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    mesh = init_device_mesh(device.type, (world,))

    node = net_preset(args.net, vocab_size=args.vocab_size, max_length=args.seq_len)
    torch.manual_seed(0)
    with torch.device(device):
        net = build_causal_lm(node, f"--net {args.net}")
    config = net.config
    flops_per_token = net.flops_per_token(args.seq_len)  # the protocol's count, before sharding
    if args.compile and cuda:
        for block in net.blocks:
            block.forward = torch.compile(block.forward)
        net.head_loss = torch.compile(net.head_loss)
    # bf16 compute on GPUs; fp32 on CPUs (gloo has no bf16 reduce-scatter worth timing there).
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32)
    for block in net.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=bool(args.reshard))
    fully_shard(net, mesh=mesh, mp_policy=mp)
    opt = build_adamw(net.parameters(), lr=3e-4, fused=cuda)

    g = torch.Generator(device=device).manual_seed(rank)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), device=device, generator=g)
        for _ in range(4)
    ]
    count = itertools.count()

    def step() -> None:
        tokens = batches[next(count) % len(batches)]
        loss = net.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = median_step_ms(step, args.steps, device)
    if args.profile:
        profile(step, args.profile, f"rank{rank}", cuda)
    ms_all = torch.tensor([ms], device=device)
    dist.all_reduce(ms_all, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    ms = float(ms_all)
    tokens = args.batch * args.seq_len
    flops = flops_per_token * tokens
    peak = peak_flops(device, "bf16-mixed")
    row = {
        "run": "reference",
        "net": args.net,
        "gpus": world,
        "batch": args.batch,
        "step_ms": ms,
        "tokens_per_s_per_gpu": tokens / (ms / 1e3),
        "mfu": flops / (ms / 1e3) / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }
    if rank == 0:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            fmt = {"step_ms": "{:.1f}", "tokens_per_s_per_gpu": "{:,.0f}", "mfu": "{:.1%}", "peak_gib": "{:.2f}"}
            cells = [fmt.get(k, "{}").format(v) if v is not None else "-" for k, v in row.items()]
            print(" | ".join(row), "\n" + " | ".join(cells), flush=True)
    dist.destroy_process_group()
    return row


if __name__ == "__main__":
    main()
