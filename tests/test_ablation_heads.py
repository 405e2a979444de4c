"""benchmarks/ablation_heads.py end to end at the smoke scale (every mode runs with both truncations, the report,
written from the runs' summary, has its structure), and which scale replaces the docs page."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

from .conftest import REPO_ROOT


def test_ablation_script_runs_and_writes_its_report(tmp_path):
    docs = REPO_ROOT / "docs" / "ablation_heads.md"
    published = docs.read_text()
    script = [sys.executable, str(REPO_ROOT / "benchmarks" / "ablation_heads.py"), "--out", str(tmp_path / "runs")]
    result = subprocess.run([*script, "--scale", "smoke"], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert docs.read_text() == published and "wrote" not in result.stdout  # smoke numbers never reach the docs
    summary = json.loads((tmp_path / "runs" / "ablation.json").read_text())
    assert sorted(summary["results"]) == ["project", "shared", "single", "slice"]
    dims = ["8", "16", "32", "64", "128"]
    for runs in summary["results"].values():
        assert len(runs) == 1 and runs[0]["steps"] == 4
        assert list(runs[0]["knn_final"]) == list(runs[0]["knn_final_pca"]) == dims
    assert summary["head_parameters"]["shared"] < summary["head_parameters"]["slice"]

    report = tmp_path / "ablation_heads.md"
    result = subprocess.run(
        [*script, "--report-only", "--docs", str(report)], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = report.read_text()
    table = [
        line for line in text.splitlines() if line.startswith(("| slice |", "| shared |", "| project |", "| single |"))
    ]
    # head layouts, mean ± std per mode and truncation, differences against project, against single + PCA
    assert len(table) == 4 + 8 + 3 + 7
    header = "| mode | truncation | dim 8 | dim 16 | dim 32 | dim 64 | dim 128 | s / step | images / s |"
    assert header in text and "| single | PCA |" in text and "| project | prefix |" in text
    assert "## Pilot: does this scale learn?" in text and "supervised" in text
    assert (tmp_path / "ablation_heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_the_default_scale_replaces_the_docs_page():
    report_path = runpy.run_path(str(REPO_ROOT / "benchmarks" / "ablation_heads.py"))["report_path"]
    assert report_path(None, "default") == Path("docs/ablation_heads.md")
    assert report_path(None, "smoke") is None and report_path(None, "gpu") is None  # a smoke run keeps the page
    assert report_path("smoke.md", "smoke") == Path("smoke.md") and report_path("", "default") is None
