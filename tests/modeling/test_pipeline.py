"""`pipeline("image-feature-extraction")` on a Franca folder gives the model's own outputs."""

import torch
from PIL import Image
from transformers import AutoImageProcessor, pipeline

from franca_hf import FrancaModel

from ..conftest import EXAMPLE_IMAGES


def test_pipeline_outputs_equal_the_model_outputs(tiny_folder):
    extractor = pipeline("image-feature-extraction", model=str(tiny_folder), device="cpu")
    image = Image.open(EXAMPLE_IMAGES / "coffee.jpg").convert("RGB")
    tokens = extractor(image, return_tensors=True)
    pooled = extractor(image, return_tensors=True, pool=True)
    model = FrancaModel.from_pretrained(tiny_folder).eval()
    pixels = AutoImageProcessor.from_pretrained(tiny_folder)(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixels)
    assert tokens.shape == (1, 257, 128) and pooled.shape == (1, 128)
    torch.testing.assert_close(tokens, out.last_hidden_state)
    torch.testing.assert_close(pooled, out.pooler_output)
