"""`franca-hf convert` / `push` / `releases` are one library call each (`conversion.convert.convert`,
`conversion.hub.push`, `conversion.releases.release_table`): the call gives what the command gives, every flag
reaches its setting, and settings errors name the setting (the CLI adds the flag)."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from franca_hf.cli import main
from franca_hf.conversion import convert as convert_module
from franca_hf.conversion import hub as hub_module
from franca_hf.conversion.convert import ConvertResult, convert
from franca_hf.conversion.hub import push
from franca_hf.conversion.releases import RELEASES, release_table
from franca_hf.conversion.settings import ConvertSettings, PushSettings
from franca_hf.errors import UsageError

from ..conftest import RASA_CHECKPOINT, TEACHER_CHECKPOINT
from .fake_hub import FakeHub


def test_convert_push_and_releases_calls_give_what_the_commands_give(tmp_path, tiny_folder, capsys, monkeypatch):
    checkpoint, rasa = str(TEACHER_CHECKPOINT), str(RASA_CHECKPOINT)
    assert main(["convert", checkpoint, "--rasa", rasa, "--out", str(tmp_path / "cli"), "--no-verify"]) == 0
    result = convert(ConvertSettings(checkpoint, out=str(tmp_path / "py"), rasa=rasa, verify=False))
    report = result.conversion.report
    assert capsys.readouterr().out.splitlines() == [
        f"converted {report.converted} tensors -> {tmp_path / 'cli'}",
        f"skipped {len(report.skipped_heads)} training-head tensors (dino_head.*, ibot_head.*)",
    ]
    assert result.folder == tmp_path / "py" and result.commit_url is None
    for name in ("model.safetensors", "README.md"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "py" / name).read_bytes()
    configs = [json.loads((tmp_path / side / "config.json").read_text()) for side in ("cli", "py")]
    assert configs[0] == configs[1] and configs[0]["source_checkpoint"]["rasa_file"] == RASA_CHECKPOINT.name

    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    try:
        shutil.copytree(tiny_folder, tmp_path / "folder")
        argv = ["push", str(tmp_path / "folder"), "--repo-id", "valeo/cli", "--message", "m", "--endpoint", hub.url]
        assert main(argv) == 0
        url = push(PushSettings("valeo/py", str(tmp_path / "folder"), commit_message="m", endpoint=hub.url))
    finally:
        hub.close()
    assert capsys.readouterr().out.startswith(f"pushed {tmp_path / 'folder'} to valeo/cli: {hub.url}/valeo/cli/commit/")
    assert url.startswith(f"{hub.url}/valeo/py/commit/") and [c["summary"] for c in hub.commits] == ["m", "m"]
    cli, py = (hub.repos[repo]["revisions"]["main"] for repo in ("valeo/cli", "valeo/py"))
    assert cli.keys() == py.keys() and cli["model.safetensors"] == py["model.safetensors"]

    assert main(["releases"]) == 0
    assert capsys.readouterr().out == release_table() + "\n"
    assert [line.split()[0] for line in release_table().splitlines()] == list(RELEASES)


def _capture(monkeypatch, module, name: str, result) -> list:
    """Replace the library function `module.<name>` with one recording the settings it is called with."""
    calls = []
    monkeypatch.setattr(module, name, lambda settings: calls.append(settings) or result)
    return calls


def test_every_convert_and_push_flag_reaches_its_setting(monkeypatch, capsys):
    calls = _capture(monkeypatch, convert_module, "convert", ConvertResult(Path("o"), None, "https://hub/x/commit/1"))
    argv = ["convert", "--release", "franca_vitb14_In21K", "--with-rasa", "--base-url", "http://m", "--cache-dir", "c"]
    assert main([*argv, "--out", "o", "--dtype", "float16", "--overwrite", "--push-to-hub", "x/y", "--private"]) == 0
    push_settings = PushSettings("x/y", private=True)
    release = ConvertSettings(
        release="franca_vitb14_In21K", out="o", with_rasa=True, dtype="float16", overwrite=True, push=push_settings
    )
    assert calls == [replace(release, base_url="http://m", cache_dir="c")]
    assert capsys.readouterr().out == "converted franca_vitb14_In21K -> o\npushed to x/y: https://hub/x/commit/1\n"
    argv = ["convert", "c.pth", "--rasa", "r.pth", "--out", "o", "--preset", "vit_base", "--num-heads", "12"]
    argv += ["--dtype", "bfloat16", "--no-verify", "--push-to-hub", "x/y", "--endpoint", "http://hub"]
    assert main(argv) == 0
    capsys.readouterr()  # the stand-in returns a release's result: only the settings matter here
    push_settings = PushSettings("x/y", endpoint="http://hub")
    assert calls[-1] == ConvertSettings(
        "c.pth", None, "o", "r.pth", False, "vit_base", 12, "bfloat16", False, False, push=push_settings
    )

    calls = _capture(monkeypatch, hub_module, "push", "https://hub/x/commit/2")
    argv = ["push", "f", "--repo-id", "x/y", "--private", "--revision", "v1", "--message", "m", "--base-model", "b/c"]
    assert main([*argv, "--endpoint", "http://hub"]) == 0
    assert calls == [PushSettings("x/y", "f", True, "v1", "m", "b/c", "http://hub")]
    assert capsys.readouterr().out == "pushed f to x/y: https://hub/x/commit/2\n"


@pytest.mark.parametrize(
    "make, setting, message",
    [
        (lambda: ConvertSettings(), None, "Give either checkpoint"),
        (lambda: ConvertSettings("c.pth", "franca_vitb14_In21K"), None, "Give either checkpoint"),
        (lambda: ConvertSettings("c.pth"), "out", "out is required when converting a local checkpoint"),
        (lambda: ConvertSettings(release="franca_vitb14_In21K", rasa="r.pth"), "rasa", "set with_rasa=True"),
        (lambda: ConvertSettings(release="franca_vitb14_In21K", num_heads=8), "num_heads", "num_heads: only for local"),
        (lambda: ConvertSettings("c.pth", out="o", dtype="int4"), "dtype", "dtype='int4' is not one of"),
        (lambda: ConvertSettings("c.pth", out="o", num_heads=0), "num_heads", "num_heads must be at least 1; got 0."),
        (lambda: push(PushSettings("x/y")), "folder", "folder is required"),
    ],
)
def test_settings_errors_name_the_setting(make, setting, message):
    with pytest.raises(UsageError, match=message) as error:
        make()
    assert error.value.setting == setting


def test_command_errors_name_the_setting_and_the_cli_its_flag(tmp_path, capsys):
    assert main(["convert", str(TEACHER_CHECKPOINT)]) == 2
    assert capsys.readouterr().err == (
        "franca-hf convert: error: out is required when converting a local checkpoint. (--out)\n"
    )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    assert main(["convert", str(TEACHER_CHECKPOINT), "--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err == (
        f"franca-hf convert: error: {tmp_path / 'taken'} already holds a model; pass overwrite=True to replace it. "
        "(--overwrite)\n"
    )


def test_convert_overwrite_never_deletes_its_inputs_or_the_working_directory(tmp_path, capsys, monkeypatch):
    """`--overwrite` replaces a model folder; a folder holding the checkpoint being converted, or the folder the
    command runs in, is refused before anything is converted, and nothing in it is lost."""
    sand = tmp_path / "sand"
    sand.mkdir()
    shutil.copy(TEACHER_CHECKPOINT, sand / "teacher.pth")
    shutil.copy(RASA_CHECKPOINT, sand / "rasa.pth")
    (sand / "config.json").write_text("{}")  # even one that looks like a model folder
    before = {p.name: p.read_bytes() for p in sand.iterdir()}
    monkeypatch.chdir(tmp_path)
    argv = ["convert", "sand/teacher.pth", "--rasa", "sand/rasa.pth", "--overwrite"]
    assert main([*argv, "--out", "sand"]) == 2
    assert capsys.readouterr().err == (
        "franca-hf convert: error: sand holds the input sand/teacher.pth: replacing the folder would delete it. "
        "Choose another folder. (--out)\n"
    )
    assert main(["convert", str(sand / "teacher.pth"), "--out", str(sand / "teacher.pth"), "--overwrite"]) == 2
    assert (
        "teacher.pth is a file; a model is saved as a folder. Choose another path. (--out)" in capsys.readouterr().err
    )
    monkeypatch.chdir(sand)
    assert main(["convert", "teacher.pth", "--out", ".", "--overwrite"]) == 2
    assert "error: . is the working directory or a folder above it; save a model in a folder of its own. (--out)" in (
        capsys.readouterr().err
    )
    assert {p.name: p.read_bytes() for p in sand.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sand"]  # no staging or retired folder left
