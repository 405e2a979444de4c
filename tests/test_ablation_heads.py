"""benchmarks/ablation_heads.py end to end at the smoke scale (every mode runs, the report has its structure), and
which scale replaces the docs page."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

from .conftest import REPO_ROOT


def test_ablation_script_runs_and_writes_its_report(tmp_path):
    report = tmp_path / "ablation_heads.md"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "ablation_heads.py"),
            "--scale",
            "smoke",
            "--out",
            str(tmp_path / "runs"),
            "--docs",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "ablation.json").read_text())
    assert sorted(summary["results"]) == ["project", "shared", "single", "slice"]
    dims = ["8", "16", "32", "64", "128"]
    for runs in summary["results"].values():
        assert len(runs) == 1 and list(runs[0]["knn_final"]) == dims and runs[0]["steps"] == 4
    assert summary["head_parameters"]["shared"] < summary["head_parameters"]["slice"]
    text = report.read_text()
    table = [
        line for line in text.splitlines() if line.startswith(("| slice |", "| shared |", "| project |", "| single |"))
    ]
    assert len(table) == 4 + 4 + 3  # modes, mean ± std rows, differences against project
    assert "| mode | dim 8 | dim 16 | dim 32 | dim 64 | dim 128 | s / step | images / s |" in text
    assert "## Pilot: does this scale learn?" in text and "supervised" in text
    assert (tmp_path / "ablation_heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_the_default_scale_replaces_the_docs_page():
    report_path = runpy.run_path(str(REPO_ROOT / "benchmarks" / "ablation_heads.py"))["report_path"]
    assert report_path(None, "default") == Path("docs/ablation_heads.md")
    assert report_path(None, "smoke") is None and report_path(None, "gpu") is None  # a smoke run keeps the page
    assert report_path("smoke.md", "smoke") == Path("smoke.md") and report_path("", "default") is None
