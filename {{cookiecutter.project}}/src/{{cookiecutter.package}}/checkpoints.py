"""Turn a sharded checkpoint (FSDP2 folder, DeepSpeed ZeRO folder) into one file.

    python -m {{cookiecutter.package}}.checkpoints logs/train/runs/<run>/checkpoints/last.ckpt last-full.ckpt

The result is an ordinary Lightning checkpoint without optimizer state: `eval.py`, `generate.py`
and `<Module>.load_from_checkpoint` read it, and it loads with torch.load(weights_only=True).
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import DataPathError


def is_fsdp_folder(path: Path) -> bool:
    return path.is_dir() and (path / "meta.pt").is_file() and (path / ".metadata").is_file()


def is_deepspeed_folder(path: Path) -> bool:
    return path.is_dir() and (path / "checkpoint").is_dir()


def save_atomically(obj: Any, out: str | Path) -> Path:
    """torch.save to a temporary file beside `out`, then rename: never half a checkpoint. (Not
    mkstemp: its files are private, 0600, unlike the checkpoints Lightning writes.)"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


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
