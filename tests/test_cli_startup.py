"""The command line answers help and usage errors without importing torch or transformers (fast startup, measured
in benchmarks/cli_startup.py), and `import franca_hf` still registers "franca" whenever transformers is imported."""

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "accelerate", "datasets", "torchvision")

PARSE_EVERY_COMMAND = f"""
import contextlib, io, json, sys
from franca_hf.cli import build_parser, main
commands = build_parser()._subparsers._group_actions[0].choices
for argv in [["--help"], *([name, "--help"] for name in commands), ["extract", "photos"], ["visualize", "x.jpg"]]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exit:
            assert exit.code in (0, 2), (argv, exit.code)
        else:
            raise AssertionError(f"{{argv}} did not stop at parsing")
print(json.dumps([sorted(commands), [name for name in {HEAVY!r} if name in sys.modules]]))
"""


def test_help_and_usage_errors_import_no_heavy_module():
    result = subprocess.run([sys.executable, "-c", PARSE_EVERY_COMMAND], capture_output=True, text=True, check=True)
    commands, imported = json.loads(result.stdout)
    assert {"extract", "pretrain", "rasa", "visualize", "knn"} <= set(commands)
    assert imported == []


def test_franca_hf_imported_after_transformers_registers_franca():
    # the other order, franca_hf first, is this test process's (tests/conftest.py): every model test relies on it
    code = "import transformers, franca_hf; print(type(transformers.AutoConfig.for_model('franca')).__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["FrancaConfig"]
