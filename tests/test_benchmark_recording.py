"""How benchmark scripts record their runs in the docs (benchmarks/recording.py), and the demo-run script's reading
of the README's first command (benchmarks/demo_run.py)."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import demo_run  # noqa: E402
from recording import recorded  # noqa: E402


def test_a_recorded_run_writes_what_it_printed_into_its_block(tmp_path, capsys, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- speed:start -->\nold figures\n<!-- speed:end -->\noutro\n")
    checkout = str(tmp_path / "official")  # a machine path: shown by its name only
    monkeypatch.setattr(
        sys, "argv", ["benchmarks/speed.py", "--rounds", "3", "--official", checkout, "--docs", str(page)]
    )
    with recorded(page, "speed"):
        print("ratio 1.25")
    text = page.read_text()
    block = text.split("<!-- speed:start -->\n")[1].split("<!-- speed:end -->")[0]
    header, fenced = block.split("\n\n", 1)
    assert header.startswith("`python benchmarks/speed.py --rounds 3 --official '<official>'` on ")
    assert "load average" in header
    assert str(page) not in header  # the page argument is not part of the command shown
    assert fenced == "```\nratio 1.25\n```\n"
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "old figures" not in text
    assert "ratio 1.25" in capsys.readouterr().out  # still printed


def test_a_run_that_fails_or_has_no_page_writes_nothing(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- speed:start -->\nold\n<!-- speed:end -->\n")
    with pytest.raises(RuntimeError), recorded(page, "speed"):
        print("half a table")
        raise RuntimeError("the benchmark broke")
    with recorded(None, "speed"):
        print("not recorded")
    assert page.read_text() == "<!-- speed:start -->\nold\n<!-- speed:end -->\n"


def test_the_demo_run_is_the_readme_first_command_without_its_setup():
    commands = demo_run.readme_commands(REPO_ROOT / "README.md")
    first_block = (REPO_ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    assert [command[:2] for command in commands] == [
        ["franca-hf", "pretrain"],
        ["franca-hf", "extract"],
        ["franca-hf", "knn"],
    ]
    for command in commands:
        assert " ".join(command[1:]) in first_block
