"""Errors caused by the user's input (data files, paths, config values), as opposed to bugs.

Also what the user must act on before running again: a full disk, a loss that diverged. Entry
points print these as one line naming the file, line or key, and exit with status 2, and remove
what the failed run had written (cli.exit_on_user_error); any other exception is a bug and keeps
its traceback. This file imports nothing, so models/, data/ and modules/ raise these without
importing Hydra.
"""


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
