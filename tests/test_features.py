"""`franca-hf extract` and the feature-extraction API on the example photos."""

import json
import shutil
import struct
import zlib

import pytest
import torch
from safetensors import safe_open
from transformers import AutoImageProcessor

from franca_hf import FrancaModel
from franca_hf.cli import main
from franca_hf.features import collect_image_paths, extract_features

from .conftest import EXAMPLE_IMAGES


@pytest.fixture()
def photos(tmp_path):
    """The example photos plus two bad files that must be skipped: garbage, and a PNG whose header claims
    20000 x 20000 pixels (PIL refuses it as a decompression bomb, an error that is not an OSError)."""
    folder = tmp_path / "photos"
    shutil.copytree(EXAMPLE_IMAGES, folder, ignore=shutil.ignore_patterns("*.md"))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    size = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    png = chunk(b"IHDR", size) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (folder / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png)
    return folder


def test_extract_cli_writes_embeddings_paths_and_failures(tiny_folder, photos, tmp_path, capsys):
    out = tmp_path / "features.safetensors"
    assert (
        main(
            ["extract", str(photos), "--model", str(tiny_folder), "--dim", "32", "--out", str(out), "--batch-size", "2"]
        )
        == 0
    )
    assert "skipped" in capsys.readouterr().err
    with safe_open(out, "pt") as handle:
        features = handle.get_tensor("features")
        meta = handle.metadata()
    paths = json.loads(meta["paths"])
    assert [p.split("/")[-1] for p in paths] == ["astronaut.jpg", "chelsea_cat.jpg", "coffee.jpg", "rocket.jpg"]
    assert [f[0].split("/")[-1] for f in json.loads(meta["failed"])] == ["broken.jpg", "huge.png"]
    assert features.shape == (4, 32) and torch.allclose(features.norm(dim=-1), torch.ones(4))
    assert json.loads(meta["kind"]) == "cls" and json.loads(meta["dim"]) == 32

    # the same numbers as the model applied by hand to the processed photos
    model = FrancaModel.from_pretrained(tiny_folder).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_folder)
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        expected = model.get_image_embeddings(processor(images, return_tensors="pt")["pixel_values"], dim=32)
    assert torch.allclose(features, expected, atol=1e-5)


def test_dense_debiased_extraction(tiny_folder, photos):
    model = FrancaModel.from_pretrained(tiny_folder)
    processor = AutoImageProcessor.from_pretrained(tiny_folder)
    result = extract_features(
        model, processor, collect_image_paths([photos]), dense=True, debiased=True, dim=64, progress=False
    )
    assert result.features.shape == (4, 64, 16, 16) and len(result.failed) == 2
    with pytest.raises(ValueError, match="pass dense=True"):
        extract_features(model, processor, [photos / "coffee.jpg"], debiased=True)


def test_extract_input_errors(tmp_path, tiny_folder, capsys):
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        collect_image_paths([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    assert main(["extract", str(tmp_path / "empty"), "--model", str(tiny_folder), "--out", "x.safetensors"]) == 2
    assert "No image files found" in capsys.readouterr().err


def test_index_and_search_cli(tiny_folder, tmp_path, capsys):
    index = tmp_path / "photos.safetensors"
    assert main(["index", str(EXAMPLE_IMAGES), "--model", str(tiny_folder), "--out", str(index)]) == 0
    assert "indexed 4 images (128 dims, nested [8, 16, 32, 64, 128])" in capsys.readouterr().out
    search = ["search", str(EXAMPLE_IMAGES / "rocket.jpg"), "--index", str(index), "--model", str(tiny_folder)]
    for extra in (["--dim", "32"], ["--funnel"]):
        assert main([*search, "--k", "2", *extra]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[2].strip().startswith("1. 1.0000") and lines[2].endswith("rocket.jpg")  # itself, first
    assert main([*search, "--dim", "10"]) == 2
    assert "dim" in capsys.readouterr().err


def test_extract_with_a_release_name_converts_on_first_use(tmp_path, monkeypatch, capsys, tiny_releases):
    from .conftest import RASA_CHECKPOINT, TEACHER_CHECKPOINT
    from .conversion.test_releases import ReleaseServer

    server = ReleaseServer(
        {
            "/v1.0.0/franca_vitb14_In21K.pth": TEACHER_CHECKPOINT.read_bytes(),
            "/v1.0.0/franca_vitb14_In21K_rasa.pth": RASA_CHECKPOINT.read_bytes(),
        }
    )
    monkeypatch.setenv("FRANCA_HF_RELEASE_URL", server.url)
    monkeypatch.setenv("FRANCA_HF_CACHE", str(tmp_path / "cache"))
    try:
        out = tmp_path / "dense.safetensors"
        assert (
            main(
                [
                    "extract",
                    str(EXAMPLE_IMAGES / "coffee.jpg"),
                    "--model",
                    "franca_vitb14_In21K",
                    "--dense",
                    "--debiased",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    finally:
        server.close()
    assert (tmp_path / "cache" / "converted" / "franca_vitb14_In21K_rasa" / "float32" / "config.json").is_file()
    with safe_open(out, "pt") as handle:
        assert handle.get_tensor("features").shape == (1, 128, 16, 16)
        assert json.loads(handle.metadata()["kind"]) == "dense_debiased"
