"""`franca-hf visualize`: the input image, then PCA maps of raw (and RASA-debiased) patch features, with the
position-probe R² where the grid is large enough to measure it."""

import logging

import numpy as np
import torch
from PIL import Image

from franca_hf import FrancaModel
from franca_hf.cli import main
from franca_hf.features import ModelSpec
from franca_hf.modeling.image_processing_franca import make_image_processor
from franca_hf.visualize import (
    MIN_PROBE_GRID,
    PANEL_SIDE,
    render_comparison,
    single_image_probe_r2,
    visualize_image,
)
from franca_hf.visualize_settings import VisualizeSettings

from .conftest import EXAMPLE_IMAGES, tiny_config

MARGIN = 12


def _panels(path, count: int) -> list[torch.Tensor]:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width == count * PANEL_SIDE + (count + 1) * MARGIN
        pixels = torch.tensor(np.array(image.convert("RGB")), dtype=torch.float32)
    left = [MARGIN + i * (PANEL_SIDE + MARGIN) for i in range(count)]
    return [pixels[MARGIN : MARGIN + PANEL_SIDE, x : x + PANEL_SIDE] for x in left]


def test_visualize_shows_the_image_raw_and_debiased_maps(tiny_folder, tmp_path, capsys):
    out = tmp_path / "fig.png"
    image = EXAMPLE_IMAGES / "chelsea_cat.jpg"
    assert main(["visualize", str(image), "--model", str(tiny_folder), "--out", str(out), "--size", "112"]) == 0
    printed = capsys.readouterr().out
    assert "position-probe R²: raw" in printed and "RASA-debiased" in printed
    picture, raw, debiased = _panels(out, 3)
    assert raw.std() > 10 and debiased.std() > 10  # two colourful PCA panels
    assert (raw - debiased).abs().mean() > 5  # showing different features
    # the first panel is the processed input: the cat photo's centre crop, not a PCA map
    with Image.open(image) as original:
        expected = torch.tensor(np.array(original.convert("RGB").resize((8, 8))), dtype=torch.float32)
    shown = torch.nn.functional.adaptive_avg_pool2d(picture.permute(2, 0, 1)[None], 8)[0].permute(1, 2, 0)
    assert (shown.mean((0, 1)) - expected.mean((0, 1))).abs().max() < 25  # the same colours


def test_the_visualize_call_draws_what_the_command_draws(tiny_folder, tmp_path, capsys):
    image = EXAMPLE_IMAGES / "chelsea_cat.jpg"
    argv = ["visualize", str(image), "--model", str(tiny_folder), "--out", str(tmp_path / "cli.png"), "--size", "112"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = visualize_image(VisualizeSettings(image, tmp_path / "call.png", ModelSpec(str(tiny_folder)), size=112))

    assert result.out == tmp_path / "call.png" and set(result.r2) == {"raw", "RASA-debiased"}
    assert printed.startswith(f"wrote {tmp_path / 'cli.png'}; position-probe R²: raw {result.r2['raw']:.3f}, ")
    assert (tmp_path / "cli.png").read_bytes() == result.out.read_bytes()


def test_a_model_without_rasa_gets_the_raw_map(tmp_path, capsys):
    folder = tmp_path / "plain"
    FrancaModel(tiny_config()).save_pretrained(folder)
    make_image_processor(112).save_pretrained(folder)
    out = tmp_path / "fig.png"
    image = str(EXAMPLE_IMAGES / "chelsea_cat.jpg")
    assert main(["visualize", image, "--model", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "position-probe R²: raw" in printed and "RASA" not in printed
    _, raw = _panels(out, 2)
    assert raw.std() > 10


def test_small_grids_get_no_r2_but_a_warning(tiny_folder, tmp_path, capsys, caplog):
    out = tmp_path / "fig.png"
    with caplog.at_level(logging.WARNING, logger="franca_hf"):
        code = main(
            ["visualize", str(EXAMPLE_IMAGES / "coffee.jpg"), "--model", str(tiny_folder), "--out", str(out)]
            + ["--size", "56"]
        )
    assert code == 0
    assert "the patch grid is 4x4" in caplog.text and f"size={MIN_PROBE_GRID * 14})" in caplog.text
    assert "no position-probe R²: grid too small" in capsys.readouterr().out
    _, r2 = render_comparison(FrancaModel(tiny_config()).eval(), torch.randn(1, 3, 56, 56))
    assert r2 == {"raw": None}


def test_probe_sees_a_position_code():
    coords_code = torch.randn(2, 64)
    rows = cols = 8
    grid = torch.stack(torch.meshgrid(torch.arange(rows) / 7, torch.arange(cols) / 7, indexing="ij"), -1)
    features = grid.reshape(-1, 2) @ coords_code + 0.01 * torch.randn(64, 64)
    assert single_image_probe_r2(features, rows, cols) > 0.95


def test_files_that_are_not_one_readable_image_are_refused_in_one_line_before_the_model_loads(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    truncated = tmp_path / "truncated.jpg"
    whole = (EXAMPLE_IMAGES / "chelsea_cat.jpg").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 3])
    cases = {
        notes: "cannot be read as an image (cannot identify image file",
        tmp_path: "is a folder; visualize draws one image file.",
        truncated: "cannot be read as an image (image file is truncated",
        tmp_path / "missing.jpg": "does not exist.",
    }
    for path, message in cases.items():
        # the model does not exist: the image is checked first
        code = main(["visualize", str(path), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "f.png")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"franca-hf visualize: error: {path} {message}") and err.count("\n") == 1
        assert not (tmp_path / "f.png").exists()


def test_a_grid_below_2_x_2_patches_is_refused_and_the_picture_has_its_suffix_format(tiny_folder, tmp_path, capsys):
    image = str(EXAMPLE_IMAGES / "coffee.jpg")
    for size in ("10", "20"):  # below one patch, and one patch (a 1 x 1 grid has no PCA map)
        argv = ["visualize", image, "--model", str(tiny_folder), "--out", str(tmp_path / "f.png"), "--size", size]
        assert main(argv) == 2
        assert "the PCA maps need at least 2 x 2 patches: give size >= 28. (--size)" in capsys.readouterr().err
    assert main(["visualize", image, "--model", str(tiny_folder), "--out", str(tmp_path / "f.txt")]) == 2
    assert "does not end with the suffix of a picture format Pillow writes in colour; give .png, .jpg or .webp" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "f.txt").exists()
    for suffix, format_ in ((".jpg", "JPEG"), (".png", "PNG"), (".webp", "WEBP")):
        out = tmp_path / f"figure{suffix}"
        assert main(["visualize", image, "--model", str(tiny_folder), "--out", str(out), "--size", "28"]) == 0
        assert Image.open(out).format == format_
    capsys.readouterr()
