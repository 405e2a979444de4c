"""What a resumed `franca-hf extract` checks and repairs: the model's fingerprint (other weights behind the same path
are refused, with both fingerprints and the override named), damaged shards (set aside and redone, ending equal to
an uninterrupted run), and paths compared by what they point to. And folders without a preprocessor config."""

import shutil
from pathlib import Path

import pyarrow.parquet
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Dinov2Config, Dinov2Model

from franca_hf import FrancaModel
from franca_hf.cli import main
from franca_hf.conversion.export import save_model_folder
from franca_hf.features import ExtractionIndex, read_model_fingerprint
from franca_hf.fingerprint import model_fingerprint
from franca_hf.matryoshka import (
    CovarianceAccumulator,
    MatryoshkaFit,
    PrincipalBasis,
    with_matryoshka_basis,
    write_fitted_folder,
)

from ..conftest import tiny_config
from .conftest import extract_command, load_rows, make_images


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    """A random 32-wide Franca model that takes 32-px crops: a complete folder, written by the package."""
    torch.manual_seed(0)
    config = tiny_config(hidden_size=32, patch_size=8, position_grid_size=4, image_size=32)
    return save_model_folder(FrancaModel(config).eval(), tmp_path_factory.mktemp("model") / "small")


def _rows(out) -> dict[str, torch.Tensor]:
    rows = load_rows(out).with_format("torch")
    ids = list(rows["id"])
    assert len(ids) == len(set(ids))  # every image once
    return dict(zip(ids, rows[:]["features"], strict=True))


def test_a_resume_with_other_weights_behind_the_same_path_is_refused(small_folder, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(small_folder, model)
    make_images(tmp_path / "images", 3)
    out = tmp_path / "features"
    assert main(extract_command(tmp_path / "images", model, out)) == 0
    recorded, given = read_model_fingerprint(out)
    assert recorded == model_fingerprint(FrancaModel.from_pretrained(small_folder)) and given == str(model)

    weights = load_file(model / "model.safetensors")
    weights["layernorm.bias"] += 0.05  # retrained, re-converted...: copied over the same folder
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    changed = model_fingerprint(FrancaModel.from_pretrained(model))
    make_images(tmp_path / "images", 5)  # two new images to resume with
    capsys.readouterr()
    assert main(extract_command(tmp_path / "images", model, out)) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the weights' loading bar
    assert error.startswith("franca-hf extract: error: The extract folder")
    assert recorded in error and changed in error and str(model) in error and "--allow-other-model" in error
    assert ExtractionIndex.load(out).rows == 3  # nothing written

    assert main([*extract_command(tmp_path / "images", model, out), "--allow-other-model"]) == 0
    assert len(_rows(out)) == 5 and read_model_fingerprint(out)[0] == recorded  # the folder keeps its first model


def test_damaged_shards_are_set_aside_and_redone(small_folder, tmp_path, caplog):
    make_images(tmp_path / "images", 8)
    command = [*extract_command(tmp_path / "images", small_folder, tmp_path / "features"), "--shard-size", "2"]
    command += ["--batch-size", "2"]
    assert main(command) == 0
    uninterrupted = _rows(tmp_path / "features")
    out = tmp_path / "features"
    shards = sorted((out / "data").glob("*.parquet"))
    truncated, overwritten, shortened, missing = shards
    truncated.write_bytes(truncated.read_bytes()[:300])
    overwritten.write_bytes(b"PAR1" + b"\0" * 100)
    pyarrow.parquet.write_table(pyarrow.parquet.read_table(shortened).slice(0, 1), shortened)  # 1 row of 2
    missing.unlink()

    assert main(command) == 0
    warnings = [r.getMessage() for r in caplog.records if "images are extracted again" in r.getMessage()]
    assert [w.split(" ", 1)[0] for w in warnings] == [str(path) for path in shards]
    assert "is damaged (ArrowInvalid: " in warnings[0] and "(ValueError: 1 rows where 2 were committed)" in warnings[2]
    assert warnings[3].endswith("is missing; its 2 images are extracted again.")
    assert sorted(p.name for p in (out / ".damaged").iterdir()) == [p.name for p in shards[:3]]
    resumed = _rows(out)
    assert sorted(resumed) == sorted(uninterrupted)
    torch.testing.assert_close(torch.stack([resumed[i] for i in uninterrupted]), torch.stack([*uninterrupted.values()]))
    index = ExtractionIndex.load(out)
    assert (
        index.complete
        and index.rows == 8
        and {s["file"] for s in index.shards} == {f"data/{p.name}" for p in (out / "data").iterdir()}
    )


def test_shards_holding_other_columns_than_the_extraction_writes_are_set_aside_and_redone(
    small_folder, tmp_path, caplog
):
    images, out = tmp_path / "images", tmp_path / "features"
    make_images(images, 8)
    command = [*extract_command(images, small_folder, out), "--shard-size", "2", "--batch-size", "2"]
    assert main(command) == 0
    uninterrupted = _rows(out)
    shards = sorted((out / "data").glob("*.parquet"))
    read = pyarrow.parquet.read_table
    narrower, no_features, half, strings = shards  # same ids and rows, other columns
    table = read(narrower)
    pyarrow.parquet.write_table(
        table.set_column(1, "features", pyarrow.FixedSizeListArray.from_arrays(pyarrow.array([0.0] * 32), 16)), narrower
    )
    pyarrow.parquet.write_table(read(no_features).select(["id"]), no_features)
    table = read(half)
    values = pyarrow.array(table.column("features").combine_chunks().flatten().to_numpy().astype("float16"))
    pyarrow.parquet.write_table(
        table.set_column(1, "features", pyarrow.FixedSizeListArray.from_arrays(values, 32)), half
    )
    table = read(strings)
    pyarrow.parquet.write_table(table.set_column(1, "features", pyarrow.array(["x", "y"])), strings)

    assert main(command) == 0
    warnings = [r.getMessage() for r in caplog.records if "images are extracted again" in r.getMessage()]
    assert len(warnings) == 4 and all("is damaged (ValueError: " in w for w in warnings), warnings
    assert "features of shape (16,) in float64, where (32,) in float32 were written" in warnings[0]
    assert "columns ['id'], where string ids and features were written" in warnings[1]
    assert (
        "(32,) in float16, where (32,) in float32" in warnings[2]
        and "features of shape (None,) in string" in warnings[3]
    )
    assert sorted(p.name for p in (out / ".damaged").iterdir()) == [p.name for p in shards]
    resumed = _rows(out)
    assert sorted(resumed) == sorted(uninterrupted)
    torch.testing.assert_close(torch.stack([resumed[i] for i in uninterrupted]), torch.stack([*uninterrupted.values()]))


def test_a_run_after_a_shard_went_missing_takes_new_names_and_loses_no_image(small_folder, tmp_path, caplog):
    """Run numbers come from the names in the folder, not from counts: a missing shard (nothing set aside) or a
    cleared `.damaged/` must not let a later run reuse an earlier run's shard names."""
    images, out = tmp_path / "images", tmp_path / "features"
    make_images(images, 6)
    command = [*extract_command(images, small_folder, out), "--shard-size", "2", "--batch-size", "2"]
    assert main(command) == 0
    (out / "data" / "shard-000000-000-00000.parquet").unlink()  # a committed shard goes missing
    assert main(command) == 0  # its 2 images again, in a run of its own
    make_images(images, 8)  # two new images
    assert main(command) == 0
    shutil.rmtree(out / ".damaged", ignore_errors=True)
    make_images(images, 10)  # two more, after the set-aside folder was cleared
    assert main(command) == 0
    rows = _rows(out)
    assert sorted(rows) == [str(images / f"{i:05d}.png") for i in range(10)]
    names = sorted(p.name for p in (out / "data").iterdir())
    assert len(names) == 5 and names[-1].startswith("shard-000003-")  # 2 of the first run, then one per run
    assert ExtractionIndex.load(out).complete and ExtractionIndex.load(out).rows == 10


def test_a_resume_after_a_class_folder_was_added_is_refused_before_anything_is_written(small_folder, tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "features"
    for name in "ac":
        make_images(images / name, 2)
    command = extract_command(images, small_folder, out)
    assert main(command) == 0
    make_images(images / "b", 2)  # sorted between a and c: label 1 would mean b now, c in the folder's shards
    before = sorted(p.name for p in (out / "data").iterdir())
    capsys.readouterr()
    assert main(command) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == (
        "franca-hf extract: error: The images now have the classes ['a', 'b', 'c'], where the shards of the folder "
        "hold labels of the classes ['a', 'c']: a resume would mix labels that mean other classes. Extract into a new "
        "out folder (or restore the class folders). (--out)"
    )
    assert sorted(p.name for p in (out / "data").iterdir()) == before
    shutil.rmtree(images / "b")
    assert main(command) == 0  # restored: the resume goes on
    rows = load_rows(out)
    assert rows.features["label"].names == ["a", "c"] and sorted(rows["label"]) == [0, 0, 1, 1]


def test_a_damaged_index_is_named_in_one_line_and_damaged_progress_lines_are_redone(small_folder, tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "features"
    make_images(images, 4)
    command = [*extract_command(images, small_folder, out), "--shard-size", "2", "--batch-size", "2"]
    assert main(command) == 0
    index = (out / "extraction.json").read_bytes()
    for damaged in (index[:40], b"null", b"\xff\xfe", index.replace(b'"shards"', b'"shard_list"')):
        (out / "extraction.json").write_bytes(damaged)
        for cli in (command, ["index", str(out), "--out", str(tmp_path / "index")]):
            capsys.readouterr()
            assert main(cli) == 2
            error = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' loading bar
            assert error.startswith(f"franca-hf {cli[0]}: error: {out / 'extraction.json'} is damaged ("), error
            assert error.endswith("restore it, or extract into a new folder.")
    (out / "extraction.json").write_bytes(index)

    # a run killed after committing a shard, its progress file damaged before that line: the shard is redone
    make_images(images, 6)
    (out / ".progress").mkdir()
    committed = '{"shard": "data/shard-000009-000-00000.parquet", "rows": 2, "failed": []}'
    (out / ".progress" / "000009-000.jsonl").write_text(f"null\n{committed}\n")
    shutil.copy(out / "data" / "shard-000000-000-00000.parquet", out / "data" / "shard-000009-000-00000.parquet")
    assert main(command) == 0
    assert sorted(_rows(out)) == [str(images / f"{i:05d}.png") for i in range(6)]
    assert "shard-000009-000-00000.parquet" not in {p.name for p in (out / "data").iterdir()}


def test_paths_are_compared_by_what_they_point_to(small_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").symlink_to(small_folder)
    make_images(tmp_path / "photos", 3)
    assert main(extract_command("photos", "model", "features")) == 0
    make_images(tmp_path / "photos", 4)
    # the same folders by absolute path, trailing slash, and the model's real location
    assert main(extract_command(f"{tmp_path}/photos/", f"{small_folder}/", "features")) == 0
    assert "3 were done before this run" in capsys.readouterr().out
    assert sorted(_rows(tmp_path / "features")) == [f"photos/{i:05d}.png" for i in range(4)]  # spelled as at first

    elsewhere = tmp_path / "elsewhere"
    make_images(elsewhere / "photos", 4)
    monkeypatch.chdir(elsewhere)  # "photos" here is another folder
    assert main(extract_command("photos", small_folder, tmp_path / "features")) == 2
    error = capsys.readouterr().err
    assert "sources (resolved): " in error and str(elsewhere / "photos") in error and "--model" not in error


@pytest.fixture(scope="module")
def fitted_folders(small_folder, tmp_path_factory) -> tuple:
    """The same fitted model saved the two documented ways: `save_pretrained` (no preprocessor config) and
    `write_fitted_folder`."""
    model = FrancaModel.from_pretrained(small_folder).eval()
    torch.manual_seed(0)
    statistics = CovarianceAccumulator(model.config.hidden_size)
    statistics.update(torch.randn(300, model.config.hidden_size) * torch.linspace(2, 0.1, model.config.hidden_size))
    basis = PrincipalBasis.from_statistics(statistics)
    fit = MatryoshkaFit(basis, basis, images=300, data="random rows")
    folder = tmp_path_factory.mktemp("fitted")
    with_matryoshka_basis(model, fit).save_pretrained(folder / "save_pretrained")
    write_fitted_folder(small_folder, fit, folder / "write_fitted_folder")
    return folder / "save_pretrained", folder / "write_fitted_folder"


def test_both_ways_of_saving_a_fitted_folder_work_with_extract_and_knn(fitted_folders, tmp_path, capsys, caplog):
    saved, written = fitted_folders
    assert not (saved / "preprocessor_config.json").exists()
    for label in "ab":
        make_images(tmp_path / "classes" / label, 4, size=20 + 4 * (label == "b"))
    outputs = {}
    for folder in fitted_folders:
        caplog.clear()
        assert main(extract_command(tmp_path / "classes", folder, tmp_path / folder.name, "--dim", "16")) == 0
        knn = ["knn", "--model", str(folder), "--train", str(tmp_path / "classes"), "--test", str(tmp_path / "classes")]
        assert main([*knn, "--num-workers", "0", "--k", "3"]) == 0
        notes = [r.getMessage() for r in caplog.records if "preprocessor_config.json" in r.getMessage()]
        assert len(notes) == (2 if folder == saved else 0)  # one line per command
        assert all(note.startswith(f"note: {folder} has no") and "\n" not in note for note in notes)
        table = capsys.readouterr().out.split("| k-NN accuracy")[1]
        outputs[folder] = (table, _rows(tmp_path / folder.name))
    (knn_saved, rows_saved), (knn_written, rows_written) = outputs[saved], outputs[written]
    assert knn_saved == knn_written and "PCA basis" in knn_saved
    assert read_model_fingerprint(tmp_path / saved.name)[0] == read_model_fingerprint(tmp_path / written.name)[0]
    torch.testing.assert_close(torch.stack([*rows_saved.values()]), torch.stack([*rows_written.values()]))


def test_a_folder_of_another_model_type_without_a_processor_is_a_clear_error(tmp_path, capsys):
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    make_images(tmp_path / "images", 1)
    assert main(extract_command(tmp_path / "images", tmp_path / "dinov2", tmp_path / "out")) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("franca-hf extract: error: ") and "has no preprocessor_config.json" in error
    assert "'dinov2'" in error
