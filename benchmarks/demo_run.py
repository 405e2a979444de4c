"""The README's first command, run as written (less its setup), its output and times recorded in the docs.

The command pretrains the demo recipe, extracts features of the example photos with the exported teacher and prints
the teacher's k-NN table. This script reads it from README.md, drops the environment setup (`python3 -m venv`,
`pip install`), runs each remaining command in a fresh working folder with this interpreter's `franca-hf`, and
prints what each printed on stdout with its wall time:

    python benchmarks/demo_run.py --docs docs/pretraining.md       # about 3-4 minutes on 2 idle cores
"""

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recording import add_docs_flag, recorded

REPO_ROOT = Path(__file__).resolve().parents[1]
SETUP = (("python3", "-m", "venv"), ("python", "-m", "venv"))


def readme_commands(readme: Path) -> list[list[str]]:
    """The commands of the README's first ```bash block, without the setup ones (venv, pip install)."""
    text = readme.read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(part) for part in block.replace("\\\n", " ").split("&&")]
    run = [c for c in commands if tuple(c[:3]) not in SETUP and not c[0].endswith("pip")]
    return [[Path(c[0]).name, *c[1:]] for c in run]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_docs_flag(parser, "docs/pretraining.md", "demo-run")
    args = parser.parse_args()
    commands = readme_commands(REPO_ROOT / "README.md")
    bin_dir = Path(sys.executable).parent
    with recorded(args.docs, "demo-run"), tempfile.TemporaryDirectory() as work:
        (Path(work) / "examples").symlink_to(REPO_ROOT / "examples")
        for command in commands:
            started = time.perf_counter()
            result = subprocess.run(
                [str(bin_dir / command[0]), *command[1:]],
                cwd=work,
                stdout=subprocess.PIPE,
                text=True,
                check=False,
            )
            print(f"$ {shlex.join(command)}")
            print(result.stdout.rstrip())
            print(f"[{time.perf_counter() - started:.0f} s, exit {result.returncode}]")
            if result.returncode:
                sys.exit(result.returncode)


if __name__ == "__main__":
    main()
