"""Atomic writes: a file or folder appears complete under its final name, or not at all (no half-written output
after an error or a kill), with the permissions of an ordinary new file."""

import glob
import logging
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from .errors import OutputExistsError, UsageError

logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def picture_format(path: str | os.PathLike, setting: str = "out") -> str:
    """The Pillow format a picture file's suffix names ("PNG" for .png); a UsageError (naming `setting`) for another
    suffix."""
    from PIL import Image

    suffix = os.path.splitext(path)[1].lower()
    format_ = Image.registered_extensions().get(suffix)
    try:
        Image.new("RGB", (1, 1)).save(BytesIO(), format=format_)  # registered, and able to hold a colour picture
    except (KeyError, OSError, ValueError):
        raise UsageError(
            f"{setting}={path} does not end with the suffix of a picture format Pillow writes in colour; give .png, "
            ".jpg or .webp, say.",
            setting=setting,
        ) from None
    return format_


def _file_on_the_way(path: Path) -> Path | None:
    """The nearest existing parent of a path that does not exist yet, where it is a file (so the path cannot be
    created), else None."""
    on_the_way = next((parent for parent in path.resolve().parents if parent.exists()), None)
    return on_the_way if on_the_way is not None and not on_the_way.is_dir() else None


def check_file_out(path: str | os.PathLike, setting: str = "out") -> None:
    """An OutputExistsError (naming `setting`) unless a file can be written at `path`: not a folder, and no file on
    the way to it (checked before long work; `write_file_atomically` creates the missing folders)."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{setting}={path} is a folder; give the path of a file.", setting)
    if blocking := _file_on_the_way(path):
        raise OutputExistsError(f"{setting}={path} cannot be created: {blocking} is a file.", setting)


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


@dataclass(frozen=True)
class FolderKind:
    """What a written folder holds, in messages (`name`: "a model"), and the files that mark one (`markers`: any)."""

    name: str
    markers: tuple[str, ...]


MODEL_FOLDER = FolderKind("a model", ("config.json",))


def check_folder_out(
    out_dir: str | os.PathLike,
    kind: FolderKind,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike | None] = (),
    replace_with: str = "overwrite=True to replace it",
) -> None:
    """An OutputExistsError (setting `out`, or `overwrite`) unless `kind` can be written at `out_dir`: a new or empty
    folder, or a folder of that kind (holding one of `kind.markers`), replaced only with `overwrite` (`replace_with`
    says how). Never a file or a path through one, a folder of other files, a mount point, the working directory or a
    folder above it, or a folder holding one of `inputs` (replacing it would delete them: the folder itself may be an
    input, updated)."""
    out_dir = Path(out_dir)
    where = out_dir.resolve()
    if not out_dir.exists():
        if blocking := _file_on_the_way(out_dir):
            raise OutputExistsError(f"{out_dir} cannot be created: {blocking} is a file.", "out")
        return
    if not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} is a file; {kind.name} is saved as a folder. Choose another path.", "out")
    if os.path.ismount(where):
        raise OutputExistsError(
            f"{out_dir} is a mount point, which cannot be replaced (a folder appears by renaming); save {kind.name} in "
            "a folder inside it.",
            "out",
        )
    if Path.cwd().resolve().is_relative_to(where):
        raise OutputExistsError(
            f"{out_dir} is the working directory or a folder above it; save {kind.name} in a folder of its own.", "out"
        )
    for path in inputs:
        if path is None or not Path(path).exists():  # a Hub id or a release name
            continue
        if Path(path).resolve() != where and Path(path).resolve().is_relative_to(where):
            raise OutputExistsError(
                f"{out_dir} holds the input {path}: replacing the folder would delete it. Choose another folder.", "out"
            )
    if any((out_dir / marker).is_file() for marker in kind.markers):
        if not overwrite:
            raise OutputExistsError(f"{out_dir} already holds {kind.name}; pass {replace_with}.", "overwrite")
    elif any(out_dir.iterdir()):
        raise OutputExistsError(
            f"{out_dir} holds files that are not {kind.name}; choose an empty or new folder.", "out"
        )


def report_interrupted_writes(out_dir: Path) -> None:
    """Warn of what a killed `write_folder_atomically` of `out_dir` may have left beside it (its hidden staging and
    retired folders: a full copy of a model's weights, say). Not deleted: another write of the same folder may be
    running and own one."""
    name = glob.escape(out_dir.name)
    for path in sorted(out_dir.parent.glob(f".{name}.staging-*")) + sorted(out_dir.parent.glob(f".{name}.old-*")):
        logger.warning(
            "%s was left by an interrupted write of %s (or belongs to one running now); delete it once no other write "
            "of that folder runs.",
            path,
            out_dir,
        )


def write_folder_atomically(
    out_dir: str | os.PathLike,
    fill: Callable[[Path], None],
    kind: FolderKind,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike | None] = (),
) -> Path:
    """Create folder `out_dir` by letting `fill` write into a hidden staging folder beside it, then renaming.

    `out_dir` must pass `check_folder_out` (checked again here: call it before long work too); a symbolic link's
    target is written (beside the target), the link kept. Leftovers of killed writes of it are reported.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():  # replace what it points to, beside it, and keep the link
        out_dir = out_dir.resolve()
    check_folder_out(out_dir, kind, overwrite, inputs)
    report_interrupted_writes(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        fill(staging)
        mask = _umask()
        # mkdtemp creates 0700 folders; a replaced folder keeps its own mode (group-writable, setgid, ...)
        os.chmod(staging, stat.S_IMODE(out_dir.stat().st_mode) if out_dir.exists() else 0o777 & ~mask)
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
