"""How the command-line entry points report a user's mistake: one line, `franca-hf COMMAND: error: ...`, no
traceback, printed by the first process of each node under a launcher (the processes of a node make the same checks
and fail alike; another node may fail on its own, as in downloading a release into its cache)."""

import os
import sys

from .conversion.releases import DownloadError

USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, DownloadError)


def is_first_process_of_node() -> bool:
    """True in a single process and in the process of local rank 0 of each node under a launcher."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def report(command: str, message: object, kind: str = "error") -> None:
    """Print `franca-hf COMMAND: KIND: MESSAGE` to stderr, once per node."""
    if is_first_process_of_node():
        print(f"franca-hf {command}: {kind}: {message}", file=sys.stderr)
