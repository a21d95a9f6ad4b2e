"""Read a checkpoint file with one clear error when it is not one; turn a sharded checkpoint (FSDP2
folder, DeepSpeed ZeRO folder) into one file:

    python -m {{cookiecutter.package}}.checkpoints logs/train/runs/<run>/checkpoints/last.ckpt last-full.ckpt

The result is an ordinary Lightning checkpoint without optimizer state: `eval.py`, `generate.py`
and `<Module>.load_from_checkpoint` read it, and it loads with torch.load(weights_only=True).
"""

import argparse
import os
import pickle
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import DataFormatError, DataPathError


def read_checkpoint(ckpt_path: str | Path, key: str = "ckpt_path") -> dict[str, Any] | None:
    """The checkpoint at `ckpt_path` (memory-mapped: tensors are read when used), or None for a sharded
    folder, which Lightning reads itself. A missing, truncated or foreign file is a user error that
    names `key`, the config key that named it. torch's own message for a file it cannot unpickle
    with weights_only=True advises weights_only=False, i.e. running code from the file: wrong here,
    since train.py writes only tensors and plain containers."""
    path = Path(ckpt_path)
    if path.is_dir():
        if is_fsdp_folder(path) or is_deepspeed_folder(path):
            return None
        raise DataPathError(f"{key}={str(ckpt_path)!r} is a folder but not a sharded checkpoint (FSDP2 or DeepSpeed)")
    if not path.is_file():
        raise DataPathError(f"{key}={str(ckpt_path)!r} does not exist (expected a .ckpt file written by train.py)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as e:
        # torch's text for a pickle it will not run suggests weights_only=False: not repeated here.
        reason = "it holds objects that are not tensors" if "weights_only" in str(e) else str(e).splitlines()[0]
        raise DataFormatError(
            f"{key}={str(ckpt_path)!r} is not a readable checkpoint: truncated, corrupt or not written by train.py "
            f"({reason})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DataFormatError(f"{key}={str(ckpt_path)!r} is not a Lightning checkpoint (no state_dict in it)")
    return checkpoint


def checkpoint_step(ckpt_path: str | Path) -> int:
    """The optimizer step a checkpoint was written at (for a sharded folder: its meta.pt)."""
    checkpoint = read_checkpoint(ckpt_path)
    if checkpoint is None and is_fsdp_folder(Path(ckpt_path)):
        checkpoint = torch.load(Path(ckpt_path) / "meta.pt", map_location="cpu", weights_only=True)
    return int((checkpoint or {}).get("global_step", 0))


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
