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
flag_errors = [
    ["extract", "photos", "--model", "m", "--out", "features", "--batch-size", "0"],
    ["extract", "photos", "--model", "m", "--out", "features.safetensors"],
    ["index", "photos", "--out", "index.safetensors", "--num-workers", "-1"],
    ["search", "q.jpg", "--index", "index.safetensors", "--model", "m", "--k", "0"],
    ["knn", "--model", "m", "--train", "demo", "--test", "demo", "--batch-size", "0"],
    ["fit-pca", "--model", "m", "--data", "demo", "--out", "pca", "--max-images", "0"],
    ["convert", "checkpoint.pth"],
]
parse_errors = [["--help"], *([name, "--help"] for name in commands), ["extract", "photos"], ["visualize", "x.jpg"]]
for argv in parse_errors + flag_errors:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    assert code in (0, 2) and (code == 0) == (argv[-1] == "--help"), (argv, code, err.getvalue())
    # a flag error names its flag (library messages name the setting; the CLI appends "(--flag)")
    assert argv in parse_errors or ("error: " in err.getvalue() and "--" in err.getvalue()), (argv, err.getvalue())
for argv in (["visualize", "missing.jpg", "--model", "m", "--out", "f.png"], ["visualize", ".", "--model", "m", "--out", "f.png"]):
    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    assert code == 2 and err.getvalue().startswith(f"franca-hf visualize: error: {{argv[1]}} "), (argv, err.getvalue())
for argv in (["rasa", "model=m", "data=demo", "out=o", "stepz=3"], ["rasa", "model=m", "data=demo", "out=o", "steps=0"]):
    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    assert code == 2 and err.getvalue().startswith("franca-hf rasa: error: "), (argv, err.getvalue())
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
