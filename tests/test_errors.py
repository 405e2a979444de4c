"""User errors apart from bugs: a `UsageError` prints as one line with exit code 2; any other exception, a
`ValueError` from a bug inside the package included, keeps its traceback."""

import importlib
import os
import subprocess
import sys

import pytest

from franca_hf.cli import main
from franca_hf.errors import InputNotFoundError, OutputExistsError, UsageError

from .conftest import EXAMPLE_IMAGES
from .features.conftest import extract_command

EXTRACT = importlib.import_module("franca_hf.features.extraction")


def _extract_args(tiny_folder, out, *extra: str) -> list[str]:
    return extract_command(EXAMPLE_IMAGES, tiny_folder, out, *extra)


def _planted_bug(*args, **kwargs):
    raise ValueError("planted bug deep in the extraction loop")


def test_a_planted_internal_bug_keeps_its_traceback_instead_of_passing_for_a_user_error(
    tiny_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(EXTRACT, "embed_batch", _planted_bug)
    with pytest.raises(ValueError, match="planted bug") as raised:
        main(_extract_args(tiny_folder, tmp_path / "out"))
    assert not isinstance(raised.value, UsageError)
    assert "error:" not in capsys.readouterr().err


def test_a_user_error_through_the_same_command_is_one_line_with_exit_code_2(tiny_folder, tmp_path, capsys):
    assert main(_extract_args(tiny_folder, tmp_path / "out", "--batch-size", "0")) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["franca-hf extract: error: batch_size must be at least 1; got 0. (--batch-size)"]


def test_ctrl_c_stops_with_one_line_and_code_130_and_a_rerun_goes_on(tiny_folder, tmp_path, monkeypatch, capsys):
    embed, calls = EXTRACT.embed_batch, []

    def interrupted_after_one_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return embed(*args, **kwargs)

    monkeypatch.setattr(EXTRACT, "embed_batch", interrupted_after_one_shard)
    command = _extract_args(tiny_folder, tmp_path / "out", "--batch-size", "1", "--shard-size", "2")
    assert main(command) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "franca-hf extract: stopped: interrupted; rerun the same command to go on from what it saved."
    )
    monkeypatch.undo()
    assert main(command) == 0
    assert "2 were done before this run" in capsys.readouterr().out
    assert main(["releases"]) == 0  # a command that does not resume says only that it was interrupted

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("franca_hf.cli._releases", interrupted)
    assert main(["releases"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "franca-hf releases: stopped: interrupted."


PLANTED_RUN = """
import sys
import franca_hf.features.extraction as extraction

def planted_bug(*args, **kwargs):
    raise ValueError("planted bug deep in the extraction loop")

extraction.embed_batch = planted_bug
from franca_hf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_in_a_real_process_the_planted_bug_prints_its_traceback_and_does_not_exit_2(tiny_folder, tmp_path):
    process = subprocess.run(
        [sys.executable, "-c", PLANTED_RUN, *_extract_args(tiny_folder, tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == 1, process.stderr
    assert "Traceback (most recent call last)" in process.stderr
    assert "ValueError: planted bug deep in the extraction loop" in process.stderr
    assert "franca-hf extract: error:" not in process.stderr


def test_the_path_errors_are_usage_errors_and_keep_their_builtin_types():
    assert issubclass(OutputExistsError, UsageError) and issubclass(OutputExistsError, FileExistsError)
    assert issubclass(InputNotFoundError, UsageError) and issubclass(InputNotFoundError, FileNotFoundError)
    error = UsageError("batch_size must be at least 1; got 0.", setting="batch_size")
    assert isinstance(error, ValueError) and error.setting == "batch_size"
