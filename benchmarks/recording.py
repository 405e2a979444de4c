"""How a benchmark script writes its run into the docs: with `--docs PAGE`, what the script printed goes, verbatim
and headed by the command, the machine, the load average and the time taken, between the `<!-- BLOCK:start -->` and
`<!-- BLOCK:end -->` markers of PAGE (`franca_hf.io.replace_marked_block`). Figures that change with every run live
in those blocks, never in hand-written text."""

import argparse
import contextlib
import io
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from franca_hf.io import portable_path, replace_marked_block


def machine() -> str:
    """`AMD EPYC ..., 2 CPU cores, torch 2.14.1, Python 3.12.3`: the CPU model, its cores and the library versions."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    torch = sys.modules.get("torch")
    versions = f", torch {torch.__version__}" if torch else ""
    return f"{cpu}, {os.cpu_count()} CPU cores{versions}, Python {platform.python_version()}"


def add_docs_flag(parser: argparse.ArgumentParser, page: str, block: str) -> None:
    """`--docs PAGE`: where the run is recorded (the script's page is `page`, its block `block`)."""
    parser.add_argument(
        "--docs", type=Path, metavar="PAGE", help=f"also write this run into PAGE's {block} block (the docs: {page})"
    )


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def recorded(page: Path | None, block: str) -> Iterator[None]:
    """Print as usual; with a `page`, also write what was printed into its `block` once the run ends well."""
    if page is None:
        yield
        return
    started, load_at_start = time.time(), os.getloadavg()[0]
    printed = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, printed)):
        yield
    arguments = sys.argv[1:]
    if "--docs" in arguments:
        at = arguments.index("--docs")
        del arguments[at : at + 2]
    shown = [portable_path(a, f"<{Path(a).name}>") if Path(a).is_absolute() else a for a in arguments]
    command = shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *shown])
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    header = (
        f"`{command}` on {when}: {machine()}; load average {load_at_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; {time.time() - started:.0f} s."
    )
    replace_marked_block(page, block, f"{header}\n\n```\n{printed.getvalue().rstrip()}\n```")
    print(f"wrote the {block} block of {page}")
