"""The docs carry commands a reader can rerun: no absolute path of the machine that wrote them, and the scripts
that write docs show paths relative to the repository or as placeholders."""

import re
from pathlib import Path

import pytest

from franca_hf.io import portable_path, replace_marked_block

ROOT = Path(__file__).resolve().parents[1]
ABSOLUTE = re.compile(r"(?<![\w.~-])/(work|root|home|tmp|Users|private|mnt|var/folders)/\S*")


def test_docs_and_readme_hold_no_absolute_machine_path():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = [
        f"{page.relative_to(ROOT)}:{number}: {match.group()}"
        for page in pages
        for number, line in enumerate(page.read_text().splitlines(), start=1)
        for match in ABSOLUTE.finditer(line)
    ]
    assert found == []


def test_scripts_show_paths_relative_to_the_repository_or_as_placeholders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert portable_path("runs/demo/teacher", "<teacher>") == "runs/demo/teacher"
    assert portable_path(tmp_path / "runs" / "demo", "<teacher>") == "runs/demo"
    assert portable_path("/srv/artifacts/teacher", "<teacher>") == "<teacher>"


def test_a_docs_block_with_a_machine_path_is_refused(tmp_path):
    page = tmp_path / "page.md"
    text = "intro\n<!-- table:start -->\nold\n<!-- table:end -->\n"
    page.write_text(text)
    with pytest.raises(ValueError, match="holds the machine path /home/me/teacher; use portable_path"):
        replace_marked_block(page, "table", "Measured by `bench.py --teacher /home/me/teacher`.")
    assert page.read_text() == text
    replace_marked_block(page, "table", "Measured by `bench.py --teacher <teacher>`.")
    assert "<teacher>" in page.read_text()
