"""What the entry points (train.py, eval.py, generate.py, bench.py, serve.py, ...) share: a user's
mistake is one line on stderr and exit status 2, and the run folder of a failed run is removed.
Hydra's and OmegaConf's own errors are mapped here, beside the entry points, so errors.py
(imported by models/, data/, modules/) needs neither."""

import functools
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .errors import UserInputError

T = TypeVar("T")


def _own_message(e: Exception) -> str:
    """A DataLoader worker re-raises an error with its whole traceback as the message (`Caught
    DataFormatError in DataLoader worker process 0. Original Traceback ...`): keep the last line's
    own message."""
    message = str(e)
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        prefix = f"{type(e).__name__}: "
        message = last[len(prefix) :] if last.startswith(prefix) else last
    return message


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    """For an entry point (a @hydra.main task, whose first argument is the composed config, or a plain
    command such as `python -m <package>.hf`): a user error becomes one line on stderr and exit
    status 2, no traceback,
    and the run folder Hydra made for the failed run is removed (only what this run wrote in it, when
    the folder already held something: `hydra.run.dir=` can name a folder in use), unless the run
    had written a checkpoint."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        cfg = args[0] if args and OmegaConf.is_config(args[0]) else None  # None: not a Hydra task
        run_dir = Path(HydraConfig.get().runtime.output_dir) if cfg is not None and HydraConfig.initialized() else None
        before = _entries(run_dir)
        try:
            from .overrides import check_overrides  # imports this module

            if cfg is not None:
                check_overrides(cfg)
            return fn(*args, **kwargs)
        except UserInputError as e:
            message = _own_message(e)
        except MissingMandatoryValue as e:  # a `???` value in configs/ that nobody set
            message = f"{e.full_key} is required: set it, e.g. {e.full_key}=..."
        except InstantiationException as e:  # a config value the target's own check rejected
            if not isinstance(e.__cause__, (UserInputError, ValueError)):
                raise
            message = " ".join(str(e).split())
        # A run that already wrote a checkpoint (a loss that diverged at step 5000, a disk that filled,
        # a corrupt image met mid-epoch) keeps its folder: its checkpoints and curves are results.
        if run_dir is not None and not any(run_dir.rglob("*.ckpt")):
            log_dir = OmegaConf.select(cfg, "paths.log_dir", default=None, throw_on_resolution_failure=False)
            _remove_run(run_dir, before, Path(log_dir).resolve() if log_dir else None)
        fail(message)

    return wrapper


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _entries(folder: Path | None) -> set[str]:
    return set(os.listdir(folder)) if folder is not None and folder.is_dir() else set()


def _remove_run(run_dir: Path, before: set[str], log_dir: Path | None) -> None:
    """Hydra writes .hydra/ and the log file before the task starts: a folder with only those (and
    what the task added) is this run's alone and goes whole, with the folders above it that it
    leaves empty, up to and including paths.log_dir (logs/<task>/runs/ of a first run). Otherwise
    only what the task added goes."""
    logging_files = {".hydra", *(Path(h.baseFilename).name for h in _file_handlers())}
    if before <= logging_files:
        for handler in _file_handlers():
            handler.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.resolve().parent
        while log_dir is not None and (parent == log_dir or log_dir in parent.parents):
            if not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()
            parent = parent.parent
        return
    for name in _entries(run_dir) - before:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _file_handlers() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def run_hydra(main: Callable[[], Any]) -> None:
    """Run a @hydra.main entry point; a config that cannot be composed (an unknown group option or key,
    an override Hydra cannot parse) is one line and exit status 2 as well. Hydra's own report of these
    is several lines and exit status 1; HYDRA_FULL_ERROR=1 makes it raise them instead."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except MissingConfigException as e:  # model=gtp
        group = e.missing_cfg_file.rsplit("/", 1)
        if e.options and len(group) == 2:
            fail(f"{group[0]}={group[1]}: no such option; choose one of {', '.join(sorted(e.options))}")
        fail(" ".join(str(e).split("\n\n")[0].split()))
    except OverrideParseException as e:  # model.optimizer.lr=[1
        fail(f"cannot read the override {e.override!r}: {str(e).splitlines()[0].split(' See https')[0]}")
    except ConfigCompositionException as e:  # model.optimizer.lrr=0.1
        cause = e.__cause__
        detail = str(cause).splitlines()[0] if cause is not None else ""
        first = str(e).splitlines()[0].rstrip(".")
        fail(f"{first}: {detail}" + _append_hint(str(e)) if detail else " ".join(str(e).split()))


def _append_hint(message: str) -> str:
    hint = [line for line in message.splitlines() if line.startswith("To append to your config use ")]
    return f" ({hint[0][0].lower()}{hint[0][1:]})" if hint else ""
