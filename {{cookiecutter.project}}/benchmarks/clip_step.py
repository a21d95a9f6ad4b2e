"""Time CLIP training steps (forward + loss + backward + AdamW step) and print a table.

    python benchmarks/clip_step.py --device cuda --precision bf16 --batch-size 128 256 512   # ViT-B/16 CLIP
    python benchmarks/clip_step.py --image-model vit_large_patch14_224 --device cuda --precision bf16
    python benchmarks/clip_step.py --preset tiny --image-size 32 --device cpu --batch-size 8  # a CPU smoke run

Random images and captions of the right shapes on the device (no data loading: this measures the
model). Each configuration runs --warmup untimed steps (allocator, cuDNN autotuning, compilation),
then --steps timed steps; on a GPU each step is timed with CUDA events, and the median is reported.
Peak memory is the allocator's high-water mark over the timed steps. FLOPs are counted once on
meta tensors (3x the forward: backward costs two forwards); MFU uses the device's dense peak.
"""

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a clone without `pip install`

from {{cookiecutter.package}}.benchmark import median_step_ms  # noqa: E402
from {{cookiecutter.package}}.callbacks.throughput import peak_flops  # noqa: E402
from {{cookiecutter.package}}.losses.contrastive import build_contrastive_loss  # noqa: E402
from {{cookiecutter.package}}.models.clip import CLIP, CLIPConfig  # noqa: E402
from {{cookiecutter.package}}.modules.optim import build_adamw  # noqa: E402
from {{cookiecutter.package}}.networks import net_preset, net_presets  # noqa: E402

PRECISIONS = {  # name -> (autocast dtype or None, float32 matmul precision, Lightning's precision name)
    "fp32": (None, "highest", "32-true"),
    "tf32": (None, "high", "32-true"),
    "bf16": (torch.bfloat16, "high", "bf16-mixed"),
    "fp16": (torch.float16, "high", "16-mixed"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = net_presets(group="clip_net")
    p.add_argument("--preset", default="vit-b-16", choices=presets, help="configs/model/clip_net/ preset")
    p.add_argument("--image-model", default=None, help="timm model name for the image tower (default: the preset's)")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the model's, 224)")
    p.add_argument("--context-length", type=int, default=77, help="caption tokens (OpenAI CLIP's 77)")
    p.add_argument("--vocab-size", type=int, default=49408, help="text vocabulary (OpenAI CLIP's 49408)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[256], help="per-device batch sizes, one row each")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS))
    p.add_argument("--loss", default="infonce", choices=["infonce", "sigmoid"])
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--gradient-checkpointing", action="store_true")
    return p.parse_args()


def build_config(args: argparse.Namespace) -> CLIPConfig:
    # The presets take these from the data in train.py; here they are the command's.
    data = {"tokenizer": {"vocab_size": args.vocab_size}, "context_length": args.context_length}
    preset = net_preset(args.preset, group="clip_net", data={**data, "image_size": args.image_size or 224})
    del preset["_target_"]
    kwargs = dict(preset.get("image_kwargs") or {})
    if args.image_model is not None and args.image_model != preset["image_model"]:
        preset["image_model"], kwargs = args.image_model, {}  # the preset's size overrides belong to its model
    if args.image_size is not None and timm.get_pretrained_cfg(preset["image_model"]).fixed_input_size:
        kwargs["img_size"] = args.image_size  # ViTs are built for one input size; CNNs take any
    overrides = dict(image_kwargs=kwargs, gradient_checkpointing=args.gradient_checkpointing)
    if args.loss == "sigmoid":
        overrides["logit_bias_init"] = -10.0
    return CLIPConfig(**{**preset, **overrides})


def image_size_of(model: CLIP, args: argparse.Namespace) -> int:
    if args.image_size is not None:
        return args.image_size
    size = model.config.image_kwargs.get("img_size") or model.image_tower.pretrained_cfg.get("input_size", (3, 224))[-1]
    return int(size)


def flops_per_sample(config: CLIPConfig, image_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = CLIP(**config.to_dict()).eval()  # BatchNorm refuses a training-mode batch of one; same FLOPs
        counter = FlopCounterMode(display=False)
        with counter:
            net(torch.empty(1, 3, image_size, image_size), torch.zeros(1, config.context_length, dtype=torch.long))
    return 3.0 * counter.get_total_flops()


def run(config: CLIPConfig, batch_size: int, args: argparse.Namespace) -> dict[str, float | str]:
    device = torch.device(args.device)
    autocast_dtype, matmul_precision, lightning_precision = PRECISIONS[args.precision]
    torch.set_float32_matmul_precision(matmul_precision)
    torch.backends.cudnn.benchmark = True  # CNN towers: pick the fastest convolution kernels in warmup
    torch.manual_seed(0)
    model = CLIP(**config.to_dict()).to(device)
    size = image_size_of(model, args)
    loss_fn = build_contrastive_loss(args.loss)
    optimizer = build_adamw(model.parameters(), lr=1e-4, weight_decay=0.2)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    step_fn = torch.compile(model) if args.compile else model
    images = torch.randn(batch_size, 3, size, size, device=device)
    tokens = torch.randint(1, config.vocab_size, (batch_size, config.context_length), device=device)
    ends = torch.randint(4, config.context_length, (batch_size, 1), device=device)
    tokens[torch.arange(config.context_length, device=device)[None, :] >= ends] = config.eot_id  # EOT padding
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()

    def step() -> None:
        with autocast:
            out = step_fn(images, tokens)
            loss = loss_fn(*out)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    try:
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        ms = median_step_ms(step, args.steps, device)
    except torch.OutOfMemoryError:
        return {"batch": batch_size, "status": "OOM"}
    flops = flops_per_sample(config, size) * batch_size / (ms / 1e3)
    peak = peak_flops(device, lightning_precision)
    return {
        "batch": batch_size,
        "image": size,
        "params_m": model.num_params() / 1e6,
        "ms": ms,
        "samples_s": batch_size / (ms / 1e3),
        "tflops": flops / 1e12,
        "mfu": flops / peak if peak else float("nan"),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
        "status": "ok",
    }


def main() -> None:
    args = parse_args()
    config = build_config(args)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device: {name} | precision: {args.precision} | loss: {args.loss} | compile: {args.compile} | "
        f"torch {torch.__version__} | median of {args.steps} steps after {args.warmup} warmup"
    )
    header = (
        f"{'image model':<28} {'params(M)':>9} {'img':>4} {'batch':>6} {'ms/step':>9} {'samples/s':>10} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'peak mem(GiB)':>13}"
    )
    print(header)
    print("-" * len(header))
    for batch_size in args.batch_size:
        row = run(config, batch_size, args)
        if row["status"] != "ok":
            print(f"{config.image_model:<28} {'':>9} {'':>4} {batch_size:>6} {'out of memory':>9}")
            continue
        print(
            f"{config.image_model:<28} {row['params_m']:>9.1f} {row['image']:>4} {batch_size:>6} {row['ms']:>9.1f} "
            f"{row['samples_s']:>10.1f} {row['tflops']:>8.2f} {row['mfu']:>6.1%} {row['peak_gib']:>13.2f}"
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
