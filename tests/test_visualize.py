"""`franca-hf visualize`: a two-panel PNG of raw vs debiased PCA maps with position-probe R²."""

import numpy as np
import pytest
import torch
from PIL import Image

from franca_hf import FrancaModel
from franca_hf.cli import main
from franca_hf.visualize import PANEL_SIDE, render_comparison, single_image_probe_r2

from .conftest import EXAMPLE_IMAGES, tiny_config


def test_visualize_writes_a_two_panel_png(tiny_folder, tmp_path, capsys):
    out = tmp_path / "fig.png"
    assert (
        main(
            [
                "visualize",
                str(EXAMPLE_IMAGES / "chelsea_cat.jpg"),
                "--model",
                str(tiny_folder),
                "--out",
                str(out),
                "--size",
                "112",
            ]
        )
        == 0
    )
    assert "position-probe R²: raw" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 2 * PANEL_SIDE and image.height > PANEL_SIDE
        pixels = torch.tensor(np.array(image.convert("RGB")), dtype=torch.float32)
    left, right = (
        pixels[12 : 12 + PANEL_SIDE, 12 : 12 + PANEL_SIDE],
        pixels[12 : 12 + PANEL_SIDE, -12 - PANEL_SIDE : -12],
    )
    assert left.std() > 10 and right.std() > 10  # two colourful PCA panels
    assert (left - right).abs().mean() > 5  # showing different features


def test_probe_sees_a_position_code_and_errors_are_clear():
    coords_code = torch.randn(2, 64)
    rows = cols = 8
    grid = torch.stack(torch.meshgrid(torch.arange(rows) / 7, torch.arange(cols) / 7, indexing="ij"), -1)
    features = grid.reshape(-1, 2) @ coords_code + 0.01 * torch.randn(64, 64)
    assert single_image_probe_r2(features, rows, cols) > 0.95
    model = FrancaModel(tiny_config()).eval()
    with pytest.raises(ValueError, match="needs RASA weights"):
        render_comparison(model, torch.randn(1, 3, 56, 56))
