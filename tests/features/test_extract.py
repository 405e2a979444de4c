"""`franca-hf extract`: streamed Parquet shards that `datasets` opens, resume after SIGKILL, flat memory,
two processes, `hf:` sources, float16 dense maps, clear errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import datasets
import pyarrow.parquet
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from franca_hf import FrancaModel
from franca_hf.cli import main
from franca_hf.conversion.releases import RELEASES
from franca_hf.data import collect_image_paths, files_source
from franca_hf.features import ExtractionIndex, ExtractSettings, ModelSpec, extract, extract_features, iter_shards
from franca_hf.retrieval import index_from_features

from ..conftest import EXAMPLE_IMAGES
from .conftest import extract_command, load_rows, make_images

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _expected(tiny_folder, ids: list[str], **kwargs) -> torch.Tensor:
    model = FrancaModel.from_pretrained(tiny_folder).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_folder)
    return extract_features(model, processor, files_source(ids), progress=False, **kwargs).features


def test_extract_cli_writes_shards_that_datasets_opens(tiny_folder, photos, tmp_path, capsys):
    out = tmp_path / "features"
    assert (
        main([*extract_command(photos, tiny_folder, out, "--dim", "32", "--batch-size", "2"), "--shard-size", "3"]) == 0
    )
    captured = capsys.readouterr()
    assert "of 4 images in 2 shards" in captured.out and "skipped 2 unreadable images" in captured.err
    rows = load_rows(out).with_format("torch")
    ids = list(rows["id"])
    assert [p.split("/")[-1] for p in ids] == ["astronaut.jpg", "chelsea_cat.jpg", "coffee.jpg", "rocket.jpg"]
    assert rows.features["features"] == datasets.List(datasets.Value("float32"), length=32)
    features = rows[:]["features"]
    torch.testing.assert_close(features, _expected(tiny_folder, ids, dim=32), atol=1e-5, rtol=1e-5)

    index = json.loads((out / "extraction.json").read_text())
    assert index["complete"] and index["rows"] == 4 and not (out / ".progress").exists()
    assert sorted(image_id.split("/")[-1] for image_id, _ in index["failed"]) == ["broken.jpg", "huge.png"]
    assert index["settings"]["kind"] == "cls" and index["settings"]["dim"] == 32
    assert "load_dataset" in (out / "README.md").read_text()


def test_shards_hold_exactly_shard_size_rows_whatever_the_batch_size(tiny_folder, tmp_path, capsys):
    paths = make_images(tmp_path / "images", 7)
    out = tmp_path / "features"
    assert main(extract_command(tmp_path / "images", tiny_folder, out, "--batch-size", "3", "--shard-size", "2")) == 0
    index = ExtractionIndex.load(out)
    assert [shard["rows"] for shard in index.shards] == [2, 2, 2, 1]  # batches of 3 cut at 2 rows, the rest last
    assert sorted(load_rows(out)["id"]) == sorted(paths)


def test_the_extract_call_writes_what_the_command_writes(tiny_folder, photos, tmp_path, capsys):
    flags = ["--dim", "32", "--batch-size", "2", "--shard-size", "2"]
    assert main(extract_command(photos, tiny_folder, tmp_path / "cli", *flags)) == 0
    printed = capsys.readouterr().out
    options = {"dim": 32, "batch_size": 2, "num_workers": 0, "shard_size": 2}
    result = extract(ExtractSettings([photos], tmp_path / "call", ModelSpec(str(tiny_folder)), **options))

    assert result.is_main_process and result.embedded == 4 and result.already_done == 0
    shards = len(result.index.shards)
    assert printed.startswith(f"wrote cls features (32 channels, float32) of 4 images in {shards} shards to")
    (cli_ids, cli_rows), (call_ids, call_rows) = (
        zip(*iter_shards(folder), strict=True) for folder in (tmp_path / "cli", tmp_path / "call")
    )
    assert call_ids == cli_ids and len(call_ids) == shards > 1
    torch.testing.assert_close(torch.cat(call_rows), torch.cat(cli_rows), atol=0, rtol=0)
    documents = [json.loads((tmp_path / name / "extraction.json").read_text()) for name in ("cli", "call")]
    assert documents[0] == documents[1] and documents[0]["settings"]["dim"] == 32


def test_dense_float16_maps_and_hf_sources_with_row_ids_and_labels(tiny_folder, tmp_path, capsys):
    images = [Image.open(p).convert("RGB") for p in collect_image_paths([EXAMPLE_IMAGES])]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 1, 0]}, features=features).save_to_disk(saved)
    out = tmp_path / "dense"
    extra = ["--dense", "--debiased", "--dim", "64", "--features-dtype", "float16", "--batch-size", "3"]
    assert main(extract_command(f"hf:{saved}", tiny_folder, out, *extra)) == 0

    rows = load_rows(out)
    assert rows.features["features"] == datasets.Array3D((64, 16, 16), "float16")
    assert rows.features["label"].names == ["a", "b"] and list(rows["label"]) == [0, 1, 1, 0]
    assert list(rows["id"]) == [f"hf:{saved}[train][{i}]" for i in range(4)]
    stored = rows.with_format("numpy")[:]["features"]  # datasets' formatter hands float16 out as float32
    [shard] = (out / "data").glob("*.parquet")
    assert "halffloat" in str(pyarrow.parquet.read_schema(shard).field("features").type.storage_type)  # float16
    assert stored.shape == (4, 64, 16, 16)
    model = FrancaModel.from_pretrained(tiny_folder).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_folder)
    with torch.no_grad():
        expected = model.get_dense_features(processor(images, return_tensors="pt")["pixel_values"], True, 64)
    torch.testing.assert_close(torch.from_numpy(stored).float(), expected, atol=2e-3, rtol=2e-3)
    [(ids, tensor)] = list(iter_shards(out))  # the package's own reader
    assert ids == list(rows["id"]) and tensor.shape == (4, 64, 16, 16)

    with pytest.raises(ValueError, match="holds dense_debiased patch features; an index needs CLS embeddings"):
        index_from_features(out)


def test_killed_extraction_resumes_with_no_image_missing_or_repeated(tiny_folder, tmp_path):
    paths = make_images(tmp_path / "images", 150, broken=2)
    out = tmp_path / "features"
    command = [sys.executable, "-m", "franca_hf.cli", *extract_command(tmp_path / "images", tiny_folder, out)]
    command += ["--batch-size", "2", "--shard-size", "4"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        logs = list((out / ".progress").glob("*.jsonl")) if (out / ".progress").is_dir() else []
        if logs and len(logs[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    partial = ExtractionIndex.load(out).with_progress(out)
    assert not partial.complete and 0 < partial.rows < 150  # it really died half-way

    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    new = 150 - partial.rows
    assert f"of {new} new images to {out}, which holds 150 images in " in resumed.stdout
    assert (
        f"({partial.rows} were done before this run); 2 unreadable images listed in its extraction.json"
        in resumed.stdout
    )
    rows = load_rows(out).with_format("torch")
    assert sorted(rows["id"]) == paths  # every readable image exactly once
    failed = json.loads((out / "extraction.json").read_text())["failed"]
    assert sorted(image_id.split("/")[-1] for image_id, _ in failed) == ["broken_0.png", "broken_1.png"]
    order = {image_id: i for i, image_id in enumerate(rows["id"])}
    expected = _expected(tiny_folder, paths)
    torch.testing.assert_close(rows[:]["features"][[order[p] for p in paths]], expected, atol=1e-5, rtol=1e-5)
    assert not list((out / "data").glob(".*"))  # no temporary file left behind


def test_uncommitted_shards_and_torn_progress_lines_are_redone(tiny_folder, tmp_path):
    """What a kill can leave: a shard written but not committed, and a half-written progress line."""
    paths = make_images(tmp_path / "images", 12)
    out = tmp_path / "features"
    assert main([*extract_command(tmp_path / "images", tiny_folder, out), "--shard-size", "4"]) == 0
    index = json.loads((out / "extraction.json").read_text())
    last = index["shards"].pop()
    index["complete"] = False
    (out / "extraction.json").write_text(json.dumps(index))
    (out / ".progress").mkdir()
    (out / ".progress" / "000002-000.jsonl").write_text('{"shard": "' + last["file"] + '", "rows": 4, "fai')
    (out / "data" / ".shard-x.parquet.tmp").write_bytes(b"half")
    assert main([*extract_command(tmp_path / "images", tiny_folder, out), "--shard-size", "4"]) == 0
    assert sorted(load_rows(out)["id"]) == paths
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(
        s["file"][5:] for s in json.loads((out / "extraction.json").read_text())["shards"]
    )


PEAK_RSS = """
import resource, sys
from franca_hf.cli import main
assert main(sys.argv[1:]) == 0
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_peak_memory_does_not_grow_with_the_number_of_images(tiny_folder, tmp_path):
    """Dense float32 maps of 128 x 16 x 16 are 128 KiB per image: holding 360 more images would add 45 MiB."""
    peaks = {}
    for count in (40, 400):
        make_images(tmp_path / f"images_{count}", count)
        command = extract_command(tmp_path / f"images_{count}", tiny_folder, tmp_path / f"out_{count}", "--dense")
        run = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, *command, "--shard-size", "16", "--batch-size", "8"],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        peaks[count] = int(run.stdout.split("peak_rss_kib")[1]) / 1024
        assert len(load_rows(tmp_path / f"out_{count}")) == count
    growth = peaks[400] - peaks[40]
    assert growth < 15, f"peak RSS grew by {growth:.1f} MiB from 40 to 400 images ({peaks})"


def _two_process_cli() -> list[str]:
    """`accelerate launch` of `franca_hf.cli` on 2 CPU processes (gloo)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launcher, "--main_process_port", str(29500 + os.getpid() % 1000), "-m", "franca_hf.cli"]


def test_two_processes_split_the_work_and_merge_one_index(tiny_folder, tmp_path):
    paths = make_images(tmp_path / "images", 21, broken=1)
    out = tmp_path / "features"
    launcher = _two_process_cli()
    command = extract_command(tmp_path / "images", tiny_folder, out, "--shard-size", "4", "--batch-size", "2")
    run = subprocess.run([*launcher, *command], env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote cls features") == 1  # reported once, by the first process
    index = json.loads((out / "extraction.json").read_text())
    writers = {shard["file"].split("-")[2] for shard in index["shards"]}
    assert writers == {"000", "001"} and index["complete"] and not (out / ".progress").exists()
    assert [image_id.split("/")[-1] for image_id, _ in index["failed"]] == ["broken_0.png"]
    rows = load_rows(out).with_format("torch")
    assert sorted(rows["id"]) == paths
    order = {image_id: i for i, image_id in enumerate(rows["id"])}
    torch.testing.assert_close(
        rows[:]["features"][[order[p] for p in paths]], _expected(tiny_folder, paths), atol=1e-5, rtol=1e-5
    )


def test_two_processes_print_an_error_once(tiny_folder, tmp_path):
    launcher = _two_process_cli()
    command = extract_command(tmp_path / "nope", tiny_folder, tmp_path / "features")
    run = subprocess.run([*launcher, *command], env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert run.stderr.count("franca-hf extract: error:") == 1 and "is neither an image file nor a folder" in run.stderr


def test_a_release_name_is_judged_before_its_download(tmp_path, photos, capsys, tiny_release_server):
    """A request a release cannot serve is refused from the release table, before gigabytes are downloaded and
    converted; what the table tells is what the conversion gives."""
    release = "franca_vitb14_In21K"  # the tiny reference, served with its RASA head
    assert main(extract_command(photos, release, tmp_path / "x", "--dim", "48")) == 2
    assert "dim=48 is not allowed; choose one of [8, 16, 32, 64, 128]. (--dim)" in capsys.readouterr().err
    knn = ["knn", "--model", release, "--train", "demo", "--test", "demo", "--dims", "256", "--device", "cpu"]
    assert main(knn) == 2
    assert "dims=256 is not allowed; choose one between 1 and 128. (--dims)" in capsys.readouterr().err
    assert tiny_release_server.requests == []  # nothing was downloaded
    assert main(extract_command(photos, "franca_vitb14_In21K_224", tmp_path / "x", "--dense", "--debiased")) == 2
    assert "debiased needs RASA weights, and this model has none." in capsys.readouterr().err
    assert tiny_release_server.requests == []

    converted = FrancaModel.from_pretrained(ModelSpec(release, device="cpu").load()[0].name_or_path).config
    expected = RELEASES[release].expected_config()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "position_grid_size"):
        assert getattr(converted, key) == getattr(expected, key), key
    assert converted.matryoshka_dims == expected.matryoshka_dims and converted.ffn_type == expected.ffn_type
    assert bool(converted.rasa_steps) == bool(expected.rasa_steps) is True


def test_extract_errors_name_the_flags(tmp_path, tiny_folder, photos, capsys):
    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    assert "is neither an image file nor a folder" in error(*extract_command(tmp_path / "nope", tiny_folder, "x"))
    (tmp_path / "empty").mkdir()
    assert "No image files found" in error(*extract_command(tmp_path / "empty", tiny_folder, tmp_path / "x"))
    odd = tmp_path / "odd"  # a name a file system allows, which a Parquet string cannot hold
    shutil.copytree(photos, odd)
    shutil.copy(next(odd.glob("*.jpg")), os.fsdecode(bytes(odd) + b"/bad\xff.jpg"))
    assert "1 image file name(s) are not valid UTF-8 (b'" + str(odd) + "/bad\\xff.jpg'): " in error(
        *extract_command(odd, tiny_folder, tmp_path / "x")
    )
    assert not (tmp_path / "x").exists()
    assert "debiased applies to dense patch features; set dense as well. (--debiased)" in error(
        *extract_command(photos, tiny_folder, tmp_path / "x", "--debiased")
    )
    assert "dim=48 is not allowed; choose one of [8, 16, 32, 64, 128]. (--dim)" in error(
        *extract_command(photos, tiny_folder, tmp_path / "x", "--dim", "48")
    )
    weightless = tmp_path / "weightless"  # the request is judged on the config, before any weights are read
    shutil.copytree(tiny_folder, weightless)
    for weights in weightless.glob("*.safetensors"):
        weights.unlink()
    assert "dim=48 is not allowed" in error(*extract_command(photos, weightless, tmp_path / "x", "--dim", "48"))
    assert f"error: model={weightless} has a config but no weights that can be read here (" in error(
        *extract_command(photos, weightless, tmp_path / "x")
    )
    (weightless / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # a damaged file
    assert f"error: model={weightless}: its weights cannot be read (" in error(
        *extract_command(photos, weightless, tmp_path / "x")
    )
    assert "names a file; extract writes a folder (Parquet shards and an index) there. (--out)" in error(
        *extract_command(photos, tiny_folder, tmp_path / "f.safetensors")
    )
    assert "shard_size must be at least 1; got 0. (--shard-size)" in error(
        *extract_command(photos, tiny_folder, tmp_path / "x", "--shard-size", "0")
    )
    for model, message in (  # the model as given is judged before transformers is asked to load it
        (tmp_path / "no_such_folder/", "is not a model folder here, a release name (`franca-hf releases`), or a Hub"),
        (photos, "is a folder without config.json: not a model folder (write one with model.save_pretrained(folder))"),
        (EXAMPLE_IMAGES / "coffee.jpg", "is a file; give a model folder, a Hub id or a release name"),
    ):
        assert f"error: model={model} {message}" in error(*extract_command(photos, model, tmp_path / "x"))
    assert "error: device='gpu7' is not a device; give cpu, cuda, cuda:<index>, mps" in error(
        *extract_command(photos, tiny_folder, tmp_path / "x", "--device", "gpu7")
    )
    if not torch.cuda.is_available():
        assert "error: device='cuda', but torch sees no cuda device on this machine. (--device)" in error(
            *extract_command(photos, tiny_folder, tmp_path / "x", "--device", "cuda")
        )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert "is not a franca-hf extraction folder" in error(*extract_command(photos, tiny_folder, tmp_path / "taken"))
    out = tmp_path / "done"
    assert main(extract_command(photos, tiny_folder, out)) == 0
    capsys.readouterr()
    message = error(*extract_command(photos, tiny_folder, out, "--dim", "16"))
    assert (
        "holds features made with other settings" in message and "(dim: 16 vs 128 [this run vs the folder])" in message
    )


def test_extract_with_a_release_name_converts_on_first_use(tmp_path, tiny_release_server):
    out = tmp_path / "dense"
    command = extract_command(EXAMPLE_IMAGES / "coffee.jpg", "franca_vitb14_In21K", out, "--dense", "--debiased")
    assert main(command) == 0
    assert (tmp_path / "cache" / "converted" / "franca_vitb14_In21K_rasa" / "float32" / "config.json").is_file()
    rows = load_rows(out)
    assert rows.features["features"].shape == (128, 16, 16)
    assert json.loads((out / "extraction.json").read_text())["settings"]["kind"] == "dense_debiased"


def test_the_summary_of_one_image_says_image(tiny_folder, tmp_path, capsys):
    out = tmp_path / "features"
    assert main(extract_command(EXAMPLE_IMAGES / "coffee.jpg", tiny_folder, out)) == 0
    assert "of 1 image in 1 shard to" in capsys.readouterr().out
