"""Errors caused by the user's input (data files, paths, config values), as opposed to bugs.

Also what the user must act on before running again: a full disk, a loss that diverged. Entry
points print these as one line naming the file, line or key, and exit with status 2; any other
exception is a bug and keeps its traceback.
"""

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

T = TypeVar("T")


class UserInputError(Exception):
    """Base class: the message alone says what is wrong and what was expected."""


class DataFormatError(UserInputError, ValueError):
    """A data file that cannot be read as documented; the message names the file and line."""


class DataPathError(UserInputError, FileNotFoundError):
    """A configured path that does not exist or holds nothing usable."""


class ConfigError(UserInputError, ValueError):
    """A config value that cannot work; the message names the key."""


class StorageError(UserInputError, OSError):
    """A file the run must write could not be written (a full disk); nothing half-written remains."""


class NonFiniteLossError(UserInputError, ArithmeticError):
    """The loss became inf or NaN; the message names the step, the loss parts and the last good checkpoint."""


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
    """For entry points: a user error becomes one line on stderr and exit status 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except UserInputError as e:
            message = _own_message(e)
        except MissingMandatoryValue as e:  # a `???` value in configs/ that nobody set
            message = f"{e.full_key} is required: set it, e.g. {e.full_key}=..."
        except InstantiationException as e:  # a config value the target's own check rejected
            if not isinstance(e.__cause__, (UserInputError, ValueError)):
                raise
            message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    return wrapper
