"""`launching.run_then_exit`, the end of the FSDP test launcher's processes: the exit status `python` gives a script,
its exit handlers run and its output flushed, without the interpreter's finalization."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import atexit, sys
from pathlib import Path

class Finalized:
    def __del__(self):
        print("finalized")

KEEP = Finalized()
atexit.register(lambda: Path(sys.argv[1]).write_text("exit handler ran"))
print("no newline before the end", end="")
{end}
"""


@pytest.mark.parametrize(
    ("end", "status", "stderr"),
    [
        ("", 0, ""),
        ("sys.exit(0)", 0, ""),
        ("sys.exit(3)", 3, ""),
        ("sys.exit('stopped: a message')", 1, "stopped: a message\n"),
        ("raise ValueError('a bug')", 1, "ValueError: a bug"),
    ],
)
def test_run_then_exit_ends_as_python_would_without_finalizing(tmp_path, end, status, stderr):
    script, marker = tmp_path / "script.py", tmp_path / "marker.txt"
    script.write_text(SCRIPT.format(end=end))
    runner = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from launching import run_then_exit; "
    runner += f"run_then_exit([{str(script)!r}, {str(marker)!r}])"
    result = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=60)
    assert result.returncode == status, result.stderr
    assert marker.read_text() == "exit handler ran"
    assert stderr in result.stderr if stderr else result.stderr == ""
    # flushed; and the module's objects were not finalized (an exception ends in Python's own finalization)
    expected = "no newline before the end" + ("finalized\n" if end.startswith("raise") else "")
    assert result.stdout == expected
