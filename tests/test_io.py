"""Atomic folder writes (`franca_hf.io`): where a folder may be written, what a replacement keeps, and what a killed
write leaves."""

import logging
import os
import stat

import pytest

from franca_hf.errors import OutputExistsError, UsageError
from franca_hf.io import MODEL_FOLDER, check_folder_out, picture_format, write_folder_atomically


def _write_model(folder):
    (folder / "config.json").write_text("{}")


def test_a_folder_is_written_new_into_an_empty_one_and_over_its_own_kind_with_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    write_folder_atomically(tmp_path / "empty", _write_model, MODEL_FOLDER)  # an empty folder is as good as none
    write_folder_atomically(tmp_path / "new" / "deeper", _write_model, MODEL_FOLDER)
    with pytest.raises(OutputExistsError, match="already holds a model; pass overwrite=True to replace it") as error:
        write_folder_atomically(tmp_path / "new" / "deeper", _write_model, MODEL_FOLDER)
    assert error.value.setting == "overwrite"
    (tmp_path / "new" / "deeper" / "old.txt").write_text("replaced")
    write_folder_atomically(tmp_path / "new" / "deeper", _write_model, MODEL_FOLDER, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]  # no staging or retired folder left


def test_what_overwrite_never_replaces(tmp_path, monkeypatch):
    """A file, a folder of other files, the working directory (or one above it), and a folder holding an input are
    refused, overwrite or not, before anything is written: replacing them would delete what is not ours."""
    (tmp_path / "weights.pth").write_bytes(b"checkpoint")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    _write_model(run)
    (run / "checkpoint.pth").write_bytes(b"input")
    monkeypatch.chdir(run)
    cases = [
        (tmp_path / "weights.pth", (), "is a file; a model is saved as a folder. Choose another path."),
        (tmp_path / "weights.pth" / "sub", (), f"cannot be created: {tmp_path / 'weights.pth'} is a file."),
        (tmp_path / "notes", (), "holds files that are not a model; choose an empty or new folder."),
        (run, (), "is the working directory or a folder above it; save a model in a folder of its own."),
        (tmp_path, (), "is the working directory or a folder above it"),
    ]
    for out, inputs, message in cases:
        with pytest.raises(OutputExistsError, match=message) as error:
            write_folder_atomically(out, _write_model, MODEL_FOLDER, overwrite=True, inputs=inputs)
        assert error.value.setting == "out"
    monkeypatch.chdir(tmp_path / "notes")
    with pytest.raises(OutputExistsError, match=f"{run} holds the input {run / 'checkpoint.pth'}: replacing the fol"):
        check_folder_out(run, MODEL_FOLDER, overwrite=True, inputs=[None, "org/hub-id", run / "checkpoint.pth"])
    check_folder_out(run, MODEL_FOLDER, overwrite=True, inputs=[run])  # the folder itself as input: updated in place
    assert (tmp_path / "weights.pth").read_bytes() == b"checkpoint" and (tmp_path / "notes" / "mine.txt").exists()
    assert (run / "checkpoint.pth").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_killed_writes_leftovers_are_reported_and_kept(tmp_path, caplog):
    left = [tmp_path / ".model[1].staging-x1y2", tmp_path / ".model[1].old-z3"]  # what a kill -9 mid-write leaves
    other = tmp_path / ".model1.staging-live"  # another folder's write: "model[1]" as a glob pattern would match it
    for path in [*left, other]:
        path.mkdir()
    with caplog.at_level(logging.WARNING, "franca_hf"):
        write_folder_atomically(tmp_path / "model[1]", _write_model, MODEL_FOLDER)
    assert [r.getMessage().split(" was left by an interrupted write of ")[0] for r in caplog.records] == [
        str(path) for path in left
    ]
    assert all(path.is_dir() for path in [*left, other])  # another write of the same folder may own one


def test_a_replaced_folder_keeps_its_mode_and_a_mount_point_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)  # group-writable, setgid: what a team's folder is made with
    write_folder_atomically(shared, _write_model, MODEL_FOLDER)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o2775
    mounted = tmp_path / "volume"  # a folder mounted into a container cannot be renamed away
    mounted.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(mounted))
    with pytest.raises(OutputExistsError, match="is a mount point, which cannot be replaced .* in a folder inside it"):
        check_folder_out(mounted, MODEL_FOLDER)


def test_a_picture_is_written_in_a_format_its_suffix_names_and_pillow_writes_in_colour():
    assert [picture_format(f"f{suffix}") for suffix in (".png", ".JPG", ".webp")] == ["PNG", "JPEG", "WEBP"]
    for name in ("f.txt", "f", "f.xbm", "f.h5"):  # no format, or one that holds no colour picture
        with pytest.raises(UsageError, match="does not end with the suffix of a picture format Pillow writes in"):
            picture_format(name)


def test_a_failed_fill_leaves_the_old_folder_and_no_staging(tmp_path):
    write_folder_atomically(tmp_path / "model", _write_model, MODEL_FOLDER)

    def fail(folder):
        (folder / "config.json").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_folder_atomically(tmp_path / "model", fail, MODEL_FOLDER, overwrite=True)
    assert (tmp_path / "model" / "config.json").read_text() == "{}" and os.listdir(tmp_path) == ["model"]
