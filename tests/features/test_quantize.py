"""int8 dynamic quantisation for CPU extraction."""

import json

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor

from franca_hf import FrancaModel
from franca_hf.cli import main
from franca_hf.features import embed_batch, quantize_int8

from ..conftest import EXAMPLE_IMAGES
from .conftest import extract_command, load_rows


def test_int8_linears_stay_close_to_float32(tiny_folder):
    model = FrancaModel.from_pretrained(tiny_folder).eval()
    quantized = quantize_int8(model)
    linears = [m for m in quantized.modules() if isinstance(m, torch.nn.Linear)]
    dynamic = [m for m in quantized.modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__]
    assert not linears and dynamic  # every Linear replaced
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())  # the original is untouched (a copy)
    processor = AutoImageProcessor.from_pretrained(tiny_folder)
    images = [Image.open(p).convert("RGB") for p in sorted(EXAMPLE_IMAGES.glob("*.jpg"))]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        exact, approximate = embed_batch(model, pixels), embed_batch(quantized, pixels)
    cosine = F.cosine_similarity(exact, approximate)
    assert cosine.min() > 0.99 and not torch.equal(exact, approximate)


def test_extract_cli_int8(tiny_folder, tmp_path):
    out = tmp_path / "int8"
    assert main([*extract_command(EXAMPLE_IMAGES, tiny_folder, out, "--int8")]) == 0
    assert json.loads((out / "extraction.json").read_text())["settings"]["quantized"] == "int8"
    assert len(load_rows(out)) == 4


def test_int8_errors_name_the_flags(tiny_folder, tmp_path, capsys):
    assert main([*extract_command(EXAMPLE_IMAGES, tiny_folder, tmp_path / "x", "--int8", "--dtype", "bfloat16")]) == 2
    assert "int8 quantises a float32 model; got dtype=bfloat16. (--int8)" in capsys.readouterr().err
