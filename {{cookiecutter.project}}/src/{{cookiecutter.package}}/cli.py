"""What the entry points (train.py, eval.py, generate.py, bench.py) share: a user's mistake is one
line on stderr and exit status 2. Hydra's and OmegaConf's own errors are mapped here, beside the
entry points, so errors.py (imported by models/, data/, modules/) needs neither."""

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

from .errors import UserInputError

T = TypeVar("T")


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    """For entry points: a user error becomes one line on stderr and exit status 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except UserInputError as e:
            message = str(e)
        except MissingMandatoryValue as e:  # a `???` value in configs/ that nobody set
            message = f"{e.full_key} is required: set it, e.g. {e.full_key}=..."
        except InstantiationException as e:  # a config value the target's own check rejected
            if not isinstance(e.__cause__, (UserInputError, ValueError)):
                raise
            message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    return wrapper
