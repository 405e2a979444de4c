"""User errors apart from bugs, and how the command-line entry points report them.

A `UsageError` is a request the user can fix (a setting, an input, an output in the way): the command line prints it
as one line, `franca-hf COMMAND: error: ...`, with exit code 2 and no traceback; a `RunStoppedError` (a training
run that stopped itself) as `franca-hf COMMAND: stopped: ...` with exit code 3. Any other exception is a bug or an
environment failure and keeps its traceback. Only the first process of each node prints (under a launcher the
processes of a node make the same checks and fail alike; another node may fail on its own, as in downloading a release
into its cache).

`franca_hf.modeling` cannot import this module (it is copied into every model folder): its checks raise `ValueError`,
and the library callers that pass a user's request to the model check it first.
"""

import os
import sys


class UsageError(ValueError):
    """A request the user can fix. `setting` names the setting (a settings field or keyword argument) at fault, when
    one is; a front end maps it to its own spelling (a CLI flag). A `ValueError`, so `except ValueError` still
    catches it."""

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


class OutputExistsError(UsageError, FileExistsError):
    """The output path the user named is in the way (exists, or holds something else)."""


class InputNotFoundError(UsageError, FileNotFoundError):
    """An input path the user named does not exist or is not what it should be."""


class RunStoppedError(RuntimeError):
    """A run stopped itself on a condition the user must see (a non-finite loss), keeping what it saved before."""


class DownloadError(RuntimeError):
    """A release file could not be downloaded (the network or the mirror, not the request)."""


USER_ERRORS = (UsageError, DownloadError)


def require_at_least(minimum: int, **settings: int | None) -> None:
    """A `UsageError` naming the first of `settings` (name=value; None for unset) whose value is below `minimum`."""
    for name, value in settings.items():
        if value is not None and value < minimum:
            raise UsageError(f"{name} must be at least {minimum}; got {value}.", setting=name)


def is_first_process_of_node() -> bool:
    """True in a single process and in the process of local rank 0 of each node under a launcher."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def report(command: str, message: object, kind: str = "error") -> None:
    """Print `franca-hf COMMAND: KIND: MESSAGE` to stderr, once per node."""
    if is_first_process_of_node():
        print(f"franca-hf {command}: {kind}: {message}", file=sys.stderr)
