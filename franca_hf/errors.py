"""How the command-line entry points report a user's mistake: one line, `franca-hf COMMAND: error: ...`, no
traceback, printed by the first process only under a launcher (every process of `accelerate launch` makes the same
checks and fails alike)."""

import os
import sys

from .conversion.releases import DownloadError

USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, DownloadError)


def is_first_process() -> bool:
    """True in a single process and in the process of rank 0 under a launcher."""
    return int(os.environ.get("RANK", "0")) == 0


def report(command: str, message: object, kind: str = "error") -> None:
    """Print `franca-hf COMMAND: KIND: MESSAGE` to stderr, once across processes."""
    if is_first_process():
        print(f"franca-hf {command}: {kind}: {message}", file=sys.stderr)
