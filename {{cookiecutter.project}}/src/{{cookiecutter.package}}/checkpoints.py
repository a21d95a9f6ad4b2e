"""Turn a sharded checkpoint (FSDP2 folder, DeepSpeed ZeRO folder) into one file.

    python -m {{cookiecutter.package}}.checkpoints logs/train/runs/<run>/checkpoints/last.ckpt last-full.ckpt

The result is an ordinary Lightning checkpoint without optimizer state: `eval.py`, `generate.py`
and `<Module>.load_from_checkpoint` read it, and it loads with torch.load(weights_only=True).
"""

import argparse
import importlib.util
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DataPathError


def is_fsdp_folder(path: Path) -> bool:
    return path.is_dir() and (path / "meta.pt").is_file() and (path / ".metadata").is_file()


def is_deepspeed_folder(path: Path) -> bool:
    return path.is_dir() and (path / "checkpoint").is_dir()


def consolidate(src: str | Path, dst: str | Path) -> Path:
    """Gather every shard of `src` into the single file `dst` (written atomically)."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}-", dir=dst.parent)
    os.close(fd)
    try:
        if is_fsdp_folder(src):
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            dcp_to_torch_save(src, tmp)  # {"state_dict": full tensors, "optimizer_0": ...}
            shards = torch.load(tmp, map_location="cpu", weights_only=True)
            checkpoint = torch.load(src / "meta.pt", map_location="cpu", weights_only=True)
            checkpoint["state_dict"] = shards["state_dict"]
            torch.save(checkpoint, tmp)
        elif is_deepspeed_folder(src):
            from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

            convert_zero_checkpoint_to_fp32_state_dict(str(src), tmp)
            checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)  # written by us just now
            checkpoint.pop("optimizer_states", None)
            torch.save(checkpoint, tmp)
        else:
            raise DataPathError(
                f"{src} is not a sharded checkpoint folder (expected FSDP2's meta.pt + .metadata, "
                "or DeepSpeed's checkpoint/ folder)"
            )
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """torch.load(weights_only=True) of a single-file checkpoint, a quantized one included: torchao's
    tensor classes become loadable once torchao is imported, so it is imported only when a file
    needs it. `key` is the config key that named the file, for the error messages."""
    not_ours = f"{key}: {path} is not a checkpoint written by this project"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (KeyError, EOFError, RuntimeError) as e:  # not a torch.save file at all (text, truncated, ...)
        raise ConfigError(f"{not_ours} ({e.__class__.__name__})") from e
    except pickle.UnpicklingError as e:
        if "torchao" not in str(e):
            raise ConfigError(f"{not_ours} ({e.__class__.__name__})") from e
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError(f"{key}: {path} holds torchao-quantized weights; install torchao to load it") from e
    import torchao.quantization  # noqa: F401  (registers its tensor classes with torch.load)

    return torch.load(path, map_location="cpu", weights_only=True)


def net_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The network's weights from a train.py (or quantize.py) checkpoint: keys "net.<...>" without
    the prefix, and without the "_orig_mod." that torch.compile adds."""
    return {
        k.removeprefix("net.").replace("_orig_mod.", ""): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("net.")
    }


def load_net(net: nn.Module, checkpoint: dict[str, Any]) -> nn.Module:
    """Load a checkpoint's network weights into `net` (built from the checkpoint's config). Quantized
    weights (quantize.py) replace the float parameters instead of being copied into them, and weights
    tied in `net` (the GPT's embedding and head) are tied again afterwards."""
    state = net_state(checkpoint)
    if not checkpoint.get("quantization"):
        net.load_state_dict(state)
        return net
    tied = tied_parameters(net)
    net.load_state_dict(state, assign=True)
    retie(net, tied)
    return net


def tied_parameters(net: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (e.g. [["tok_emb.weight", "lm_head.weight"]])."""
    groups: dict[int, list[str]] = {}
    for name, p in net.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def retie(net: nn.Module, tied: list[list[str]]) -> None:
    """Make every name of each group point at the first name's parameter again."""
    for first, *others in tied:
        shared = net.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(net.get_submodule(owner), attr, shared)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a sharded checkpoint folder (FSDP2 or DeepSpeed)")
    parser.add_argument("output", help="the single .ckpt file to write")
    args = parser.parse_args(argv)
    try:
        print(consolidate(args.checkpoint, args.output))
    except DataPathError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
