"""Atomic writes: a file or folder appears complete under its final name, or not at all (no half-written output
after an error or a kill), with the permissions of an ordinary new file."""

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import OutputExistsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write(staging)` fill a hidden temp file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(staging)
        os.chmod(staging, 0o666 & ~_umask())  # some writers (safetensors) create 0600 files
        with open(staging, "rb") as written:
            os.fsync(written.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return path


def write_folder_atomically(out_dir: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create folder `out_dir` by letting `fill` write into a hidden staging folder beside it, then renaming.

    An existing `out_dir` is only replaced with `overwrite`; a symbolic link's target is written (beside the target).
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():  # replace what it points to, beside it, and keep the link
        out_dir = out_dir.resolve()
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"{out_dir} already exists; pass overwrite=True to replace it.", "overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        fill(staging)
        mask = _umask()
        os.chmod(staging, 0o777 & ~mask)  # mkdtemp creates 0700 folders
        for path in staging.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, retired / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


# The absolute paths of one machine (home folders, temporary folders, work areas), which a reader cannot rerun.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|home|tmp|Users|private|mnt|var/folders)/[^\s`'\")]*")


def portable_path(path: str | os.PathLike, placeholder: str) -> str:
    """A path as a page written by a script shows it: a relative path as given, an absolute one relative to the
    working directory (the repository root, where the scripts run) when inside it, else `placeholder` (`<teacher>`)."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return placeholder


def replace_marked_block(path: str | os.PathLike, name: str, block: str) -> None:
    """Replace, atomically, the text between the lines `<!-- NAME:start -->` and `<!-- NAME:end -->` of a Markdown
    page (how benchmarks write their measured tables into the docs). A block that holds a machine's absolute path
    (`MACHINE_PATH`; show paths with `portable_path`) is refused."""
    path = Path(path)
    if found := MACHINE_PATH.search(block):
        raise ValueError(f"The {name} block for {path} holds the machine path {found.group()}; use portable_path.")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{path} lacks the markers {start} ... {end}.")
    head, rest = text.split(start, 1)
    if end not in rest:
        raise ValueError(f"{path}: the marker {end} must come after {start}.")
    text = f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}"
    write_file_atomically(path, lambda staging: staging.write_text(text))
