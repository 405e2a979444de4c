"""Wall time of `franca-hf` answers that need no model (help, a usage error) against `accelerate --help`.

Each command runs as a fresh process, interleaved with the others over several rounds (these machines are noisy);
the table gives the median seconds and the ratio to `accelerate --help`, which imports torch. The target: every
franca-hf row under 1 s. Run: `python benchmarks/cli_startup.py [--rounds 5]`.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from recording import add_docs_flag, recorded

CASES = {
    "franca-hf --help": [sys.executable, "-m", "franca_hf.cli", "--help"],
    "franca-hf extract --help": [sys.executable, "-m", "franca_hf.cli", "extract", "--help"],
    "franca-hf rasa --help": [sys.executable, "-m", "franca_hf.cli", "rasa", "--help"],
    "franca-hf extract photos (usage error: no --out)": [sys.executable, "-m", "franca_hf.cli", "extract", "photos"],
    "accelerate --help": [str(Path(sys.executable).with_name("accelerate")), "--help"],
}


def wall_time(command: list[str]) -> float:
    """Seconds from start to exit of `command` (its output discarded)."""
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    add_docs_flag(parser, "docs/model.md", "cli-startup-benchmark")
    args = parser.parse_args()
    with recorded(args.docs, "cli-startup-benchmark"):
        times = {name: [] for name in CASES}
        for _ in range(args.rounds):
            for name, command in CASES.items():
                times[name].append(wall_time(command))
        baseline = statistics.median(times["accelerate --help"])
        print(f"{'command':50s} {'median s':>9s} {'vs accelerate --help':>21s}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:50s} {median:9.2f} {median / baseline:20.2f}x")


if __name__ == "__main__":
    main()
