"""Checkpoints on disk: written whole or not at all, read with one clear error when a file is not
one, found again by name, consolidated into one file.

A checkpoint (a file, or a sharded folder of FSDP2 / DeepSpeed) is written under a hidden name next
to its final one, `.<name>.partial`, flushed to disk, and renamed into place: a run killed while
writing leaves the previous checkpoint of that name as it was. A sharded folder also gets a marker,
`.complete`, written after every shard (it lists each file and its size), so a folder without it is
never taken for a checkpoint. `trainer.Trainer.save_checkpoint` does this for every save.

`ckpt_path=last` (train.py) resumes the newest whole checkpoint of the earlier runs of the same
`task_name`; `ckpt_path=<run folder>` the newest in that run (`resolve_ckpt_path`).

Turn a sharded checkpoint into one file:

    python -m {{cookiecutter.package}}.checkpoints logs/train/runs/<run>/checkpoints/last.ckpt last-full.ckpt

The result is an ordinary Lightning checkpoint without optimizer state: `eval.py`, `generate.py`
and `<Module>.load_from_checkpoint` read it, and it loads with torch.load(weights_only=True).
"""

import argparse
import importlib.util
import json
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DataFormatError, DataPathError, UserInputError

log = logging.getLogger(__name__)


def read_checkpoint(ckpt_path: str | Path, key: str = "ckpt_path") -> dict[str, Any] | None:
    """The checkpoint at `ckpt_path` (memory-mapped: tensors are read when used), or None for a sharded
    folder, which Lightning reads itself. A quantized file (quantize.py) loads too. A missing,
    truncated or foreign file is a user error that names `key`, the config key that named it.
    torch's own message for a file it cannot unpickle with weights_only=True advises
    weights_only=False, i.e. running code from the file: wrong here, since train.py writes only
    tensors and plain containers."""
    path = Path(ckpt_path)
    if path.is_dir():
        if is_fsdp_folder(path) or is_deepspeed_folder(path):
            return None
        raise DataPathError(f"{key}={str(ckpt_path)!r} is a folder but not a sharded checkpoint (FSDP2 or DeepSpeed)")
    if not path.is_file():
        raise DataPathError(f"{key}={str(ckpt_path)!r} does not exist (expected a .ckpt file written by train.py)")
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            # A quantize.py file: torchao's tensor classes load once torchao is imported, which is
            # done only for a file that needs it.
            if "torchao" not in str(e):
                raise
            if importlib.util.find_spec("torchao") is None:
                raise ConfigError(
                    f"{key}={str(ckpt_path)!r} holds torchao-quantized weights: install torchao "
                    '(pip install -e ".[deploy]") to load it'
                ) from None
            import torchao.quantization  # noqa: F401  (registers its tensor classes with torch.load)

            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except UserInputError:
        raise
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


MARKER = ".complete"  # the last file written into a sharded checkpoint folder
# Signals that must not interrupt a checkpoint write: Ctrl-C, a scheduler's stop, SLURM's warning.
DEFERRED_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


def partial_path(path: Path) -> Path:
    """Where a checkpoint is written before it is renamed to `path` (same folder: rename is atomic)."""
    return path.with_name(f".{path.name}.partial")


def old_path(path: Path) -> Path:
    """Where a folder checkpoint waits while its replacement is renamed into place."""
    return path.with_name(f".{path.name}.old")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
        # Some network file systems cannot sync a folder's entries; the rename itself is still atomic.
    finally:
        os.close(fd)


@contextmanager
def deferred_signals(signums: tuple[int, ...] = DEFERRED_SIGNALS) -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGUSR1 until the block ends, then deliver them to the handlers that were
    installed before (Lightning's, Python's Ctrl-C): a second signal cannot cut a checkpoint short.
    Python runs signal handlers in the main thread only, so elsewhere this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.getsignal(s) for s in signums}
    previous = {s: h for s, h in previous.items() if h is not None}  # None: set outside Python, left alone
    for s in previous:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(received):
            signal.raise_signal(s)


def is_complete(path: Path) -> bool:
    """A file (it only ever appears by rename, whole), or a folder whose marker lists files that are
    all there with their sizes."""
    if path.is_file():
        return True
    if not path.is_dir():
        return False
    try:
        listed = json.loads((path / MARKER).read_text())["files"]
        return all((path / rel).is_file() and (path / rel).stat().st_size == size for rel, size in listed.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def publish(partial: Path, final: Path, global_step: int) -> None:
    """Make the checkpoint written at `partial` (every rank done) appear at `final`, whole: flush it
    to disk, mark a folder complete, then rename. Run on one rank."""
    if partial.is_dir():
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        for rel in files:
            _fsync(partial / rel)
        marker = partial / f"{MARKER}.tmp"
        with open(marker, "w") as f:
            json.dump({"global_step": global_step, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker, partial / MARKER)
    _fsync(partial)
    if final.exists() and (partial.is_dir() or final.is_dir()):
        # A folder cannot be renamed over a folder: move the old one aside first. Killed between
        # the two renames, `final` is missing and `.<name>.old` is whole: resolve_ckpt_path finds it.
        old = old_path(final)
        remove(old)
        os.replace(final, old)
        os.replace(partial, final)
        _fsync(final.parent)
        remove(old)
    else:
        os.replace(partial, final)  # atomic: a reader sees the old file or the new one
    _fsync(final.parent)


def is_checkpoint_folder(path: Path) -> bool:
    return is_fsdp_folder(path) or is_deepspeed_folder(path) or (path / MARKER).exists()


def whole_checkpoints(folder: Path) -> list[Path]:
    """Every whole checkpoint under `folder` (checkpoints/*.ckpt, SLURM's hpc_ckpt_*.ckpt), newest
    first. A folder checkpoint caught between its two renames counts under its hidden `.old` name."""
    found = [p for p in folder.rglob("*.ckpt") if not p.name.startswith(".") and is_complete(p)]
    for old in folder.rglob(".*.ckpt.old"):
        if not old.with_name(old.name[1 : -len(".old")]).exists() and is_complete(old):
            found.append(old)
    # Newest by write time; on a tie (a top-k file and last.ckpt of the same step) prefer last.ckpt.
    return sorted(found, key=lambda p: (written_at(p), p.name == "last.ckpt"), reverse=True)


def written_at(path: Path) -> int:
    return (path / MARKER if path.is_dir() else path).stat().st_mtime_ns


def global_step_of(path: Path) -> int | None:
    try:
        if path.is_dir():
            return json.loads((path / MARKER).read_text()).get("global_step")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:  # only for the message: an unreadable file fails properly when it is loaded
        return None


def resolve_ckpt_path(value: str | None, log_dir: str | Path, task_name: str) -> str | None:
    """train.py's ckpt_path: `last` -> the newest whole checkpoint of any earlier run under
    <log_dir>/<task_name>/; a run folder -> the newest whole checkpoint in it; a sharded folder
    without its marker -> an error; anything else unchanged. Says what it picked."""
    if value is None or value == "":
        return None
    path = Path(str(value)).expanduser()
    if str(value) == "last":
        root = Path(log_dir) / task_name
        found = whole_checkpoints(root) if root.is_dir() else []
        if not found:
            raise DataPathError(
                f"ckpt_path=last: no checkpoint of an earlier {task_name!r} run under {root.resolve()} "
                "(looked for <run>/checkpoints/*.ckpt); start without ckpt_path, or pass a file or run folder"
            )
    elif path.is_dir() and is_checkpoint_folder(path):
        if not is_complete(path):
            raise DataPathError(
                f"ckpt_path={value}: this checkpoint folder is incomplete (no {MARKER} marker listing its "
                "files: the run stopped while writing it); pass the run folder to take its newest whole checkpoint"
            )
        return str(path)
    elif path.is_dir():
        found = whole_checkpoints(path)
        if not found:
            raise DataPathError(f"ckpt_path={value}: no whole checkpoint (*.ckpt) in this folder")
    else:
        return str(value)
    pick = found[0]
    step = global_step_of(pick)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(written_at(pick) / 1e9))
    log.info("ckpt_path=%s: resuming from %s (step %s, written %s)", value, pick, "?" if step is None else step, when)
    return str(pick)


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
