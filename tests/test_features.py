"""`franca-hf extract` and the feature-extraction API on the example photos."""

import json
import shutil

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
    """The example photos plus one corrupt file that must be skipped."""
    folder = tmp_path / "photos"
    shutil.copytree(EXAMPLE_IMAGES, folder, ignore=shutil.ignore_patterns("*.md"))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
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
    assert [f[0].split("/")[-1] for f in json.loads(meta["failed"])] == ["broken.jpg"]
    assert features.shape == (4, 32) and torch.allclose(features.norm(dim=-1), torch.ones(4))
    assert json.loads(meta["kind"]) == "cls" and json.loads(meta["dim"]) == 32

    # the same numbers as the model applied by hand to the processed photos
    model = FrancaModel.from_pretrained(tiny_folder).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_folder)
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        expected = model.get_image_features(processor(images, return_tensors="pt")["pixel_values"], dim=32)
    assert torch.allclose(features, expected, atol=1e-5)


def test_dense_debiased_extraction(tiny_folder, photos):
    model = FrancaModel.from_pretrained(tiny_folder)
    processor = AutoImageProcessor.from_pretrained(tiny_folder)
    result = extract_features(
        model, processor, collect_image_paths([photos]), dense=True, debiased=True, dim=64, progress=False
    )
    assert result.features.shape == (4, 64, 16, 16) and len(result.failed) == 1
    with pytest.raises(ValueError, match="pass dense=True"):
        extract_features(model, processor, [photos / "coffee.jpg"], debiased=True)


def test_extract_input_errors(tmp_path, tiny_folder, capsys):
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        collect_image_paths([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    assert main(["extract", str(tmp_path / "empty"), "--model", str(tiny_folder), "--out", "x.safetensors"]) == 2
    assert "No image files found" in capsys.readouterr().err
