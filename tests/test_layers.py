"""The package's import layers (pyproject.toml, [tool.importlinter]): inference code never imports the trainer,
model code imports nothing of the package, and so on. Checked with import-linter on the installed sources."""

import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO_ROOT


def _lint(root: Path) -> subprocess.CompletedProcess:
    script = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(sys.argv[1], no_cache=True, no_logo=True))"
    return subprocess.run(
        [sys.executable, "-c", script, str(root / "pyproject.toml")],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_package_keeps_its_import_layers():
    result = _lint(REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:]


def test_an_import_against_the_layers_is_caught(tmp_path):
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(REPO_ROOT / "franca_hf", tmp_path / "franca_hf", ignore=shutil.ignore_patterns("__pycache__"))
    features = tmp_path / "franca_hf" / "features" / "loop.py"
    features.write_text(features.read_text() + "\nfrom ..training import pretrain  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode == 1
    assert "franca_hf.features is not allowed to import franca_hf.training" in result.stdout
